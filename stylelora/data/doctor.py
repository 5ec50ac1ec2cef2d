"""The dataset doctor: what is wrong with each file of a dataset folder and what stylelora will do.

``check_dataset(folder)`` reads (never writes) every file, decodes every image the way training
does, and returns a :class:`DatasetReport`: one :class:`Finding` per problem, the images training
will use, and whether training can proceed. ``stylelora check-data`` prints it; training uses its
``usable`` list, so a broken file costs one skipped image, not the run.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import DataConfig
from ..core.errors import DataError, counted, setting
from .dataset import (
    DOC_NAMES,
    IMAGE_SUFFIXES,
    Item,
    guessed_encoding,
    read_caption,
    read_jsonl,
    scan,
    sidecar_path,
    with_trigger,
)
from .imagecheck import check_image, colour_difference, near_duplicate_pairs

log = logging.getLogger(__name__)

TEXT_ENCODER_TOKENS = 77  # CLIP's context, start and end tokens included
NEAR_DUPLICATE_BITS = 8  # of 64 perceptual-hash bits
NEAR_DUPLICATE_COLOUR = 10.0  # mean 0-255 difference of 8x8 thumbnails; above it the colours differ
# Image formats people drop into datasets that Pillow does not decode: say so instead of ignoring them.
UNSUPPORTED_IMAGES = {".heic", ".heif", ".jxl", ".svg", ".psd", ".raw", ".cr2", ".cr3", ".nef", ".arw",
                      ".dng", ".exr", ".avif"}
LEVELS = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One problem with one file (or the whole folder): what is wrong and what stylelora will do."""

    path: Path
    problem: str
    action: str
    usable: bool  # whether this file is used for training after all
    level: str  # "error" | "warning" | "info"


@dataclass
class DatasetReport:
    folder: Path
    resolution: int
    batch_size: int
    findings: list[Finding] = field(default_factory=list)
    usable: list[Path] = field(default_factory=list)  # the images training will use, in order
    images: list[Path] = field(default_factory=list)  # every file that looked like an image
    token_counter: str = ""  # how caption lengths were counted
    blockers: list[str] = field(default_factory=list)  # why training cannot proceed

    @property
    def can_train(self) -> bool:
        return not self.blockers

    @property
    def skipped(self) -> list[Path]:
        used = set(self.usable)
        return [p for p in self.images if p not in used]

    @property
    def counts(self) -> dict[str, int]:
        levels = Counter(f.level for f in self.findings)
        return {
            "images": len(self.images),
            "usable": len(self.usable),
            "skipped": len(self.skipped),
            "errors": levels["error"],
            "warnings": levels["warning"],
            "infos": levels["info"],
            "files_with_findings": len({f.path for f in self.findings}),
        }

    def findings_for(self, path: Path) -> list[Finding]:
        return [f for f in self.findings if f.path == path]

    def _name(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.folder)) or "."
        except ValueError:
            return str(path)

    def skipped_lines(self) -> list[str]:
        """One line per image training leaves out, saying why (for the training log)."""
        lines = []
        for path in self.skipped:
            why = next((f for f in self.findings_for(path) if not f.usable), None)
            reason = f"{why.problem}; {why.action}" if why else "skipped"
            lines.append(f"skipped {self._name(path)}: {reason}")
        return lines

    def summary(self) -> str:
        c = self.counts
        line = (f"{counted(c['images'], 'image')} found, {c['usable']} usable, {c['skipped']} skipped; "
                f"{counted(c['errors'], 'error')}, {counted(c['warnings'], 'warning')}, {counted(c['infos'], 'note')}")
        if self.can_train:
            return f"{line}\ntraining can proceed with {counted(c['usable'], 'image')}"
        return f"{line}\ntraining cannot proceed: " + "; ".join(self.blockers)

    def to_text(self, min_level: str = "info") -> str:
        """Per file, each problem and what stylelora does about it; then the summary."""
        shown = LEVELS[: LEVELS.index(min_level) + 1]
        by_file: dict[Path, list[Finding]] = {}
        for f in self.findings:
            if f.level in shown:
                by_file.setdefault(f.path, []).append(f)
        lines = [f"dataset {self.folder} (resolution {self.resolution}, batch size {self.batch_size})"]
        for path in sorted(by_file, key=lambda p: (p != self.folder, str(p))):
            lines.append(self._name(path))
            for f in by_file[path]:
                lines.append(f"  {f.level}: {f.problem} -> {f.action}")
        if self.token_counter:
            lines.append(f"caption tokens counted with {self.token_counter}")
        lines.append(self.summary())
        return "\n".join(lines)


def check_dataset(
    folder: str | Path,
    resolution: int = 512,
    batch_size: int = 1,
    *,
    caption_extension: str = ".txt",
    repeats: int = 1,
    trigger_word: str = "",
    model: str | None = None,
    tokenizer: Any = None,
    max_token_length: int = 75,
    token_limit: int | None = None,
) -> DatasetReport:
    """Check every file of ``folder`` for training at ``resolution``; the folder is only read.

    Captions are measured against ``max_token_length`` text tokens (``data.max_token_length``: 75, or
    150/225 encoded in 75-token chunks).

    Caption lengths are counted with ``tokenizer``, else the tokenizer of ``model`` (a model name),
    else the CLIP tokenizer from the local Hugging Face cache, else estimated (and the report says so),
    against ``token_limit``: the text encoder's positions (``BaseModel.token_limit``; CLIP's 77 when
    not given), never the tokenizer's own ``model_max_length``, which may say 8192.
    """
    root = Path(folder)
    report = DatasetReport(root, resolution, batch_size)
    add = report.findings.append
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "no such folder"
        fix = f"point {setting('data.path')} at a folder of images with .txt captions or a metadata.jsonl"
        add(Finding(root, what, fix, False, "error"))
        report.blockers.append(f"{what}; {fix}")
        return report

    files, hidden = _walk(root)
    for path, count in hidden:
        what = "hidden folder" if path.is_dir() else "hidden file"
        inside = f" ({count} image{'s' * (count != 1)} inside)" if path.is_dir() else ""
        add(Finding(path, f"{what}{inside}", "ignored", False, "info"))
    captions = _read_metadata(root, report) if (root / "metadata.jsonl").is_file() else None
    candidates = _image_files(files, captions, report, caption_extension)
    if captions is None:
        _orphan_captions(files, caption_extension, report)

    checks = []
    for path in candidates:
        report.images.append(path)
        check = check_image(path, resolution)
        for p in check.problems:
            add(Finding(path, p.problem, p.action, check.usable, p.level))
        if check.usable:
            checks.append(check)

    def has_caption(path: Path) -> bool:
        return bool(captions.get(path)) if captions is not None else sidecar_path(path, caption_extension).is_file()

    checks = _drop_duplicates(checks, report, has_caption)
    counter = _TokenCounter(tokenizer, model)
    for check in checks:
        if captions is not None:
            caption = captions[check.path]
            notes: list[str] = []
        else:
            caption, notes = _sidecar_caption(check.path, caption_extension, report)
        for note in notes:
            level = "warning" if guessed_encoding(note) else "info"
            add(Finding(check.path, note, "caption used as decoded", True, level))
        if caption:
            _check_length(check.path, with_trigger(caption, trigger_word), counter, report,
                          token_limit or TEXT_ENCODER_TOKENS, max_token_length)
        report.usable.append(check.path)
    report.token_counter = counter.description if counter.used else ""

    _dataset_level(report, repeats)
    report.images.sort()
    return report


def _read_metadata(root: Path, report: DatasetReport) -> dict[Path, str]:
    """Captions of metadata.jsonl by image path; rows that name no image become findings."""
    meta = root / "metadata.jsonl"
    captions: dict[Path, str] = {}
    for row in read_jsonl(root, meta):
        if row.image is None:
            report.findings.append(Finding(meta, f"line {row.lineno}: {row.problem}", "row ignored", False, "warning"))
        else:  # keyed like the walked files (root/relative), so the two compare
            captions.setdefault(root / row.image.relative_to(root.resolve()), row.caption)
    return captions


def _image_files(files: list[Path], captions: dict[Path, str] | None, report: DatasetReport,
                 caption_extension: str = ".txt") -> list[Path]:
    """The images to decode: every visible image file, or with metadata.jsonl the images it lists.

    Files that cannot be candidates (broken links, unsupported formats, unlisted images) become findings.
    """
    add = report.findings.append
    candidates = list(captions) if captions is not None else []
    for path in files:
        suffix = path.suffix.lower()
        if path.is_dir():
            if suffix in IMAGE_SUFFIXES:
                add(Finding(path, "a folder named like an image", "not an image; files inside it are checked "
                            "as a subfolder", False, "warning"))
        elif suffix in IMAGE_SUFFIXES and path.is_symlink() and not path.exists():
            report.images.append(path)
            add(Finding(path, f"broken link to {path.readlink()}", "skipped", False, "error"))
        elif suffix in IMAGE_SUFFIXES and captions is None:
            candidates.append(path)
        elif suffix in IMAGE_SUFFIXES and path not in captions:
            report.images.append(path)
            sidecar = sidecar_path(path, caption_extension)
            if sidecar.is_file():  # a kohya set with a metadata.jsonl beside it: the jsonl alone gives captions
                add(Finding(path, f"not listed in metadata.jsonl, so its caption {sidecar.name} is ignored "
                            "(with a metadata.jsonl in the folder, captions come from it alone)",
                            "not used; add a row for it, or remove metadata.jsonl to use the caption files",
                            False, "warning"))
            else:
                add(Finding(path, "not listed in metadata.jsonl", "not used; add a row for it", False, "warning"))
        elif suffix in IMAGE_SUFFIXES and sidecar_path(path, caption_extension).is_file():
            ignored = sidecar_path(path, caption_extension).name
            add(Finding(path, f"has a caption in metadata.jsonl and in {ignored}",
                        f"used with metadata.jsonl's caption; {ignored} is ignored", True, "info"))
        elif suffix in UNSUPPORTED_IMAGES:
            report.images.append(path)
            add(Finding(path, f"{suffix} images are not supported", "skipped; convert it to PNG or JPEG",
                        False, "error"))
    return candidates


def _orphan_captions(files: list[Path], caption_extension: str, report: DatasetReport) -> None:
    images = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()}
    for path in files:
        if path.suffix.lower() != caption_extension.lower() or not path.is_file() or path.with_suffix("") in images:
            continue
        if path.stem.lower() in DOC_NAMES:
            report.findings.append(Finding(path, "not a caption (no image of this name)", "ignored", False, "info"))
        else:
            report.findings.append(Finding(path, "caption without an image (no image file of the same name)",
                                           "ignored", False, "warning"))


def _walk(root: Path) -> tuple[list[Path], list[tuple[Path, int]]]:
    """Visible files and folders under ``root`` (sorted), and hidden ones with the images they hold."""
    visible: list[Path] = []
    hidden: list[tuple[Path, int]] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(folder.iterdir())
        except OSError as e:
            log.warning("%s: cannot list this folder (%s)", folder, e.strerror or e)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                if entry.is_dir() and not entry.is_symlink():
                    n = sum(1 for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                    hidden.append((entry, n))
                elif entry.suffix.lower() in IMAGE_SUFFIXES:
                    hidden.append((entry, 0))
                continue
            visible.append(entry)
            if entry.is_dir() and not entry.is_symlink():
                stack.append(entry)
    return sorted(visible), hidden


def _drop_duplicates(checks: list[Any], report: DatasetReport, has_caption: Callable[[Path], bool]) -> list[Any]:
    """Keep one of each set of byte-identical images (the first with a caption, else the first); flag near
    duplicates (both stay)."""
    first_of: dict[str, Path] = {}
    for check in checks:
        if check.sha256 not in first_of or (has_caption(check.path) and not has_caption(first_of[check.sha256])):
            first_of[check.sha256] = check.path
    kept = []
    for check in checks:
        original = first_of[check.sha256]
        if original != check.path:
            report.findings.append(Finding(
                check.path, f"exact duplicate of {report._name(original)} (same bytes)",
                f"skipped, so the picture is not trained twice (it is used once, as {report._name(original)})",
                False, "warning"))
        else:
            kept.append(check)
    pairs = near_duplicate_pairs([c.phash for c in kept], NEAR_DUPLICATE_BITS)
    for i, j, distance in pairs:
        a, b = kept[i], kept[j]
        if colour_difference(a.thumb, b.thumb) <= NEAR_DUPLICATE_COLOUR:
            report.findings.append(Finding(
                b.path, f"near duplicate of {report._name(a.path)} (perceptual hash differs in {distance} of 64 bits)",
                "used; remove one if it is a copy, or that picture weighs twice", True, "warning"))
    return kept


def _sidecar_caption(image: Path, extension: str, report: DatasetReport) -> tuple[str, list[str]]:
    sidecar = sidecar_path(image, extension)
    notes: list[str] = []
    if not sidecar.is_file():
        report.findings.append(Finding(image, f"no caption ({sidecar.name} is missing)",
                                       "used with the trigger word alone as its caption", True, "warning"))
        return "", notes
    try:
        caption = read_caption(sidecar, notes)
    except OSError as e:
        report.findings.append(Finding(image, f"caption {sidecar.name} cannot be read ({e.strerror or e})",
                                       "used with the trigger word alone as its caption", True, "warning"))
        return "", notes
    if not caption:
        report.findings.append(Finding(image, f"caption {sidecar.name} is empty",
                                       "used with the trigger word alone as its caption", True, "warning"))
    return caption, notes


class _TokenCounter:
    """Counts caption tokens with a real CLIP tokenizer when one is at hand, else estimates."""

    def __init__(self, tokenizer: Any, model: str | None):
        self._tokenizer = tokenizer
        self._model = model
        self._loaded = tokenizer is not None
        self.used = False
        self.description = "the model's tokenizer" if tokenizer is not None else ""

    def _get(self) -> Any:
        if not self._loaded:
            from ..families import load_tokenizer

            self._loaded = True
            if self._model:
                self._tokenizer = load_tokenizer(self._model)
                self.description = f"the tokenizer of {self._model}"
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer("openai/clip-vit-large-patch14")
                self.description = "the CLIP tokenizer from the local Hugging Face cache"
            if self._tokenizer is None:
                self.description = (f"an estimate (no CLIP tokenizer on this machine; name a local model in "
                                    f"{setting('model.name')} to count exactly)")
        return self._tokenizer

    def split(self, text: str, limit: int) -> tuple[int, str, bool]:
        """(tokens including start/end, the text past ``limit`` tokens, whether the count is exact)."""
        self.used = True
        tokenizer = self._get()
        if tokenizer is not None:
            ids = tokenizer(text, truncation=False, verbose=False).input_ids
            cut = tokenizer.decode(ids[limit - 1 : -1]) if len(ids) > limit else ""
            return len(ids), cut, True
        # CLIP splits words, digits and punctuation apart, and long words into several pieces.
        pieces = [(m.start(), max(1, math.ceil(len(m.group()) / 6)))
                  for m in re.finditer(r"[^\W\d_]+|\d|[^\w\s]+", text)]
        running, cut = 1, ""  # the start token
        for start, n in pieces:
            running += n
            if running > limit - 1:  # the end token takes the last place
                cut = text[text.rfind(" ", 0, start) + 1 :]  # from the start of that word
                break
        return 2 + sum(n for _, n in pieces), cut, False


def _check_length(image: Path, caption: str, counter: _TokenCounter, report: DatasetReport, window: int,
                  max_token_length: int = 75) -> None:
    # what text.token_ids keeps: max_token_length text tokens in pieces of window - 2, each with start and end
    pieces = max(1, -(-max_token_length // (window - 2)))
    limit = pieces * (window - 2) + 2
    tokens, cut, exact = counter.split(caption, limit)
    if tokens <= limit:
        return
    count = f"{tokens} tokens" if exact else f"about {tokens} tokens (estimated)"
    shown = cut if len(cut) <= 80 else f"{cut[:50]} ... {cut[-25:]}"
    reads = (f"the text encoder reads {limit} (start and end included)" if max_token_length == 75 else
             f"data.max_token_length {max_token_length} reads {limit} (start and end included)")
    longer = "; data.max_token_length=150 or 225 keeps longer captions" if max_token_length < 225 else ""
    report.findings.append(Finding(
        image, f"caption is {count}; {reads}", f"used; the end is cut off: \"{shown}\"{longer}", True, "warning"))


def _dataset_level(report: DatasetReport, repeats: int) -> None:
    root = report.folder
    n = len(report.usable)
    if not report.images:
        reason = (f"no images found ({', '.join(sorted(IMAGE_SUFFIXES))}); put the images in this folder with a "
                  "same-name .txt caption next to each")
    elif n == 0:
        reason = f"none of the {len(report.images)} images can be used; fix or replace the files listed above"
    elif n * repeats < report.batch_size:
        reason = (f"{n} usable image{'s' * (n != 1)} cannot fill one batch of {report.batch_size}; lower the "
                  f"batch size to {n * repeats} or fewer, or add images")
    else:
        return
    report.blockers.append(reason)
    report.findings.append(Finding(root, reason, "training will not start", False, "error"))


def training_items(
    data: DataConfig, batch_size: int, *, model: str | None = None, tokenizer: Any = None,
    token_limit: int | None = None,
) -> tuple[list[Item], DatasetReport]:
    """The captioned images a run trains on: the dataset's usable images, and the report behind them.

    Raises :class:`DataError` with the reasons when training cannot proceed.
    """
    report = check_dataset(data.path, data.resolution, batch_size, caption_extension=data.caption_extension,
                           repeats=data.repeats, trigger_word=data.trigger_word, model=model, tokenizer=tokenizer,
                           max_token_length=data.max_token_length, token_limit=token_limit)
    if not report.can_train:
        errors = [f"  {report._name(f.path)}: {f.problem}" for f in report.findings
                  if f.level == "error" and f.path != report.folder]
        shown = "\n".join(errors[:10]) + (f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else "")
        raise DataError(f"dataset '{data.path}': " + "; ".join(report.blockers) + (f"\n{shown}" if shown else "")
                        + (f"\n(stylelora check-data {data.path} explains every file)" if report.images else ""))
    usable = {p.resolve() for p in report.usable}
    items = [item for item in scan(data.path, data.caption_extension) if item.image.resolve() in usable]
    return items, report
