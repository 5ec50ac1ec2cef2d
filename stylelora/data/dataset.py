"""Find, load and prepare captioned images.

A dataset is a folder of images with same-name caption sidecars (``cat.png`` + ``cat.txt``) or a
``metadata.jsonl`` with ``file_name`` and ``text``. The folder is only ever read.
Randomness (crop, flip, order) is derived from (seed, epoch, position) alone, so a resumed run sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.config import DataConfig
from ..core.errors import DataError, setting
from .captions import with_trigger

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str


CAPTION_FALLBACKS = ("cp1252", "latin-1")  # tried in order when a caption is not UTF-8
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit (about 89 megapixels)
DOC_NAMES = {"readme", "license", "licence", "notice", "copying", "credits", "attribution"}


def decode_text(raw: bytes, notes: list[str]) -> tuple[str, str]:
    """Decode a caption or metadata file: (text, encoding used); ``notes`` says what was assumed.

    Files are UTF-8 (with or without BOM) or UTF-16 with a BOM; anything else is decoded as
    Windows-1252, then Latin-1 (which never fails), and a note says so.
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        notes.append("text is UTF-16 (it has a UTF-16 byte-order mark); decoded as UTF-16")
        return raw.decode("utf-16", errors="replace"), "utf-16"
    if raw.startswith(b"\xef\xbb\xbf"):
        notes.append("text starts with a UTF-8 byte-order mark; the mark is dropped")
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as e:
        bad = e.start
    for encoding in CAPTION_FALLBACKS:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        notes.append(
            f"text is not UTF-8 (byte 0x{raw[bad]:02x} at offset {bad}); decoded as {encoding}: check accented "
            "letters, and save the file as UTF-8 to be sure"
        )
        return text, encoding
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def guessed_encoding(note: str) -> bool:
    """Whether a note of ``decode_text`` says the encoding was guessed (accents may be wrong: worth a warning),
    not read from a byte-order mark (UTF-16, a UTF-8 mark) or a line ending (just so)."""
    return note.startswith("text is not UTF-8")


def read_caption(path: Path, notes: list[str] | None = None) -> str:
    """A caption sidecar as one line of text; ``notes`` gets a line per repair made on the way."""
    notes = notes if notes is not None else []
    text, _ = decode_text(path.read_bytes(), notes)
    if "\r" in text:
        notes.append("caption has Windows (CRLF) line endings; they are read as spaces")
    if len([line for line in text.splitlines() if line.strip()]) > 1:
        notes.append("caption has several lines; they are joined into one with spaces")
    return " ".join(text.split())


def sidecar_path(image: Path, caption_extension: str = ".txt") -> Path:
    """The caption file of ``image``: ``a.txt``, or ``a.TXT`` as Windows tools name it (Linux tells case apart);
    ``a.txt`` when there is none yet."""
    exact = image.with_suffix(caption_extension)
    if exact.is_file():
        return exact
    try:  # the same stem with the extension in another case, e.g. IMG_01.TXT beside IMG_01.JPEG
        return next(p for p in sorted(image.parent.glob(glob.escape(image.stem) + ".*"))
                    if p.suffix.lower() == caption_extension.lower() and p.stem == image.stem and p.is_file())
    except (StopIteration, OSError):
        return exact


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def scan(folder: str | Path, caption_extension: str = ".txt") -> list[Item]:
    """List the captioned images of ``folder`` (sidecar captions, or metadata.jsonl when present).

    Hidden files and folders are skipped, and so are metadata rows that name no image; the
    dataset check (:mod:`stylelora.doctor`) explains each of them. Which images can actually be
    decoded is the doctor's job too, so ``scan`` stays cheap.
    """
    root = Path(folder)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "no such folder"
        raise DataError(
            f"dataset '{root}': {what}. Point {setting('data.path')} at a folder of images "
            "with .txt captions or a metadata.jsonl."
        )
    meta = root / "metadata.jsonl"
    if meta.is_file():
        return _scan_jsonl(root, meta)
    items = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file() or _is_hidden(path, root):
            continue
        sidecar = sidecar_path(path, caption_extension)
        caption = _read_caption_quietly(sidecar) if sidecar.is_file() else ""
        items.append(Item(path, caption))
    if not items:
        raise DataError(
            f"dataset '{root}': no images found ({', '.join(sorted(IMAGE_SUFFIXES))}). Put the "
            "images in this folder with a same-name .txt caption next to each."
        )
    return items


def _read_caption_quietly(path: Path) -> str:
    notes: list[str] = []
    try:
        text = read_caption(path, notes)
    except OSError as e:
        log.warning("%s: cannot read this caption (%s); training on the trigger word only", path, e.strerror or e)
        return ""
    for note in notes:
        if guessed_encoding(note):
            log.warning("%s: %s", path, note)
    return text


@dataclass(frozen=True)
class JsonlRow:
    """One line of metadata.jsonl: the image it names (None when unusable) and why not."""

    lineno: int
    image: Path | None
    caption: str
    problem: str = ""


def read_jsonl(root: Path, meta: Path) -> list[JsonlRow]:
    """Every non-blank row of ``metadata.jsonl``; rows that name no usable file carry a problem."""
    rows: list[JsonlRow] = []
    try:
        text, _ = decode_text(meta.read_bytes(), [])
    except OSError as e:
        raise DataError(f"{meta}: cannot read it ({e.strerror or e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, caption = row["file_name"], row.get("text", "")
            if not isinstance(name, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            rows.append(JsonlRow(lineno, None, "", f"expected a JSON object with \"file_name\" and \"text\", "
                                                   f"got {line[:80]!r}"))
            continue
        path = (root / name).resolve()
        caption = " ".join(str(caption).split())
        if not path.is_relative_to(root.resolve()):
            rows.append(JsonlRow(lineno, None, caption, f"file_name {name!r} points outside the dataset folder"))
        elif not path.is_file():
            rows.append(JsonlRow(lineno, None, caption, f"image {name!r} does not exist in {root}"))
        else:
            rows.append(JsonlRow(lineno, path, caption))
    return rows


def _scan_jsonl(root: Path, meta: Path) -> list[Item]:
    items = []
    rows = read_jsonl(root, meta)
    for row in rows:
        if row.image is None:
            log.warning("%s:%d: %s; row skipped", meta, row.lineno, row.problem)
        else:
            items.append(Item(row.image, row.caption))
    if not items:
        first = f"{meta}:{rows[0].lineno}: {rows[0].problem}; " if rows else f"{meta}: "
        raise DataError(f"{first}no row names an image in {root}; add one JSON line per image")
    return items


class ImageLoadError(DataError):
    """An image file cannot be used at all (unreadable, truncated, not an image, too large)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def load_image(path: Path, notes: list[str] | None = None) -> Image.Image:
    """Open an image upright as 8-bit RGB; ``notes`` gets one line per conversion made.

    EXIF orientation is applied, transparency is flattened onto white, 16-bit and float images are
    scaled to 8 bits, CMYK/palette/greyscale become RGB, and an animation gives its first frame.
    Raises :class:`ImageLoadError` naming the file for anything that cannot be decoded, and refuses
    images over Pillow's decompression-bomb limit before allocating them.
    """
    notes = notes if notes is not None else []
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageLoadError(path, f"cannot read this file ({e.strerror or e})") from None
    if not data:
        raise ImageLoadError(path, "the file is empty (0 bytes); re-export or remove it")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageLoadError(path, _bomb_message(f"{w}x{h} pixels", w * h))
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                notes.append(_frames_note(im.format, frames))
                im.seek(0)
            im.load()
            return _to_rgb(im, notes)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:  # Pillow refuses twice its limit while opening
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(found.group(1)) if found else 2 * MAX_PIXELS
        raise ImageLoadError(path, _bomb_message(f"{pixels} pixels", pixels)) from None
    except UnidentifiedImageError:
        kind = path.suffix.lstrip(".").upper() or "an image"
        raise ImageLoadError(path, f"not an image: the content is not {kind} or any format Pillow reads") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError) as e:
        # Pillow's decoders report broken files with these; the message says which part failed.
        reason = str(e) or type(e).__name__
        if "truncated" in reason or isinstance(e, EOFError):
            raise ImageLoadError(path, f"the file is cut short ({reason}); re-export or re-download it") from None
        raise ImageLoadError(path, f"the image data is corrupt ({reason}); re-export or remove it") from None


def _frames_note(image_format: str | None, frames: int) -> str:
    if image_format == "MPO":  # phone cameras store a preview or depth picture after the photo
        return f"holds {frames} pictures (an MPO file, as phone cameras write): the main photo, the first, is used"
    if image_format == "TIFF":
        return f"multi-page TIFF ({frames} pages): the first page is used"
    return f"animated ({frames} frames): the first frame is used"


def _bomb_message(declared: str, pixels: int) -> str:
    return (f"declares {declared} ({pixels / 1e6:.0f} MP), over the {MAX_PIXELS / 1e6:.0f} MP limit that guards "
            "against decompression bombs; it was not decoded. Downscale it if it is a real picture")


_ORIENTATION = {2: "mirrored", 3: "rotated 180°", 4: "flipped", 5: "transposed", 6: "rotated 90° clockwise",
                7: "transversed", 8: "rotated 90° anticlockwise"}


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    orientation = im.getexif().get(0x0112, 1)
    if orientation in _ORIENTATION:
        im = ImageOps.exif_transpose(im)
        notes.append(f"EXIF orientation {orientation} applied ({_ORIENTATION[orientation]})")
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        notes.append(f"{'16' if mode.startswith('I;16') else '32'}-bit greyscale: scaled to 8 bits")
        scale = 257.0 if mode.startswith("I;16") or np.asarray(im).max() > 255 else 1.0
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / scale).clip(0, 255).astype(np.uint8))
    elif mode == "F":
        array = np.asarray(im, dtype=np.float64)
        scale = 255.0 if array.max() <= 1.0 else 1.0
        notes.append("floating-point image: scaled to 8 bits")
        im = Image.fromarray((array * scale).clip(0, 255).astype(np.uint8))
    elif mode == "CMYK":
        notes.append("CMYK: converted to RGB (print colours may shift a little)")
    elif mode == "P":
        notes.append("palette image: converted to RGB")
    elif mode in ("L", "1"):
        notes.append("greyscale: converted to RGB")
    elif mode not in ("RGB", "RGBA", "LA", "PA"):
        notes.append(f"{mode} colour: converted to RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        if im.getextrema()[3][0] < 255:
            notes.append("has transparency: flattened onto a white background")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


@dataclass(frozen=True)
class View:
    """How an image becomes a training example: resized to cover ``target`` (w, h), cropped at (left, top)
    of the resized image, maybe flipped. Computed from sizes alone, so a cached latent has one too."""

    original: tuple[int, int]  # (w, h), upright, before any resize
    resized: tuple[int, int]
    target: tuple[int, int]
    left: int
    top: int
    flip: bool

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the crop in the resized image as trained: a flipped example is the mirrored image
        cropped at the mirrored left edge (diffusers' SDXL script flips before it crops; kohya mirrors too)."""
        left = self.resized[0] - self.left - self.target[0] if self.flip else self.left
        return self.top, left

    @property
    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's size conditioning: original (h, w), crop top-left (top, left), target (h, w)."""
        (w, h), (tw, th) = self.original, self.target
        return (h, w, *self.crop_top_left, th, tw)


def plan_view(size: tuple[int, int], target: tuple[int, int], center_crop: bool, flip: bool,
              rng: np.random.Generator) -> View:
    """The view of an image of upright ``size`` (w, h) at ``target`` (w, h): a centred or seeded random crop."""
    (iw, ih), (w, h) = size, target
    scale = max(w / iw, h / ih)
    new = (max(w, round(iw * scale)), max(h, round(ih * scale)))
    if center_crop:
        left, top = (new[0] - w) // 2, (new[1] - h) // 2
    else:
        left, top = int(rng.integers(0, new[0] - w + 1)), int(rng.integers(0, new[1] - h + 1))
    return View(size, new, target, left, top, flip)


def apply_view(image: Image.Image, view: View) -> torch.Tensor:
    """The pixels of ``view``: CHW float in [-1, 1]."""
    w, h = view.target
    image = image.resize(view.resized, Image.Resampling.LANCZOS)
    image = image.crop((view.left, view.top, view.left + w, view.top + h))
    if view.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def prepare(
    image: Image.Image, size: tuple[int, int], center_crop: bool, flip: bool, rng: np.random.Generator
) -> torch.Tensor:
    """Resize to cover ``size`` (w, h), crop, maybe flip; returns CHW float in [-1, 1]."""
    return apply_view(image, plan_view(image.size, size, center_crop, flip, rng))


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
        image = load_image(item.image)
        view = plan_view(image.size, size, self.config.center_crop, flip, rng)
        return {"pixels": apply_view(image, view), "caption": with_trigger(item.caption, self.config.trigger_word),
                "view": view}


def write_caption(image: Path, caption: str, caption_extension: str = ".txt") -> Path:
    """Save the caption of ``image`` as its UTF-8 sidecar, atomically (for caption editors)."""
    from ..core import fileio

    path = sidecar_path(Path(image), caption_extension)
    fileio.write_text(path, " ".join(caption.split()) + "\n")
    return path
