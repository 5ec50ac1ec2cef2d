"""Preview images: labelled strips and grids, and PNG files that carry their generation parameters.

Parameters are stored the way AUTOMATIC1111 does: a PNG text chunk named ``parameters`` holding
the prompt, a ``Negative prompt: ...`` line and a ``Key: value, Key: value`` line, so A1111's
"PNG Info" tab, Civitai and most image browsers read them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ..core.errors import StyleloraError
from ..core.fileio import atomic_path, foreign_path_problem

PARAMETERS_KEY = "parameters"
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
GAP = 4  # pixels between tiles

# --- A1111 parameters text ----------------------------------------------------------------------


def _quote(value: Any) -> str:
    """A1111's quoting: values with a comma, colon or newline are written as JSON strings."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text and not text.startswith('"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def format_parameters(prompt: str, negative_prompt: str = "", fields: Mapping[str, Any] | None = None) -> str:
    """The A1111 ``parameters`` text: prompt, optional negative prompt line, then ``Key: value`` pairs."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    if fields:
        lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """Read an A1111 ``parameters`` text back: ``{"Prompt": ..., "Negative prompt": ..., "Steps": "20", ...}``."""
    *head, last = text.rstrip("\n").split("\n")
    if not _FIELD.match(last) or len(_FIELD.findall(last)) < 2:
        head, last = [*head, last], ""  # no settings line
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    out = {"Prompt": "\n".join(prompt_lines)}
    if in_negative:
        out["Negative prompt"] = "\n".join(negative_lines)
    for key, value in _FIELD.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            value = json.loads(value)
        out[key.strip()] = value
    return out


def check_png_path(path: str | Path) -> Path:
    """``path`` as a Path if it names a .png file; StyleloraError otherwise."""
    target = Path(path)
    problem = foreign_path_problem(str(path))
    if problem is not None:
        raise StyleloraError(f"{problem}; give a path on this machine")
    if target.suffix.lower() != ".png":
        raise StyleloraError(f"{target}: preview images are saved as PNG (they carry their parameters); "
                             "give a file name ending in .png")
    if target.is_dir():
        raise StyleloraError(f"{target}: is a folder; give a file name ending in .png")
    return target


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write ``image`` as PNG atomically, with ``parameters`` (default: ``image.info``'s) as a text chunk."""
    target = check_png_path(path)
    text = parameters if parameters is not None else image.info.get(PARAMETERS_KEY)
    info = PngInfo()
    if text:
        info.add_text(PARAMETERS_KEY, text)  # Pillow switches to an iTXt chunk for non-Latin-1 text
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return target


def read_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text chunk of a PNG file, or None."""
    with Image.open(path) as im:
        return im.info.get(PARAMETERS_KEY)


# --- strips and grids ---------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _fit_font(labels: Sequence[str], width: int, start: int) -> Any:
    """The largest font (from ``start`` down to 8 px) in which every label fits ``width`` pixels."""
    size = start
    while True:
        font = _font(size)
        if size <= 8 or all(_text_width(font, label) <= width - 2 for label in labels):
            return font
        size -= 1


def _text_width(font: Any, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _label_height(font: Any) -> int:
    _, top, _, bottom = font.getbbox("Ag0.9")
    return int(bottom - top) + 2 * GAP


def grid(
    rows: Sequence[Sequence[Image.Image]],
    column_labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
) -> Image.Image:
    """Tiles in rows and columns on a white sheet, with labels above the columns and left of the rows."""
    if not rows or not rows[0]:
        raise ValueError("grid needs at least one image")
    tile_w = max(im.width for row in rows for im in row)
    tile_h = max(im.height for row in rows for im in row)
    n_cols = max(len(row) for row in rows)
    font = _fit_font(list(column_labels), tile_w, start=max(10, min(tile_w // 10, 28)))
    top = _label_height(font) if column_labels else 0
    row_font = _font(max(10, min(tile_h // 10, 28)))
    left = max((_text_width(row_font, label) for label in row_labels), default=0)
    left = left + 2 * GAP if row_labels else 0
    sheet = Image.new(
        "RGB",
        (left + n_cols * tile_w + (n_cols - 1) * GAP, top + len(rows) * tile_h + (len(rows) - 1) * GAP),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(column_labels):
        x = left + c * (tile_w + GAP) + (tile_w - _text_width(font, label)) // 2
        draw.text((x, GAP), label, fill=INK, font=font)
    for r, row in enumerate(rows):
        y = top + r * (tile_h + GAP)
        if r < len(row_labels):
            draw.text((GAP, y + tile_h // 2), row_labels[r], fill=INK, font=row_font, anchor="lm")
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB"), (left + c * (tile_w + GAP), y))
    return sheet


def strip(images: Sequence[Image.Image], labels: Sequence[str] = ()) -> Image.Image:
    """Images side by side, each with its label above it (e.g. the strengths of a sweep)."""
    return grid([list(images)], column_labels=labels)
