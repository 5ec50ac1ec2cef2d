"""A run's live state and its resumable checkpoints (the folders: ``adapters.checkpoint_files``).

``snapshot()`` and ``restore()`` move a run between its live objects (``LiveState``) and such a folder.
Under several processes every process calls both: only the main one writes, and each reads its own RNG.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..adapters.checkpoint_files import (
    TrainingState,
    checkpoint_dir,
    discard_after,
    load_checkpoint,
    newest_complete,
    prune_checkpoints,
    save_checkpoint,
)
from ..core import events
from ..core.config import TrainConfig
from ..core.errors import ConfigError, continue_run, setting
from ..model.base import BaseModel
from ..model.lora import lora_alphas, lora_state, set_lora_state
from .processes import Processes

if TYPE_CHECKING:
    from .ema import LoraEMA

def capture_rng(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The random streams of this process that the loop draws from in sequence: torch's global one and
    the GPU's (LoRA dropout). Noise, timesteps, crops and flips are keyed by example, not drawn in turn."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda", state.get("cuda0"))  # cuda0: checkpoints that stored every GPU's stream
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def _rng_of_ranks(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One dict of every process's streams: the main one's as a single process saves them, rank r's as rank<r>.*"""
    return {(f"rank{rank}.{k}" if rank else k): v for rank, state in enumerate(per_rank) for k, v in state.items()}


def _rng_of(rng: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Process ``rank``'s streams in a checkpoint (empty when the run had fewer processes)."""
    if rank == 0:
        return {k: v for k, v in rng.items() if not k.startswith("rank")}
    prefix = f"rank{rank}."
    return {k.removeprefix(prefix): v for k, v in rng.items() if k.startswith(prefix)}


# --- a run's live objects <-> a checkpoint folder --------------------------------------------------


class DataPosition(Protocol):
    """Where the batch stream is (``batches.BatchSource``): saved as a dict, restored from one."""

    def state(self) -> dict[str, int]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


@dataclass
class LiveState:
    """The objects a checkpoint captures, as the training loop holds them.

    ``optimizer`` may be accelerate's wrapper (its ``.optimizer`` names the class); ``processes`` says
    which process this is (the main one writes). ``restore()`` sets ``resumed_from``, so the first
    ``snapshot()`` of a run that has not moved since does not rewrite that very folder.
    """

    run_dir: Path
    model: BaseModel
    optimizer: Any
    lr_scheduler: Any
    data: DataPosition
    ema: LoraEMA | None = None
    processes: Processes = field(default_factory=Processes)
    resumed_from: Path | None = None

    @property
    def optimizer_class(self) -> str:
        return type(getattr(self.optimizer, "optimizer", self.optimizer)).__name__

    def averaged(self) -> AbstractContextManager[None]:
        """Within the block the model holds the EMA weights when EMA is on (samples, validation, export)."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()


def snapshot(live: LiveState, step: int, elapsed_s: float, keep: int, on_event: events.EventHandler) -> Path | None:
    """Save everything a run needs to go on exactly (LoRA weights and alphas, EMA, optimizer, schedule,
    RNG, data position, time spent) as ``checkpoints/step-NNNNNN``, then keep only the newest ``keep``.

    Every process calls it (each hands over its RNG streams); only the main one writes. Returns the
    folder, or None in the other processes and when the run has not moved since it resumed from that folder.
    """
    folder = checkpoint_dir(live.run_dir, step)
    if live.resumed_from is not None and folder.resolve() == live.resumed_from.resolve():
        return None  # no step since resuming from this very folder: it already holds this state
    rng = live.processes.gather(capture_rng(live.processes.device))
    if not live.processes.is_main:
        return None
    ema_state = None
    if live.ema is not None:
        with live.ema.applied():
            ema_state = lora_state(live.model)
    position = live.data.state()
    state = TrainingState(
        step=step,
        epoch=position["epoch"],
        batch=position["batch"],
        lora=lora_state(live.model),
        optimizer=live.optimizer.state_dict(),
        lr_scheduler=live.lr_scheduler.state_dict(),
        rng=_rng_of_ranks(rng),
        extra={"optimizer": live.optimizer_class, "elapsed_s": elapsed_s,
               "ema_steps": live.ema.steps if live.ema is not None else 0, "data": position},
        ema=ema_state,
        alphas=lora_alphas(live.model),
    )
    save_checkpoint(folder, state)
    prune_checkpoints(live.run_dir, keep)
    on_event(events.CheckpointSaved(step, folder))
    return folder


def restore(
    live: LiveState, folder: Path | None, train: TrainConfig, on_event: events.EventHandler
) -> tuple[int, float]:
    """Load the checkpoint ``folder`` (from ``find_resume``) into the live objects; the checkpoints after
    it are removed, since the run goes on from there. Returns (step, seconds trained before), which is
    (0, 0.0) without a checkpoint. One saved with other settings than ``train`` and the model's LoRA
    raises ConfigError saying which.
    """
    if folder is None:
        if train.resume == "auto":
            on_event(events.Message(f"no checkpoint in {live.run_dir}; starting from step 0"))
        return 0, 0.0
    state = load_checkpoint(folder)
    if state.extra.get("optimizer", live.optimizer_class) != live.optimizer_class:
        raise ConfigError(
            f"train.optimizer: {folder} was trained with {state.extra['optimizer']}, this config asks "
            f"for {train.optimizer}; resume with the run's own config.toml"
        )
    try:
        if live.ema is not None:  # the saved average, or (EMA newly turned on) the weights themselves
            set_lora_state(live.model, state.ema if state.ema is not None else state.lora)
            live.ema.reset_from_params(int(state.extra.get("ema_steps", 0)) if state.ema is not None else 0)
        set_lora_state(live.model, state.lora)
        live.optimizer.load_state_dict(state.optimizer)
    except (RuntimeError, ValueError, KeyError) as e:  # shapes or parameter groups differ from this config's
        raise ConfigError(mismatched_checkpoint(folder, live.run_dir, e)) from e
    live.lr_scheduler.load_state_dict(state.lr_scheduler)
    restore_rng(_rng_of(state.rng, live.processes.rank), live.processes.device)
    live.data.load_state(state.extra.get("data") or {"epoch": state.epoch, "batch": state.batch})
    live.resumed_from = folder
    on_event(events.Message(f"resumed from {folder} at step {state.step}"))
    if not live.processes.is_main:
        return state.step, float(state.extra.get("elapsed_s", 0.0))
    discarded = discard_after(live.run_dir, state.step)
    if discarded:
        on_event(events.Message(f"rewound to step {state.step}: removed the later checkpoints "
                                + ", ".join(p.name for p in discarded), level="warning"))
    return state.step, float(state.extra.get("elapsed_s", 0.0))


def find_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint ``train.resume`` names: "auto" is the newest complete one of ``run_dir`` (None
    when there is none; leftovers of a killed save are never picked), "" is none, else a folder.
    It only reads: every process of a run looks, and the main one then clears leftovers (``remove_stale``)."""
    if not resume:
        return None
    if resume == "auto":
        return newest_complete(run_dir)
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"train.resume: '{resume}' is not a checkpoint folder (no state.json inside)")
    return path  # a damaged one fails in load_checkpoint, naming what is wrong


def mismatched_checkpoint(checkpoint: Path, out: Path, error: Exception) -> str:
    """A checkpoint whose LoRA weights or optimizer groups do not fit the config being resumed."""
    text = str(error)
    if "size mismatch" in text:
        why = "its LoRA weights have other shapes (was lora.rank different?)"
    elif "parameter group" in text or "doesn't match the size" in text:
        why = (f"its optimizer trained other weights (was {setting('lora.train_text_encoder')}, or the target "
               "modules, different?)")
    else:
        why = f"it does not fit this model ({text.splitlines()[0] if text else type(error).__name__})"
    return (f"train.resume: the checkpoint {checkpoint} was saved with other LoRA settings: {why}. Resume with "
            f"the run's own settings ({continue_run(out / 'config.toml')}), or start a new run in a new "
            f"{setting('train.output_dir')}")
