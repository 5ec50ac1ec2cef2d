"""Checks of one image file: can it be decoded, how it is converted, is it big enough, its hashes.

Used by the dataset doctor (:mod:`stylelora.doctor`); the decoding itself is
:func:`stylelora.dataset.load_image`, so the check and training convert an image the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .dataset import ImageLoadError, load_image

# An image under MIN_SIDE pixels (a thumbnail, an icon) holds no style to learn; one over MAX_ASPECT:1
# is a strip, and resizing it to cover the training square would allocate a huge image. Anything
# else is used, with a warning when it has to be enlarged (BLURRY_FACTOR times or more: strongly).
MIN_SIDE = 32
BLURRY_FACTOR = 4
WIDE_ASPECT = 2.5
MAX_ASPECT = 10.0
HASH_SIZE = 8  # perceptual hash: 8x8 low DCT frequencies -> 64 bits


@dataclass
class Problem:
    """One thing noticed about a file: what is wrong, what stylelora does, and how bad it is."""

    problem: str
    action: str
    level: str  # "error" (the file is not used), "warning" or "info"


@dataclass
class ImageCheck:
    path: Path
    usable: bool
    problems: list[Problem] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)
    sha256: str = ""
    phash: np.ndarray | None = None  # 64 booleans, for near-duplicate search
    thumb: np.ndarray | None = None  # 8x8 RGB, so that a recoloured layout is not called a duplicate


def check_image(path: Path, resolution: int) -> ImageCheck:
    """Decode ``path`` as training would and say everything a user should know about it."""
    result = ImageCheck(path, usable=False)
    notes: list[str] = []
    try:
        image = load_image(path, notes)
    except ImageLoadError as e:
        result.problems.append(Problem(e.reason, "skipped", "error"))
        return result
    result.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    result.size = image.size
    result.problems += [Problem(note, "used as converted", "info") for note in notes]
    w, h = image.size
    short, long = min(w, h), max(w, h)
    if long / short > MAX_ASPECT:
        result.problems.append(Problem(
            f"extreme aspect ratio {w}x{h} ({long / short:.0f}:1): a strip, not a picture",
            "skipped; crop it to the part that shows the style", "error"))
        return result
    if short < MIN_SIDE:
        result.problems.append(Problem(
            f"too small: {w}x{h}, under {MIN_SIDE} px on its short side, too little to learn a style from",
            "skipped; use a larger original", "error"))
        return result
    if short < resolution:
        factor = resolution / short
        effect = "it will be blurry" if factor >= BLURRY_FACTOR else "it will look softer"
        result.problems.append(Problem(
            f"smaller than the training resolution: {w}x{h}, short side {short} < {resolution}",
            f"used, enlarged {factor:.1f}x ({effect}); a larger original or a lower resolution is better",
            "warning"))
    if long / short >= WIDE_ASPECT:
        kept = round(100 * short / long)
        result.problems.append(Problem(
            f"very {'wide' if w > h else 'tall'}: {w}x{h} ({long / short:.1f}:1)",
            f"used; a square crop keeps only the middle {kept}% of it", "warning"))
    result.phash = perceptual_hash(image)
    result.thumb = np.asarray(image.resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    result.usable = True
    return result


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> np.ndarray:
    """pHash: the signs of the 8x8 lowest DCT frequencies of a 32x32 greyscale thumbnail vs their median.

    Re-encoding, resizing and mild colour changes keep it within a few bits; different pictures differ
    in about half of the 64 bits.
    """
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    freq = (_DCT32 @ grey @ _DCT32.T)[:HASH_SIZE, :HASH_SIZE].flatten()
    return freq > np.median(freq[1:])


def near_duplicate_pairs(hashes: list[np.ndarray], max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every pair i < j whose hashes differ in at most ``max_distance`` bits."""
    if len(hashes) < 2:
        return []
    bits = np.stack(hashes).astype(np.float32)
    pairs = []
    chunk = 1024  # rows at a time: a full n x n matrix of a big dataset would not fit
    for start in range(0, len(bits), chunk):
        block = bits[start : start + chunk]
        distance = block @ (1 - bits).T + (1 - block) @ bits.T
        for i, j in zip(*np.nonzero(distance <= max_distance), strict=True):
            a = start + int(i)
            if a < int(j):
                pairs.append((a, int(j), int(distance[i, j])))
    return pairs


def colour_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two 8x8 RGB thumbnails, 0-255."""
    return float(np.abs(a - b).mean())
