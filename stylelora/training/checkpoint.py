"""Resumable training state, stored as safetensors + JSON only (nothing is ever unpickled).

A checkpoint folder ``checkpoints/step-NNNNNN/`` holds:
- ``lora.safetensors``: canonical LoRA weights (fp32), keys ``unet.<path>`` / ``text_encoder.<path>``, and
  every module's alpha as a scalar ``<part>.<module path>.alpha`` (float64), so the file reads as an
  adapter with ``formats.load_adapter`` (checkpoints from before the alphas were stored lack them);
- ``optimizer.safetensors``: every tensor of the optimizer state, plus its non-tensor state as JSON;
- ``ema.safetensors`` (only when EMA is on): the averaged LoRA weights, keyed as ``lora.safetensors``;
- ``state.json``: step, data position, LR-scheduler state, RNG states (of every process of a run
  that several processes trained: ``rank1.torch``, ...), and a completeness marker.
It is written into a temporary folder and renamed, so a folder named ``step-*`` is always complete.

``snapshot()`` and ``restore()`` move a run between its live objects (``LiveState``) and such a folder.
Under several processes every process calls both: only the main one writes, and each reads its own RNG.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ..core import events, fileio
from ..core.config import TrainConfig
from ..core.errors import ConfigError, TrainingError, continue_run, setting
from ..model.models import BaseModel, lora_alphas, lora_state, set_lora_state
from .processes import Processes

if TYPE_CHECKING:
    from .ema import LoraEMA

STEP_DIR = re.compile(r"^step-(\d{6,})$")
ALPHA_SUFFIX = ".alpha"  # a module's alpha in lora.safetensors: <part>.<module path>.alpha, as diffusers files


@dataclass
class TrainingState:
    step: int
    epoch: int
    batch: int
    lora: dict[str, dict[str, torch.Tensor]]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]
    extra: dict[str, Any]
    ema: dict[str, dict[str, torch.Tensor]] | None = None
    alphas: dict[str, dict[str, float]] | None = None  # per part, per module path; None in older checkpoints


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _encode_rng(rng: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: base64.b64encode(v.cpu().numpy().tobytes()).decode() for k, v in rng.items()}


def _decode_rng(rng: dict[str, str]) -> dict[str, torch.Tensor]:
    return {
        k: torch.frombuffer(bytearray(base64.b64decode(v)), dtype=torch.uint8).clone()
        for k, v in rng.items()
    }


def save_checkpoint(folder: Path, state: TrainingState) -> Path:
    """Write ``folder`` (e.g. run/checkpoints/step-000100) atomically."""
    lora = _flatten_parts(state.lora) | _alpha_tensors(state.alphas or {})
    opt_tensors, opt_meta = _flatten_optimizer(state.optimizer)
    with fileio.atomic_dir(folder) as tmp:
        # Written from Python (not safetensors' own writer) so a full disk raises OSError(ENOSPC).
        (tmp / "lora.safetensors").write_bytes(save(lora))
        (tmp / "optimizer.safetensors").write_bytes(save(opt_tensors))
        if state.ema is not None:
            (tmp / "ema.safetensors").write_bytes(save(_flatten_parts(state.ema)))
        meta = {
            "step": state.step,
            "epoch": state.epoch,
            "batch": state.batch,
            "optimizer": opt_meta,
            "lr_scheduler": state.lr_scheduler,
            "rng": _encode_rng(state.rng),
            "extra": state.extra,
            "ema": state.ema is not None,
            "complete": True,
        }
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def load_checkpoint(folder: Path) -> TrainingState:
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        flat = load_file(str(folder / "lora.safetensors"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
        ema = _unflatten_parts(load_file(str(folder / "ema.safetensors"))) if meta.get("ema") else None
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise TrainingError(f"{folder}: not a complete stylelora checkpoint ({e}); pick an earlier one") from None
    if not meta.get("complete"):
        raise TrainingError(f"{folder}: checkpoint is incomplete; pick an earlier one")
    alphas = _unflatten_parts({k: v for k, v in flat.items() if k.endswith(ALPHA_SUFFIX)})
    lora = _unflatten_parts({k: v for k, v in flat.items() if not k.endswith(ALPHA_SUFFIX)})
    return TrainingState(
        step=meta["step"],
        epoch=meta["epoch"],
        batch=meta["batch"],
        lora=lora,
        optimizer=_unflatten_optimizer(opt_tensors, meta["optimizer"]),
        lr_scheduler=meta["lr_scheduler"],
        rng=_decode_rng(meta["rng"]),
        extra=meta.get("extra", {}),
        ema=ema,
        alphas={part: {k.removesuffix(ALPHA_SUFFIX): float(v) for k, v in sd.items()} for part, sd in alphas.items()}
        or None,
    )


def _flatten_parts(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.contiguous() for part, sd in state.items() for k, v in sd.items()}


def _alpha_tensors(alphas: dict[str, dict[str, float]]) -> dict[str, torch.Tensor]:
    # float64, so an alpha such as 0.1 reads back as exactly the number peft trained with
    return {f"{part}.{path}{ALPHA_SUFFIX}": torch.tensor(alpha, dtype=torch.float64)
            for part, per_module in alphas.items() for path, alpha in per_module.items()}


def stores_alphas(folder: Path) -> bool:
    """True when the checkpoint's lora.safetensors holds the alphas (read from its header only)."""
    try:
        with safe_open(str(folder / "lora.safetensors"), framework="pt") as f:
            return any(k.endswith(ALPHA_SUFFIX) for k in f.keys())
    except (SafetensorError, OSError):
        return False


def _unflatten_parts(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        part, rest = key.split(".", 1)
        out.setdefault(part, {})[rest] = value
    return out


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds every file of a checkpoint and its state says it is complete."""
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    needed = ["lora.safetensors", "optimizer.safetensors"] + (["ema.safetensors"] if meta.get("ema") else [])
    return bool(meta.get("complete")) and all((folder / name).is_file() for name in needed)


def newest_complete(run_dir: Path) -> Path | None:
    """The newest checkpoint that is complete (a damaged newer one is skipped), or None."""
    for folder in reversed(list_checkpoints(run_dir)):
        if is_complete(folder):
            return folder
    return None


def remove_stale(run_dir: Path) -> None:
    """Delete temporary folders that a killed run left behind (``.step-NNNNNN.*``); they are never resumed."""
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".step-"):
                shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    found = [p for p in found if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints; each is renamed away first, so a kill mid-delete
    never leaves a half-deleted folder under a ``step-*`` name."""
    for old in list_checkpoints(run_dir)[:-keep]:
        doomed = old.with_name(f".{old.name}.deleting")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def discard_after(run_dir: Path, step: int) -> list[Path]:
    """Delete checkpoint folders past ``step`` (a rewound run's abandoned future, or damaged ones);
    returns the complete ones that were deleted."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        match = STEP_DIR.match(p.name)
        if match and p.is_dir() and int(match.group(1)) > step:
            if is_complete(p):
                removed.append(p)
            doomed = p.with_name(f".{p.name}.deleting")
            os.replace(p, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return removed


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


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
