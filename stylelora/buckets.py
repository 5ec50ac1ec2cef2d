"""Aspect-ratio buckets: train each image near its own shape instead of a square crop.

Buckets are (width, height) pairs in multiples of ``step`` pixels whose area is at most the target
area (resolution²), with no side longer than twice the resolution. Each image goes to the largest
bucket it fits with less than one ``step`` of crop, and among buckets of that area to the nearest
aspect ratio. The floor-rounded shape of the image scaled to the target area always qualifies, so
no image is cropped by a full step or more (kohya's nearest-aspect rule can crop more than that).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

from PIL import Image

from .errors import DataError

Size = tuple[int, int]

# EXIF orientations 5-8 rotate by 90 degrees, so the upright image swaps width and height.
_ROTATED = {5, 6, 7, 8}


@lru_cache(maxsize=16)
def make_buckets(resolution: int, step: int = 64) -> tuple[Size, ...]:
    """Every (w, h) in multiples of ``step`` with w*h <= resolution² and sides up to 2*resolution."""
    area, longest = resolution * resolution, max(step, 2 * resolution // step * step)
    return tuple(
        (w, h)
        for w in range(step, longest + 1, step)
        for h in range(step, longest + 1, step)
        if w * h <= area
    )


def crop_after_resize(image: Size, bucket: Size) -> tuple[float, Size]:
    """(scale, pixels cropped in x and y) when ``image`` is resized to cover ``bucket`` and centre-cropped."""
    (iw, ih), (w, h) = image, bucket
    scale = max(w / iw, h / ih)
    return scale, (max(w, round(iw * scale)) - w, max(h, round(ih * scale)) - h)


@lru_cache(maxsize=4096)
def assign_bucket(image: Size, resolution: int, step: int = 64, no_upscale: bool = False) -> Size:
    """The bucket of an image of size ``image`` (w, h): the largest with less than ``step`` of crop."""
    iw, ih = image
    candidates = make_buckets(resolution, step)
    if no_upscale:
        fitting = [b for b in candidates if b[0] <= iw and b[1] <= ih]
        candidates = tuple(fitting) or candidates  # smaller than one step: upscaling is unavoidable
    aspect = math.log(iw / ih)
    best: tuple[int, float] | None = None
    chosen = candidates[0]
    for bucket in candidates:
        _, (cx, cy) = crop_after_resize(image, bucket)
        if max(cx, cy) >= step:
            continue
        key = (bucket[0] * bucket[1], -abs(math.log(bucket[0] / bucket[1]) - aspect))
        if best is None or key > best:
            best, chosen = key, bucket
    if best is None:  # only when no bucket avoids a crop: take the nearest aspect
        chosen = min(candidates, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))
    return chosen


def oriented_size(path: Path) -> Size:
    """The upright (EXIF-rotated) size of an image, read from its header without decoding pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read this image ({e}); remove or replace it") from e
    return (h, w) if orientation in _ROTATED else (w, h)
