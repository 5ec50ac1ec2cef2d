"""Collect a dataset: create folders, add uploaded images or zips, edit captions, add a trigger word.

Everything here writes inside one dataset folder and nowhere else: uploaded names are reduced to a
safe base name (no folders, no ``..``, no leading dot), zip members are flattened the same way, and
every file is written atomically. Anything that is not a readable image (or a ``.txt`` caption) is
refused with a message saying why, and so are zips that would unpack to far more than they weigh.

An upload never loses a caption silently: an image whose bytes are already in the dataset is not
added again (it is named in the report), a caption uploaded with an image that had to be renamed
follows the image, and an uploaded caption that differs from the one an image already has is
kept aside unless the caller asks for captions to be replaced; either way the report says so.
A caption edit is refused when the caption changed on disk since the editor showed it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import unicodedata
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..core import fileio
from ..core.errors import DataError
from ..data.cache import file_hash
from ..data.dataset import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_FILE_BYTES = 64 * 1024**2  # one image or caption
MAX_ZIP_MEMBERS = 5000
MAX_ZIP_TOTAL_BYTES = 2 * 1024**3  # everything a zip unpacks to
MAX_ZIP_RATIO = 200  # uncompressed/compressed per member; images barely compress, bombs compress ~1000x
MAX_IMAGE_PIXELS = 64 * 1024**2
UPLOAD_SUFFIXES = (*sorted(IMAGE_SUFFIXES), ".txt", ".zip")  # images, caption sidecars, zips of both


@dataclass
class AddReport:
    """What an upload did: the files written, the images already there, what happened to captions,
    and, per refused file, why."""

    added: list[Path] = field(default_factory=list)
    already_there: list[str] = field(default_factory=list)  # "cat.png (same bytes as cat.png)"
    captions_replaced: list[str] = field(default_factory=list)  # image names whose caption an upload replaced
    captions_kept: list[str] = field(default_factory=list)  # image names whose different caption was kept
    captions_alone: list[str] = field(default_factory=list)  # added captions whose image is not in the dataset
    refused: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        images = sum(p.suffix.lower() in IMAGE_SUFFIXES for p in self.added)
        lines = [f"added {len(self.added)} file(s): {images} image(s), {len(self.added) - images} caption(s)"]
        if self.captions_alone:
            lines.append(f"no image for {', '.join(self.captions_alone)} in the dataset: kept, but training and the "
                         "gallery ignore a caption until an image of the same name is added")
        if self.already_there:
            lines.append(f"already in the dataset, not added again: {', '.join(self.already_there)}")
        if self.captions_replaced:
            lines.append(f"replaced the caption of {', '.join(self.captions_replaced)} with the uploaded one")
        if self.captions_kept:
            lines.append(f"kept the caption of {', '.join(self.captions_kept)}: the uploaded caption differs "
                         "(upload it again with 'replace captions' to use it, or edit the caption)")
        lines += [f"refused {r}" for r in self.refused]
        return "\n".join(lines)


# --- dataset folders ----------------------------------------------------------------------------


def list_datasets(root: str | Path) -> list[str]:
    """Names of the dataset folders directly under ``root`` (hidden folders skipped)."""
    base = Path(root)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def dataset_folder(root: str | Path, name: str) -> Path:
    """The folder of dataset ``name`` under ``root``; refuses names that are paths or odd."""
    name = (name or "").strip()
    if not DATASET_NAME.match(name):
        raise DataError(
            f"dataset name {name!r}: use letters, digits, '.', '_' or '-' (up to 64, starting with a "
            "letter or digit), e.g. my-style"
        )
    return Path(root).resolve() / name


def create_dataset(root: str | Path, name: str) -> Path:
    folder = dataset_folder(root, name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def safe_filename(name: str) -> str:
    """A base name that cannot leave its folder: folders dropped (``/`` and ``\\``), odd characters
    replaced, no leading dot; ``../../x.png`` becomes ``x.png``."""
    base = re.split(r"[/\\]", name or "")[-1]
    base = unicodedata.normalize("NFKC", base)
    base = re.sub(r"[^\w.\- ]", "_", base).strip(" .")
    base = base.lstrip(".-")
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        stem, suffix = base, ""
    stem = stem[:100] or "file"
    return f"{stem}.{suffix.lower()[:10]}" if suffix else stem


def _unique(folder: Path, name: str) -> Path:
    path = folder / name
    stem, suffix = path.stem, path.suffix
    n = 2
    while path.exists():
        path = folder / f"{stem}-{n}{suffix}"
        n += 1
    return path


def _check_image(data_path: Path, shown: str) -> str | None:
    """None when ``data_path`` is an image PIL can read; else why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(data_path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    return f"{shown}: {im.width}x{im.height} is too large (at most {MAX_IMAGE_PIXELS} pixels)"
                im.verify()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return f"{shown}: image is too large to open safely"
    except Exception as e:  # PIL raises many types for broken files
        return f"{shown}: not a readable image ({type(e).__name__}); export it again as PNG or JPEG"
    return None


class _Upload:
    """One upload into ``folder``: images first (so captions can follow renamed images), then captions."""

    def __init__(self, folder: Path, report: AddReport, replace_captions: bool) -> None:
        self.folder, self.report, self.replace_captions = folder, report, replace_captions
        self.renamed: dict[str, str] = {}  # uploaded image stem -> the stem it was saved (or found) under
        self._by_size: dict[int, list[Path]] | None = None
        self._hashes: dict[Path, str] = {}

    def _same_bytes(self, source: Path) -> Path | None:
        """An image already in the folder with the bytes of ``source``; sizes first, so few files are read."""
        if self._by_size is None:
            self._by_size = {}
            for p in self.folder.iterdir():
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."):
                    self._by_size.setdefault(p.stat().st_size, []).append(p)
        candidates = self._by_size.get(source.stat().st_size, [])
        if not candidates:
            return None
        digest = file_hash(source)
        for p in sorted(candidates):
            if self._hashes.setdefault(p, file_hash(p)) == digest:
                return p
        return None

    def checked(self, source: Path, original_name: str) -> str | None:
        """The safe name of an acceptable upload, or None after noting why it is refused."""
        name = safe_filename(original_name)
        suffix = Path(name).suffix.lower()
        if suffix not in IMAGE_SUFFIXES and suffix != ".txt":
            self.report.refused.append(
                f"{original_name}: not an image or caption (allowed: {', '.join(UPLOAD_SUFFIXES)})")
            return None
        size = source.stat().st_size
        if size > MAX_FILE_BYTES:
            limit = MAX_FILE_BYTES // 1024**2
            self.report.refused.append(f"{original_name}: {size // 1024**2} MiB is over the {limit} MiB limit")
            return None
        return name

    def image(self, source: Path, original_name: str, name: str) -> None:
        problem = _check_image(source, original_name)
        if problem:
            self.report.refused.append(problem)
            return
        stem = Path(name).stem
        existing = self._same_bytes(source)
        if existing is not None:  # the same picture again: nothing to add, its caption stays its own
            self.report.already_there.append(
                name if existing.name == name else f"{name} (same bytes as {existing.name})")
            self.renamed[stem] = existing.stem
            return
        target = _unique(self.folder, name)
        with fileio.atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        self.report.added.append(target)
        self.renamed[stem] = target.stem
        if self._by_size is not None:
            self._by_size.setdefault(target.stat().st_size, []).append(target)

    def caption(self, source: Path, original_name: str, name: str) -> None:
        try:
            text = source.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            self.report.refused.append(f"{original_name}: caption is not UTF-8 text; save it as UTF-8")
            return
        stem = Path(name).stem
        target = self.folder / f"{self.renamed.get(stem, stem)}.txt"  # follows its image when that was renamed
        shown = _image_named(self.folder, target.stem) or target.name
        if target.is_file():
            old = target.read_text(encoding="utf-8-sig", errors="replace")
            if " ".join(old.split()) == " ".join(text.split()):
                return  # the same caption: nothing changes
            if not self.replace_captions:
                self.report.captions_kept.append(shown)
                return
            self.report.captions_replaced.append(shown)
        fileio.write_text(target, text)
        self.report.added.append(target)
        if shown == target.name:  # no image of this name
            self.report.captions_alone.append(target.name)


def _image_named(folder: Path, stem: str) -> str | None:
    """The name of the image of ``stem`` in ``folder`` (the one a caption of that stem belongs to), if any."""
    return next((p.name for p in sorted(folder.iterdir()) if p.stem == stem and p.suffix.lower() in IMAGE_SUFFIXES),
                None)


def add_files(folder: str | Path, files: list[tuple[str | Path, str]], *, replace_captions: bool = False) -> AddReport:
    """Add uploaded files to ``folder``: ``files`` is a list of (where the upload lies, its original name).

    Images are checked and copied under a safe unique name, unless the same bytes are already there;
    ``.txt`` files become the captions of their images (following an image that had to be renamed);
    a caption that differs from an image's existing one replaces it only with ``replace_captions``.
    Zips are unpacked the same way, flattened. Nothing is ever written outside ``folder``.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    report = AddReport()
    upload = _Upload(target, report, replace_captions)
    with tempfile.TemporaryDirectory(prefix=".upload-", dir=target) as staging:
        accepted: list[tuple[Path, str, str]] = []  # (file, original name, safe name)
        for source, original in files:
            source = Path(source)
            if not source.is_file():
                report.refused.append(f"{original}: the upload is missing; upload it again")
            elif Path(original).suffix.lower() == ".zip":
                accepted += _unpack_zip(source, original, Path(staging), upload)
            elif (name := upload.checked(source, original)) is not None:
                accepted.append((source, original, name))
        for source, original, name in accepted:  # images first: a caption follows its image's final name
            if Path(name).suffix.lower() != ".txt":
                upload.image(source, original, name)
        for source, original, name in accepted:
            if Path(name).suffix.lower() == ".txt":
                upload.caption(source, original, name)
    return report


def _unpack_zip(source: Path, shown: str, staging: Path, upload: _Upload) -> list[tuple[Path, str, str]]:
    """The acceptable members of a zip, unpacked under ``staging`` as (file, shown name, safe name)."""
    report = upload.report
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError):
        report.refused.append(f"{shown}: not a valid zip file")
        return []
    accepted: list[tuple[Path, str, str]] = []
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        total = sum(m.file_size for m in members)
        if len(members) > MAX_ZIP_MEMBERS:
            report.refused.append(f"{shown}: {len(members)} files is more than the {MAX_ZIP_MEMBERS} allowed; split it")
            return []
        if total > MAX_ZIP_TOTAL_BYTES:
            report.refused.append(f"{shown}: unpacks to {total // 1024**2} MiB, over the "
                                  f"{MAX_ZIP_TOTAL_BYTES // 1024**2} MiB limit; nothing was added")
            return []
        bombs = [m for m in members if m.file_size > 1024**2 and m.file_size > MAX_ZIP_RATIO * max(m.compress_size, 1)]
        if bombs:
            report.refused.append(f"{shown}: looks like a zip bomb ({bombs[0].filename} expands "
                                  f"{bombs[0].file_size // max(bombs[0].compress_size, 1)}x); nothing was added")
            return []
        folder = Path(tempfile.mkdtemp(prefix="zip-", dir=staging))
        try:
            for i, member in enumerate(members):
                base = re.split(r"[/\\]", member.filename)[-1]
                if not base or base.startswith(".") or "__MACOSX" in member.filename:
                    continue  # folders, macOS resource forks, hidden files
                if member.file_size > MAX_FILE_BYTES:
                    report.refused.append(f"{shown}/{member.filename}: over the {MAX_FILE_BYTES // 1024**2} MiB limit")
                    continue
                unpacked = folder / f"{i}"
                # Read at most the declared size + 1: a member lying about its size is cut off and refused.
                with archive.open(member) as src, open(unpacked, "wb") as dst:
                    data = src.read(member.file_size + 1)
                    if len(data) > member.file_size:
                        report.refused.append(f"{shown}/{member.filename}: size does not match the zip's index")
                        continue
                    dst.write(data)
                name = upload.checked(unpacked, base)
                if name is not None:
                    accepted.append((unpacked, base, name))
        except (zipfile.BadZipFile, OSError, RuntimeError) as e:
            report.refused.append(f"{shown}: cannot unpack ({e}); files added before the error are kept")
    return accepted


# --- captions -----------------------------------------------------------------------------------


def _image_in(folder: Path, image_name: str) -> Path:
    """The image ``image_name`` (its path inside ``folder``, as ``images`` names it) of ``folder``."""
    root = folder.resolve()
    path = (root / image_name).resolve()
    if (not path.is_relative_to(root) or path == root or _hidden(path.relative_to(root)) or not path.is_file()
            or path.suffix.lower() not in IMAGE_SUFFIXES):
        raise DataError(f"{image_name}: no such image in dataset '{folder.name}'")
    return path


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def relative_name(folder: str | Path, image: Path) -> str:
    """How the app names ``image`` of ``folder``: its path inside the folder (``10_zqx style/a.png`` in kohya's
    repeats folders), as ``save_caption`` takes it."""
    return image.relative_to(Path(folder)).as_posix()


def _jsonl_rows(folder: Path) -> list[dict] | None:
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return None
    return [json.loads(line) for line in meta.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def images(folder: str | Path) -> list[tuple[Path, str]]:
    """(image, caption) for each image in ``folder`` and its folders (kohya's ``10_name``), as training reads
    them, sorted by path; hidden files and folders are skipped, missing captions are ''."""
    root = Path(folder)
    if not root.is_dir():
        return []
    rows = _jsonl_rows(root)
    by_name = {r.get("file_name"): str(r.get("text", "")) for r in rows or []}
    out = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or _hidden(path.relative_to(root)) or not path.is_file():
            continue
        if rows is not None:
            caption = by_name.get(relative_name(root, path), "")
        else:
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8-sig", errors="replace").strip() if sidecar.is_file() else ""
        out.append((path, caption))
    return out


def caption_of(folder: str | Path, image_name: str) -> str:
    """The caption of ``image_name`` in ``folder`` as an editor shows it ('' when it has none)."""
    image = _image_in(Path(folder), image_name)
    return next((caption for path, caption in images(folder) if path.resolve() == image), "")


def save_caption(folder: str | Path, image_name: str, caption: str, *, shown: str | None = None) -> Path:
    """Write the caption of ``image_name`` (sidecar .txt, or its metadata.jsonl row) atomically.

    ``shown`` is the caption as the editor showed it: when the caption on disk is no longer that (another
    edit, "add to every caption", an upload), nothing is written and DataError says so."""
    root = Path(folder)
    image = _image_in(root, image_name)
    name = relative_name(root.resolve(), image)
    if shown is not None:
        now = caption_of(root, name)
        if not _same(now, shown):
            raise DataError(f"{name} in dataset '{root.name}': its caption changed since it was shown "
                            f"(it is now '{now}'); nothing was saved. Open the image again to edit the new caption")
    caption = " ".join(caption.split())
    rows = _jsonl_rows(root)
    if rows is None:
        target = image.with_suffix(".txt")
        fileio.write_text(target, caption + "\n")
        return target
    for row in rows:
        if row.get("file_name") == name:
            row["text"] = caption
            break
    else:
        rows.append({"file_name": name, "text": caption})
    target = root / "metadata.jsonl"
    fileio.write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return target


def _same(a: str, b: str) -> bool:
    """Whether two captions read the same (spaces and line breaks aside)."""
    return " ".join(a.split()) == " ".join(b.split())


def save_if_edited(folder: str | Path, image_name: str, caption: str, shown: str) -> Path | None:
    """Keep an edit when the editor moves on to another image or dataset: save ``caption`` when it differs from
    ``shown``, the caption the editor showed (and only while that is still the caption on disk; DataError says
    so otherwise). Returns the file written, or None when nothing was edited."""
    if _same(caption, shown):
        return None
    return save_caption(folder, image_name, caption, shown=shown)


def add_trigger_word(folder: str | Path, word: str) -> int:
    """Put ``word`` in front of every caption that does not start with it; returns how many changed."""
    word = " ".join((word or "").split())
    if not word:
        raise DataError("trigger word: empty; type the word to put in front of every caption")
    changed = 0
    for image, caption in images(folder):
        if caption == word or caption.startswith(word + ",") or caption.startswith(word + " "):
            continue
        save_caption(folder, relative_name(folder, image), f"{word}, {caption}" if caption else word)
        changed += 1
    return changed
