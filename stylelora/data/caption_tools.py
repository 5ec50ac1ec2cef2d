"""Bulk caption edits over a dataset folder: find and replace, remove or replace a tag, tag frequency, undo.

Every edit is planned first (a list of :class:`CaptionChange`, which is the preview) and written
second by :func:`apply_changes`, which keeps the previous captions of the files it touches in
``<dataset>/.stylelora/undo/`` so that :func:`undo_last` can put them back. Captions are the
``.txt`` sidecars next to the images (any depth; hidden files and folders skipped, as training
does), or the rows of ``metadata.jsonl`` when the folder has one. Every write is atomic.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..core import fileio
from ..core.errors import DataError
from .captions import split_tags
from .dataset import IMAGE_SUFFIXES, decode_text, sidecar_path

UNDO_DIR = Path(".stylelora") / "undo"  # under the dataset folder; hidden, so training never reads it
UNDO_KEEP = 20  # how many bulk edits can be undone, newest first
METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class CaptionChange:
    """One caption before and after an edit (``before`` is '' when the image had no caption)."""

    image: Path
    before: str
    after: str


@dataclass(frozen=True)
class Captioned:
    """An image of the dataset and its caption as stored ('' when it has none)."""

    image: Path
    caption: str


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _folder(folder: str | Path) -> Path:
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"dataset '{root}': no such folder; give the folder that holds the images")
    return root


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _jsonl_rows(root: Path) -> list[dict] | None:
    meta = root / METADATA
    if not meta.is_file():
        return None
    text, _ = decode_text(meta.read_bytes(), [])
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{meta}:{lineno}: not a JSON object; fix that line before editing captions") from None
        rows.append(row)
    return rows


def read_captions(folder: str | Path, caption_extension: str = ".txt") -> list[Captioned]:
    """Every image of ``folder`` with its caption, sorted by path (what the bulk edits work on)."""
    root = _folder(folder)
    rows = _jsonl_rows(root)
    if rows is not None:
        by_name = {str(r.get("file_name")): _one_line(str(r.get("text", ""))) for r in rows if isinstance(r, dict)}
    out = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file() or _is_hidden(path, root):
            continue
        if rows is not None:
            caption = by_name.get(path.relative_to(root).as_posix(), "")
        else:
            sidecar = sidecar_path(path, caption_extension)
            caption = _one_line(decode_text(sidecar.read_bytes(), [])[0]) if sidecar.is_file() else ""
        out.append(Captioned(path, caption))
    return out


# --- planning edits (the preview) -----------------------------------------------------------------


def find_replace(folder: str | Path, find: str, replace: str, *, regex: bool = False,
                 caption_extension: str = ".txt") -> list[CaptionChange]:
    """The captions that change when ``find`` (plain text, or a Python regular expression with
    ``regex``) is replaced by ``replace`` (which may use ``\\1`` groups with ``regex``)."""
    if not find:
        raise DataError("find: empty; type the text to look for")
    if regex:
        try:
            pattern = re.compile(find)
        except re.error as e:
            raise DataError(f"find: {find!r} is not a valid regular expression ({e}); "
                            "untick 'regular expression' to search for the text as typed") from None
    else:
        pattern = re.compile(re.escape(find))
    changes = []
    for entry in read_captions(folder, caption_extension):
        try:
            after = _one_line(pattern.sub(replace if regex else replace.replace("\\", "\\\\"), entry.caption))
        except (re.error, IndexError) as e:
            raise DataError(f"replace: {replace!r} cannot be used with this pattern ({e})") from None
        if after != entry.caption:
            changes.append(CaptionChange(entry.image, entry.caption, after))
    return changes


def _tag_key(tag: str) -> str:
    """Tags compare without case, and with '_' and ' ' alike (booru tags use underscores)."""
    return " ".join(tag.replace("_", " ").lower().split())


def replace_tag(folder: str | Path, old: str, new: str = "", *, caption_extension: str = ".txt") -> list[CaptionChange]:
    """Captions whose comma-separated tag ``old`` becomes ``new`` (or is removed when ``new`` is empty);
    a tag that would appear twice is kept once, in its first place."""
    key = _tag_key(old)
    if not key:
        raise DataError("tag: empty; type the tag to remove or replace")
    replacement = _one_line(new)
    changes = []
    for entry in read_captions(folder, caption_extension):
        tags = split_tags(entry.caption)
        if not any(_tag_key(t) == key for t in tags):
            continue
        edited: list[str] = []
        for tag in tags:
            tag = replacement if _tag_key(tag) == key else tag
            if tag and _tag_key(tag) not in {_tag_key(t) for t in edited}:
                edited.append(tag)
        after = ", ".join(edited)
        if after != entry.caption:
            changes.append(CaptionChange(entry.image, entry.caption, after))
    return changes


def remove_tag(folder: str | Path, tag: str, *, caption_extension: str = ".txt") -> list[CaptionChange]:
    return replace_tag(folder, tag, "", caption_extension=caption_extension)


def tag_frequency(folder: str | Path, *, caption_extension: str = ".txt") -> list[tuple[str, int]]:
    """Each comma-separated tag and how many captions hold it, most frequent first (ties by name)."""
    counts: Counter[str] = Counter()
    shown: dict[str, str] = {}
    for entry in read_captions(folder, caption_extension):
        for tag in {_tag_key(t): t for t in split_tags(entry.caption)}.values():
            shown.setdefault(_tag_key(tag), tag)
            counts[_tag_key(tag)] += 1
    return sorted(((shown[k], n) for k, n in counts.items()), key=lambda kv: (-kv[1], kv[0]))


def preview_text(changes: list[CaptionChange], root: str | Path, limit: int | None = None) -> str:
    """The changes as lines a person reads: the image, then '- before' and '+ after'."""
    base = Path(root)
    lines = []
    for change in changes[:limit]:
        name = change.image.relative_to(base) if change.image.is_relative_to(base) else change.image
        lines += [f"{name}", f"  - {change.before or '(no caption)'}", f"  + {change.after or '(no caption)'}"]
    if limit is not None and len(changes) > limit:
        lines.append(f"... and {len(changes) - limit} more")
    lines.append(f"{len(changes)} caption(s) change")
    return "\n".join(lines)


# --- writing, with undo -----------------------------------------------------------------------------


def _snapshot(root: Path, files: list[Path]) -> dict[str, str | None]:
    """The current text of ``files`` (None for a file that does not exist yet), by path under ``root``."""
    return {f.relative_to(root).as_posix(): (f.read_bytes().decode("utf-8", errors="surrogateescape")
                                             if f.is_file() else None) for f in files}


def apply_changes(folder: str | Path, changes: list[CaptionChange], label: str,
                  caption_extension: str = ".txt") -> Path | None:
    """Write ``changes`` (atomically, file by file) after keeping the previous captions for undo.

    Returns the undo record written, or None when there was nothing to change."""
    root = _folder(folder).resolve()
    if not changes:
        return None
    rows = _jsonl_rows(root)
    targets = [root / METADATA] if rows is not None else [
        sidecar_path(Path(c.image).resolve(), caption_extension) for c in changes]
    for target in targets:
        if not target.is_relative_to(root):
            raise DataError(f"{target}: outside the dataset folder {root}; nothing was changed")
    record = root / UNDO_DIR / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.json"
    # ASCII escapes keep the bytes of a caption that is not UTF-8 (cp1252, UTF-16): undo writes them back as they were
    fileio.write_text(record, json.dumps({"label": label, "files": _snapshot(root, targets)}))
    if rows is not None:
        new = {Path(c.image).resolve().relative_to(root).as_posix(): c.after for c in changes}
        for row in rows:
            name = str(row.get("file_name"))
            if name in new:
                row["text"] = new.pop(name)
        rows += [{"file_name": name, "text": text} for name, text in new.items()]
        fileio.write_text(root / METADATA, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        for change, target in zip(changes, targets, strict=True):
            fileio.write_text(target, change.after + "\n")
    _prune_undo(root)
    return record


def _undo_records(root: Path) -> list[Path]:
    folder = root / UNDO_DIR
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def _prune_undo(root: Path) -> None:
    for old in _undo_records(root)[:-UNDO_KEEP]:
        old.unlink(missing_ok=True)


def undo_history(folder: str | Path) -> list[str]:
    """Labels of the edits that can be undone, newest first."""
    out = []
    for record in reversed(_undo_records(_folder(folder).resolve())):
        try:
            out.append(str(json.loads(record.read_text(encoding="utf-8")).get("label", record.stem)))
        except (OSError, ValueError):
            out.append(record.stem)
    return out


def undo_last(folder: str | Path) -> tuple[str, int]:
    """Put back the captions the newest bulk edit replaced; returns (its label, files restored).

    Files the edit created are removed again. Undoing again goes one edit further back."""
    root = _folder(folder).resolve()
    records = _undo_records(root)
    if not records:
        raise DataError(f"dataset '{root.name}': no caption edit to undo (the last {UNDO_KEEP} are kept)")
    record = records[-1]
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        files: dict[str, str | None] = saved["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{record}: the undo record is damaged; delete it to undo the edit before it") from None
    for name, text in files.items():
        target = (root / name).resolve()
        if not target.is_relative_to(root):
            raise DataError(f"{record}: names a file outside the dataset ({name}); delete this record")
        if text is None:
            target.unlink(missing_ok=True)
        else:
            fileio.write_bytes(target, text.encode("utf-8", errors="surrogateescape"))
    record.unlink()
    return str(saved.get("label", record.stem)), len(files)
