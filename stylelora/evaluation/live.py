"""``eval.every_save``: score each checkpoint as training saves it, with the model already in memory.

A Previewer over the training model (never a second load) attaches the adapter file the save just wrote beside
the run's own LoRA layers, and renders with only that adapter on (strength 1) or none (the base model: strength
0 switches every LoRA layer off). Nothing of the run changes: its layers' active adapters, which weights train,
the networks' train/eval modes, the pipeline's scheduler and every random stream are put back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from ..core.config import Config
from ..model.base import BaseModel
from ..preview.previewer import AdapterSource, Previewer
from .checkpoints import SavedCheckpoint, label_of
from .evalset import EVAL_DIR
from .runner import SCORES_FILE, Evaluator
from .scores import CheckpointScores


@contextlib.contextmanager
def borrowed(model: BaseModel) -> Iterator[None]:
    """Lend a training model to the evaluation: in eval mode and without gradients within the block, and exactly
    as it was after it (modes, trainable weights, each adapter layer's active adapters and on/off switch, the
    pipeline's scheduler, the random streams)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = [module for _, module in model.parts()] + [model.vae]
    modes = {m: m.training for module in modules for m in module.modules()}
    trainable = {p: p.requires_grad for module in modules for p in module.parameters()}
    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    switches = {layer: (list(layer.active_adapters), layer.disable_adapters) for layer in layers}
    scheduler = model.pipeline.scheduler
    devices = [model.denoiser.device] if model.denoiser.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for module in modules:
            module.eval()
        try:
            yield
        finally:
            model.pipeline.scheduler = scheduler
            for layer, (active, disabled) in switches.items():
                layer.set_adapter(active)
                layer.enable_adapters(not disabled)
            for m, mode in modes.items():
                m.train(mode)
            for p, flag in trainable.items():
                p.requires_grad_(flag)


class LiveEvaluation:
    """Scores the adapter files a run saves (``__call__``), through one Previewer over the training model; the
    evaluation set, the training images' embeddings and the base images are made at the first save."""

    def __init__(self, config: Config, model: BaseModel, run_dir: Path) -> None:
        self.config, self.model, self.run_dir = config, model, run_dir
        self.evaluator: Evaluator | None = None

    def __call__(self, step: int, adapter_file: Path) -> tuple[CheckpointScores, CheckpointScores | None, Path]:
        """(the scores of the adapter saved at ``step``, the best checkpoint so far, the scores file)."""
        with borrowed(self.model), torch.no_grad():
            if self.evaluator is None:
                self.evaluator = Evaluator(self.run_dir, Previewer(self.model, fuse=False), self.config)
            label = label_of(step)
            row = self.evaluator.score(SavedCheckpoint(label, step, AdapterSource(adapter_file, label)))
        scores = self.evaluator.scores
        return row, scores.best, scores.run_dir / EVAL_DIR / SCORES_FILE
