"""Evaluate a run's checkpoints: render the evaluation set with each one through a Previewer (the base model is
loaded once, or is the training model already in memory), embed the images with the descriptor, score them,
pick the best, and write it all into the run folder:

    eval/evalset.json          the prompts, seeds and settings (fixed for the run)
    eval/base/*.png            the base model's images, rendered once per run
    eval/step-000250/*.png     each checkpoint's images
    eval/scores.json           every checkpoint's scores, the rule and the best checkpoint
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..core import events, fileio
from ..core.config import Config
from ..core.errors import ConfigError
from ..core.metrics import METRICS_FILE
from ..data import images as image_files
from ..preview.previewer import AdapterSource, Previewer
from .checkpoints import SavedCheckpoint, run_checkpoints, run_config, select
from .descriptors import Descriptor, Embeddings
from .evalset import EVAL_DIR, EvalSet, build_evalset, training_images
from .learned import load_descriptor
from .scores import CheckpointScores, Scorer, format_table, pick_best, rule_text

log = logging.getLogger(__name__)
SCORES_FILE = "scores.json"
BASE_DIR = "base"


@dataclass
class RunScores:
    """A run's scores as ``eval/scores.json`` holds them: the base row, one row per checkpoint, the best."""

    run_dir: Path
    descriptor: str
    rule: str
    base: CheckpointScores
    checkpoints: list[CheckpointScores] = field(default_factory=list)

    @property
    def best(self) -> CheckpointScores | None:
        return next((r for r in self.checkpoints if r.best), None)

    def table(self) -> str:
        best = self.best
        footer = (f"best: {best.label} ({self.rule})" if best else "best: none scored yet")
        return f"{format_table([self.base, *self.checkpoints])}\n{footer}"

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"descriptor": self.descriptor, "rule": self.rule, "best": best.label if best else None,
                "base": self.base.to_dict(), "checkpoints": [r.to_dict() for r in self.checkpoints]}

    def save(self) -> Path:
        path = self.run_dir / EVAL_DIR / SCORES_FILE
        fileio.write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> RunScores | None:
        """The scores written in ``run_dir``, or None when it has none (or they cannot be read)."""
        path = Path(run_dir).expanduser() / EVAL_DIR / SCORES_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = [CheckpointScores.from_dict(r) for r in data["checkpoints"]]
            return cls(Path(run_dir), data["descriptor"], data["rule"], CheckpointScores.from_dict(data["base"]), rows)
        except (OSError, ValueError, KeyError, TypeError):
            return None


def validation_losses(run_dir: Path) -> dict[int, float]:
    """The validation loss of each step that has one, from the run's metrics.jsonl."""
    losses: dict[int, float] = {}
    try:
        lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return losses
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "val_loss" in record and "step" in record:
            losses[int(record["step"])] = float(record["val_loss"])
    return losses


class Evaluator:
    """One run's evaluation: its set, its descriptor, the training images' and base images' embeddings (made once),
    and the scores so far. ``score`` renders and scores one adapter."""

    def __init__(self, run_dir: str | Path, previewer: Previewer, config: Config | None = None,
                 descriptor: Descriptor | None = None) -> None:
        self.run_dir = Path(run_dir).expanduser()
        self.config = config or run_config(self.run_dir)
        self.previewer = previewer
        self.folder = self.run_dir / EVAL_DIR
        captions, references = training_images(self.config)
        self.evalset = build_evalset(self.config, captions)
        self.descriptor = descriptor or load_descriptor(self.config.eval.descriptor, previewer.device)
        stored = EvalSet.load(self.folder)
        if stored is None or stored.to_dict() != self.evalset.to_dict():  # a new set: earlier images do not compare
            shutil.rmtree(self.folder, ignore_errors=True)
            self.evalset.save(self.folder)
        self.rows = self.evalset.rows()
        self.copy_threshold = self.config.eval.copy_threshold or self.descriptor.copy_threshold
        self.rule = rule_text(self.config.eval.min_content, self.copy_threshold)
        # one text embedding per transfer row (the prompt without the trigger), as the Scorer compares them
        transfer = [self.evalset.images[i][0].plain for i in self.rows.transfer]
        text = self.descriptor.text(transfer) if transfer else None
        base_images = self._base_images()
        self.scorer = Scorer(self.descriptor.embed(references), self.descriptor.embed(base_images), self.rows,
                             self.copy_threshold, text, self.descriptor.image_text(base_images))
        earlier = RunScores.load(self.run_dir)
        self.scores = RunScores(self.run_dir, self.descriptor.name, self.rule, self.scorer.base_scores)
        self.scored_at = 0.0  # when the rows kept from an earlier evaluation were written
        if earlier is not None and earlier.descriptor == self.descriptor.name and earlier.rule == self.rule:
            self.scores.checkpoints = earlier.checkpoints
            self.scored_at = (self.folder / SCORES_FILE).stat().st_mtime

    def up_to_date(self, checkpoint: SavedCheckpoint) -> bool:
        """Whether ``checkpoint`` has a row of this set, rule and descriptor written after its adapter file (a run
        rewound and trained again past that step has a newer file under the same step)."""
        try:
            saved = checkpoint.source.file.stat().st_mtime
        except OSError:
            return False
        return saved < self.scored_at and any(r.step == checkpoint.step for r in self.scores.checkpoints)

    def _base_images(self) -> list[Image.Image]:
        """The base model's images of the set: from the run folder when they were rendered before."""
        folder = self.folder / BASE_DIR
        paths = [folder / EvalSet.file_name(p, seed) for p, seed in self.evalset.images]
        if all(path.is_file() for path in paths):
            return [Image.open(path).convert("RGB") for path in paths]
        rendered = [self.previewer.base(p.text, self.evalset.settings(seed)) for p, seed in self.evalset.images]
        for image, path in zip(rendered, paths, strict=True):
            image_files.save_png(image, path)
        return rendered

    def render(self, source: str | Path | AdapterSource, scale: float = 1.0) -> list[Image.Image]:
        """The set's images with one adapter at ``scale`` (attached under its own name; the base stays loaded)."""
        name = self.previewer.attach(source)
        try:
            return [self.previewer.generate(p.text, self.evalset.settings(seed), adapter=name, scale=scale)
                    for p, seed in self.evalset.images]
        finally:
            self.previewer.detach(name)  # one checkpoint's layers at a time, whatever the run's length

    def score_images(self, images: Sequence[Image.Image], label: str, step: int,
                     scale: float = 1.0) -> CheckpointScores:
        return self.scorer.score(self.descriptor.embed(images), label, step, self.descriptor.image_text(images), scale)

    def score(self, checkpoint: SavedCheckpoint, scale: float = 1.0, keep: bool = True) -> CheckpointScores:
        """Render and score one checkpoint; with ``keep`` (at strength 1) its images and row go into the run folder."""
        images = self.render(checkpoint.source, scale)
        row = self.score_images(images, checkpoint.label, checkpoint.step, scale)
        if keep and scale == 1.0:
            row.val_loss = validation_losses(self.run_dir).get(checkpoint.step)
            for image, (p, seed) in zip(images, self.evalset.images, strict=True):
                image_files.save_png(image, self.folder / checkpoint.label / EvalSet.file_name(p, seed))
            rows = [r for r in self.scores.checkpoints if r.step != checkpoint.step] + [row]
            self.scores.checkpoints = sorted(rows, key=lambda r: r.step)
            pick_best(self.scores.checkpoints, self.config.eval.min_content)
            self.scores.save()
        return row

    def embed(self, images: Sequence[Image.Image]) -> Embeddings:
        return self.descriptor.embed(images)


def evaluate_run(run_dir: str | Path, checkpoints: Sequence[str] | None = None, *, previewer: Previewer | None = None,
                 overrides: dict[str, Any] | None = None,
                 on_event: Callable[[events.Event], None] | None = None) -> RunScores:
    """Score the checkpoints of a run (those not scored yet or saved again since; or those named: ``step-000100``
    or ``100``), print nothing, and write the images and ``eval/scores.json``; returns every score the run has,
    the best marked.
    ``overrides`` changes eval settings (``{"eval.descriptor": "clip"}``); ``previewer`` reuses a loaded base."""
    run = Path(run_dir).expanduser()
    config = run_config(run)
    if overrides:
        config = config.with_overrides(overrides)
    chosen = run_checkpoints(run)
    if checkpoints:
        chosen = select(chosen, list(checkpoints))
    m = config.model
    descriptor = load_descriptor(config.eval.descriptor, previewer.device if previewer else None)  # fails fast
    previewer = previewer or Previewer(m.name, config_source=m.config, prediction_type=m.prediction_type)
    evaluator = Evaluator(run, previewer, config, descriptor)
    for checkpoint in chosen:
        if not checkpoints and evaluator.up_to_date(checkpoint):  # a second evaluation scores only what is new
            continue
        row = evaluator.score(checkpoint)
        if on_event is not None:
            best = evaluator.scores.best
            on_event(events.Evaluated(row.step, row.label, row.record(), best.label if best else "",
                                      run / EVAL_DIR / SCORES_FILE))
    return evaluator.scores


def chosen_checkpoint(run_dir: str | Path, which: str) -> SavedCheckpoint:
    """The checkpoint ``which`` names in a run: ``best`` (the best of its scores, eval/scores.json), a step
    (``250``) or a label (``step-000250``). ConfigError says what is missing."""
    checkpoints = run_checkpoints(run_dir)
    if which.strip() != "best":
        return select(checkpoints, [which])[0]
    scores = RunScores.load(run_dir)
    best = scores.best if scores is not None else None
    if best is None:
        raise ConfigError(f"{run_dir}: no best checkpoint yet: this run has not been evaluated; score its "
                          f"checkpoints first (`eval.every_save=true` while training, or evaluate the run)")
    return select(checkpoints, [best.label])[0]
