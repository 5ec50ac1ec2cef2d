"""Aspect-ratio buckets: train each image near its own shape instead of a square crop.

Buckets are (width, height) pairs in multiples of ``step`` pixels around the target area
(resolution²), as kohya makes them: for each width the tallest height within the area, sides up to
twice the resolution. Each image goes to the bucket of the nearest aspect ratio, unless that would
crop a full step or more (it can, between two far-apart buckets): then to its own shape scaled to
the target area and rounded down to the step, which never crops that much. Only images more than
2:1 beyond the longest bucket side lose more.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

from PIL import Image

from ..core.errors import DataError
from .dataset import load_image

Size = tuple[int, int]

# EXIF orientations 5-8 rotate by 90 degrees, so the upright image swaps width and height.
_ROTATED = {5, 6, 7, 8}


@lru_cache(maxsize=16)
def make_buckets(resolution: int, step: int = 64) -> tuple[Size, ...]:
    """kohya's buckets: for each side in multiples of ``step``, the longest other side within the area."""
    area, longest = resolution * resolution, _longest(resolution, step)
    found: set[Size] = set()
    for w in range(step, longest + 1, step):
        h = min(longest, area // w // step * step)
        if h >= step:
            found |= {(w, h), (h, w)}
    return tuple(sorted(found))


def _longest(resolution: int, step: int) -> int:
    return max(step, 2 * resolution // step * step)


def _floor(size: tuple[float, float], step: int, longest: int) -> Size:
    w, h = (min(longest, max(step, int(side) // step * step)) for side in size)
    return w, h


def crop_after_resize(image: Size, bucket: Size) -> tuple[float, Size]:
    """(scale, pixels cropped in x and y) when ``image`` is resized to cover ``bucket`` and cropped."""
    (iw, ih), (w, h) = image, bucket
    scale = max(w / iw, h / ih)
    return scale, (max(w, round(iw * scale)) - w, max(h, round(ih * scale)) - h)


@lru_cache(maxsize=4096)
def assign_bucket(image: Size, resolution: int, step: int = 64, no_upscale: bool = False) -> Size:
    """The bucket (w, h) of an image of upright size ``image`` (w, h).

    The bucket of the nearest aspect ratio, when the image fits it with less than ``step`` pixels
    of crop; otherwise the image's own shape scaled to the target area and rounded down to the
    step, which always fits that way. With ``no_upscale`` an image smaller than the target area
    keeps its own size, rounded down to the step.
    """
    iw, ih = image
    area, longest = resolution * resolution, _longest(resolution, step)
    if no_upscale and iw * ih <= area:
        return _floor((iw, ih), step, longest)
    candidates = make_buckets(resolution, step)
    if no_upscale:
        candidates = tuple(b for b in candidates if b[0] <= iw and b[1] <= ih)
    aspect = math.log(iw / ih)
    if candidates:
        nearest = min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
        if max(crop_after_resize(image, nearest)[1]) < step:
            return nearest
    scale = math.sqrt(area / (iw * ih))
    return _floor((iw * scale, ih * scale), step, longest)


def oriented_size(path: Path) -> Size:
    """The upright (EXIF-rotated) size of an image, read from its header without decoding pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        load_image(path)  # raises the precise ImageLoadError naming the file (e.g. "not an image")
        raise DataError(f"{path}: cannot read this image ({e}); remove or replace it") from e
    return (h, w) if orientation in _ROTATED else (w, h)
