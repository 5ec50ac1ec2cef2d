"""The scores of one checkpoint, computed from the embeddings of its evaluation images, the base model's images
at the same prompts and seeds, and the training images; the rule that picks the best checkpoint; the table.

Every score is a plain number a user can read (see ``MEANINGS``): style 0 is the base model, 1 the training
images themselves; content kept 1 is the base image's layout intact, 0 no more alike than an unrelated picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch

from .descriptors import Embeddings

# One line per score, for the README, the app and ``stylelora evaluate``'s legend.
MEANINGS = {
    "style": "how close the images' style is to the training images': 0 = the base model's, 1 = the training "
             "images' own (style and transfer prompts)",
    "content": "on the transfer prompts, how much of the base image's subject and layout survives: 1 = all of it, "
               "0 = no more than in an unrelated picture (another seed's)",
    "copying": "the highest similarity of any evaluation image to a single training image; flagged (!) above the "
               "descriptor's threshold (memorised training images)",
    "leak": "the style score of the transfer prompts without the trigger word: 0 = the style stays behind the "
            "trigger, 1 = it comes without it",
    "variety": "how different the seeds' images of one prompt are, against the base model's: 1 = as varied, "
               "0 = every seed the same picture",
    "prompt": "with a CLIP descriptor, how well the transfer images match their prompt (cosine of image and text "
              "embeddings; compare with the base row)",
    "val_loss": "the validation loss at that step (train.validation_images)",
}
UNRELATED_LIMIT = 0.9  # base images of different seeds or prompts more alike than this: no baseline
COLUMNS = ("style", "content", "copying", "leak", "variety", "prompt", "val_loss")


@dataclass
class CheckpointScores:
    """One row of the table: a checkpoint (or the base model, ``step`` 0 and label ``base``)."""

    label: str
    step: int
    style: float | None = None
    content: float | None = None
    copying: float | None = None
    copied: bool = False
    leak: float | None = None
    variety: float | None = None
    prompt: float | None = None
    val_loss: float | None = None
    best: bool = False
    scale: float = 1.0  # the strength the adapter was rendered at

    def to_dict(self) -> dict[str, object]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CheckpointScores:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})  # type: ignore[arg-type]

    def record(self) -> dict[str, float]:
        """The scores as metrics (``eval/style``, ...): what metrics.jsonl and the trackers get."""
        values = {name: getattr(self, name) for name in COLUMNS if name != "val_loss"}
        record = {f"eval/{k}": float(v) for k, v in values.items() if v is not None}
        record["eval/copied"] = float(self.copied)
        return record


@dataclass
class Rows:
    """Which rows of the evaluation images (as ``EvalSet.images`` orders them) belong to which prompts."""

    style: list[int]  # style and transfer prompts: where the style should show
    transfer: list[int]
    leak: list[int]
    groups: list[list[int]]  # the rows of one prompt, one per seed


def _mean_distance(style: torch.Tensor, centre: torch.Tensor) -> float:
    return float((style - centre).norm(dim=1).mean())


class Scorer:
    """Scores image sets against one training set and one base model's images."""

    def __init__(self, reference: Embeddings, base: Embeddings, rows: Rows, copy_threshold: float,
                 text: torch.Tensor | None = None, base_text_images: torch.Tensor | None = None) -> None:
        self.reference, self.base, self.rows = reference, base, rows
        self.copy_threshold = copy_threshold
        self.centre = reference.style.mean(0)
        self.train_distance = _mean_distance(reference.style, self.centre)
        self.text = text  # one text embedding per transfer row, the prompt without the trigger word
        self.unrelated = _unrelated(base.content, rows)
        self.base_scores = self.score(base, "base", 0, base_text_images)

    def style_score(self, images: Embeddings, rows: Sequence[int]) -> float | None:
        """0 = the base model's images at these rows, 1 = the training images (their mean distance to the
        training set's centre of style)."""
        if not rows:
            return None
        index = torch.as_tensor(list(rows), dtype=torch.long)
        base = _mean_distance(self.base.style[index], self.centre)
        span = base - self.train_distance
        if span <= 1e-6:  # the base images already sit as close to the style as the training images do
            return None
        return (base - _mean_distance(images.style[index], self.centre)) / span

    def score(self, images: Embeddings, label: str, step: int, text_images: torch.Tensor | None = None,
              scale: float = 1.0) -> CheckpointScores:
        rows = self.rows
        copying = float((images.copy @ self.reference.copy.T).max()) if len(images) and len(self.reference) else None
        return CheckpointScores(
            label, step,
            style=self.style_score(images, rows.style),
            content=self._content(images),
            copying=copying,
            copied=copying is not None and copying > self.copy_threshold,
            leak=self.style_score(images, rows.leak),
            variety=self._variety(images),
            prompt=self._prompt(text_images),
            scale=scale,
        )

    def _content(self, images: Embeddings) -> float | None:
        if not self.rows.transfer:
            return None
        index = torch.as_tensor(self.rows.transfer, dtype=torch.long)
        kept = float((images.content[index] * self.base.content[index]).sum(1).mean())
        return min(1.0, max(0.0, (kept - self.unrelated) / (1 - self.unrelated)))

    def _variety(self, images: Embeddings) -> float | None:
        own, base = _spread(images.copy, self.rows.groups), _spread(self.base.copy, self.rows.groups)
        if own is None or base is None or base <= 1e-9:
            return None
        return own / base

    def _prompt(self, text_images: torch.Tensor | None) -> float | None:
        if self.text is None or text_images is None or not self.rows.transfer:
            return None
        index = torch.as_tensor(self.rows.transfer, dtype=torch.long)
        return float((text_images[index] * self.text).sum(1).mean())


def _unrelated(content: torch.Tensor, rows: Rows) -> float:
    """How alike two unrelated base images are: the mean similarity of the transfer prompts' base images at
    different seeds (another starting noise, another picture), else of different prompts. Where even those are
    near copies of each other (a model that hardly listens to prompts), no likeness counts as kept content."""
    prompt_of = {i: next(n for n, g in enumerate(rows.groups) if i in g) for i in rows.transfer}
    pairs = [(a, b) for a in rows.transfer for b in rows.transfer if a < b]
    apart = [(a, b) for a, b in pairs if prompt_of[a] == prompt_of[b]]  # the same prompt, another seed
    chosen = apart or pairs
    if not chosen:
        return 0.0
    sims = [float(content[a] @ content[b]) for a, b in chosen]
    unrelated = sum(sims) / len(sims)
    return unrelated if unrelated < UNRELATED_LIMIT else 0.0


def _spread(copy: torch.Tensor, groups: list[list[int]]) -> float | None:
    """The mean dissimilarity of the images of one prompt (its seeds), over the prompts."""
    values = []
    for group in groups:
        if len(group) < 2:
            continue
        x = copy[torch.as_tensor(group, dtype=torch.long)]
        sims = x @ x.T
        n = len(group)
        values.append(1 - float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))))
    return sum(values) / len(values) if values else None


# --- the best checkpoint -------------------------------------------------------------------------------------


def rule_text(min_content: float, copy_threshold: float) -> str:
    return (f"the highest style among checkpoints that keep content >= {min_content:g} and copy <= "
            f"{copy_threshold:g}; when none does, the one keeping the most content among those that do not copy, "
            "else the one that copies least")


def pick_best(rows: Sequence[CheckpointScores], min_content: float) -> CheckpointScores | None:
    """The best checkpoint by the stated rule (``rule_text``); ties go to the earlier step. Marks it ``best``."""
    for row in rows:
        row.best = False
    candidates = [r for r in rows if r.label != "base"]
    if not candidates:
        return None
    honest = [r for r in candidates if not r.copied]
    keeping = [r for r in honest if r.style is not None and (r.content is None or r.content >= min_content)]
    if keeping:
        best = max(keeping, key=lambda r: (r.style, -r.step))
    elif honest:
        best = max(honest, key=lambda r: (_or(r.content, -math.inf), -r.step))
    else:
        best = min(candidates, key=lambda r: (_or(r.copying, math.inf), r.step))
    best.best = True
    return best


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


# --- the table -----------------------------------------------------------------------------------------------


def format_table(rows: Sequence[CheckpointScores], first: str = "checkpoint") -> str:
    """The scores as an aligned text table, the best row marked with ``*`` and a copying flag with ``!``; columns
    no row has a value for are left out."""
    shown = [c for c in COLUMNS if any(getattr(r, c) is not None for r in rows)]
    header = [first, "step", *shown]
    lines = [header]
    for r in rows:
        cells = [r.label + (" *" if r.best else ""), str(r.step) if r.label != "base" else "-"]
        for c in shown:
            value = getattr(r, c)
            text = "-" if value is None else (f"{value:.4f}" if c == "val_loss" else f"{value:.2f}")
            cells.append(text + ("!" if c == "copying" and r.copied else ""))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths, strict=True))).rstrip() for line in lines)
