"""Find, load and prepare captioned images.

A dataset is a folder of images with same-name caption sidecars (``cat.png`` + ``cat.txt``) or a
``metadata.jsonl`` with ``file_name`` and ``text``. The folder is only ever read.
Randomness (crop, flip, order) is derived from (seed, epoch, position) alone, so a resumed run sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import DataConfig
from .errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str


def _read_caption(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
        log.warning("%s: caption is not UTF-8; read it as Latin-1", path)
    return " ".join(text.split())


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def scan(folder: str | Path, caption_extension: str = ".txt") -> list[Item]:
    """List the captioned images of ``folder`` (sidecar captions, or metadata.jsonl when present)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(
            f"dataset '{root}': no such folder. Point data.path (--data) at a folder of images "
            "with .txt captions or a metadata.jsonl."
        )
    meta = root / "metadata.jsonl"
    if meta.is_file():
        return _scan_jsonl(root, meta)
    items = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file() or _is_hidden(path, root):
            continue
        sidecar = path.with_suffix(caption_extension)
        caption = _read_caption(sidecar) if sidecar.is_file() else ""
        if not caption:
            log.warning("%s: no caption (%s missing or empty); training on the trigger word only", path, sidecar.name)
        items.append(Item(path, caption))
    if not items:
        raise DataError(
            f"dataset '{root}': no images found ({', '.join(sorted(IMAGE_SUFFIXES))}). Put the "
            "images in this folder with a same-name .txt caption next to each."
        )
    return items


def _scan_jsonl(root: Path, meta: Path) -> list[Item]:
    items = []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row.get("text", "")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                f"{meta}:{lineno}: expected a JSON object with \"file_name\" and \"text\", got {line[:80]!r}"
            ) from None
        path = (root / name).resolve()
        if not path.is_relative_to(root.resolve()):
            raise DataError(f"{meta}:{lineno}: file_name {name!r} points outside the dataset folder")
        if not path.is_file():
            raise DataError(f"{meta}:{lineno}: image {name!r} does not exist in {root}")
        items.append(Item(path, " ".join(str(text).split())))
    if not items:
        raise DataError(f"{meta}: has no rows; add one JSON line per image")
    return items


def load_image(path: Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as 8-bit RGB; transparency becomes white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return im.convert("RGB")


def prepare(
    image: Image.Image, size: tuple[int, int], center_crop: bool, flip: bool, rng: np.random.Generator
) -> torch.Tensor:
    """Resize to cover ``size`` (w, h), crop, maybe flip; returns CHW float in [-1, 1]."""
    w, h = size
    scale = max(w / image.width, h / image.height)
    new = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.resize(new, Image.Resampling.LANCZOS)
    if center_crop:
        left, top = (new[0] - w) // 2, (new[1] - h) // 2
    else:
        left, top = int(rng.integers(0, new[0] - w + 1)), int(rng.integers(0, new[1] - h + 1))
    image = image.crop((left, top, left + w, top + h))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def with_trigger(caption: str, trigger: str) -> str:
    if not trigger or caption.startswith(trigger):
        return caption or trigger
    return f"{trigger}, {caption}" if caption else trigger


class CaptionedImages:
    """The training examples: each item repeated ``repeats`` times, prepared on demand."""

    def __init__(self, items: list[Item], config: DataConfig):
        self.items = items
        self.config = config
        self.index = [i for i in range(len(items)) for _ in range(config.repeats)]

    @classmethod
    def from_config(cls, config: DataConfig) -> CaptionedImages:
        return cls(scan(config.path, config.caption_extension), config)

    def __len__(self) -> int:
        return len(self.index)

    def example(self, position: int, seed: int, epoch: int) -> dict[str, object]:
        item = self.items[self.index[position]]
        rng = np.random.default_rng([seed, epoch, position])
        flip = self.config.random_flip and bool(rng.integers(0, 2))
        size = (self.config.resolution, self.config.resolution)
        try:
            image = load_image(item.image)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{item.image}: cannot read this image ({e}); remove or replace it") from e
        pixels = prepare(image, size, self.config.center_crop, flip, rng)
        return {"pixels": pixels, "caption": with_trigger(item.caption, self.config.trigger_word)}


@dataclass(frozen=True)
class Position:
    """Where the data stream is: the epoch and how many batches of it were already used."""

    epoch: int = 0
    batch: int = 0


def batches(
    num_examples: int, batch_size: int, seed: int, start: Position = Position()
) -> Iterator[tuple[Position, list[int]]]:
    """Endless seeded epochs of shuffled batches; yields (position after this batch, indices)."""
    epoch, first = start.epoch, start.batch
    while True:
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        chunks = [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]
        for b in range(first, len(chunks)):
            after = Position(epoch, b + 1) if b + 1 < len(chunks) else Position(epoch + 1, 0)
            yield after, chunks[b]
        epoch, first = epoch + 1, 0
