"""A run's checkpoint folders on disk: their files (safetensors + JSON only, nothing is ever unpickled),
which of them are complete, listing and pruning. ``training.checkpoint`` moves a live run to and from them.

A checkpoint folder ``checkpoints/step-NNNNNN/`` holds:
- ``lora.safetensors``: canonical LoRA weights (fp32), keys ``unet.<path>`` / ``text_encoder.<path>``, and
  every module's alpha as a scalar ``<part>.<module path>.alpha`` (float64), so the file reads as an
  adapter with ``formats.load_adapter`` (checkpoints from before the alphas were stored lack them);
- ``optimizer.safetensors``: every tensor of the optimizer state, plus its non-tensor state as JSON;
- ``ema.safetensors`` (only when EMA is on): the averaged LoRA weights, keyed as ``lora.safetensors``;
- ``state.json``: step, data position, LR-scheduler state, RNG states (of every process of a run
  that several processes trained: ``rank1.torch``, ...), and a completeness marker.
It is written into a temporary folder and renamed, so a folder named ``step-*`` is always complete.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ..core import fileio
from ..core.config import Config
from ..core.errors import TrainingError
from ..core.metrics import METRICS_FILE

STEP_DIR = re.compile(r"^step-(\d{6,})$")
# the adapter file a step save leaves beside the run's adapter, named as sd-scripts names them: <name>-step00000250
STEP_ADAPTER = re.compile(r"-step(\d{8,})$")
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


def _pick_earlier(folder: Path) -> str:
    """What to do about a damaged checkpoint: the --resume that names the one before it, when there is one."""
    try:
        earlier = sorted(p for p in folder.parent.iterdir()
                         if p.name < folder.name and p.name.startswith("step-") and (p / "state.json").is_file())
    except OSError:
        earlier = []
    return f"resume from the one before it with --resume {earlier[-1]}" if earlier else "pick an earlier one"


def load_checkpoint(folder: Path) -> TrainingState:
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        flat = load_file(str(folder / "lora.safetensors"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
        ema = _unflatten_parts(load_file(str(folder / "ema.safetensors"))) if meta.get("ema") else None
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise TrainingError(f"{folder}: not a complete stylelora checkpoint ({e}); {_pick_earlier(folder)}") from None
    if not meta.get("complete"):
        raise TrainingError(f"{folder}: checkpoint is incomplete; {_pick_earlier(folder)}")
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


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` is a run folder training has written to (its metrics or a checkpoint), not merely a
    folder where someone keeps a config.toml."""
    return (folder / METRICS_FILE).is_file() or bool(list_checkpoints(folder))


def run_folder_config(run_dir: str | Path, config: Config | None = None) -> Config:
    """The config a run folder was trained with, for that folder wherever it is now. Its config.toml names the
    folder the run started in; a run folder copied or moved since (or brought from another machine) is its own
    run: it continues, is scored and exported in the folder it is in, and its files keep the name they carry.
    ``config``: its config.toml, when the caller has read it already."""
    run = Path(run_dir).expanduser()
    config = config or Config.load(run / "config.toml")
    saved = config.train.output_dir
    if saved and fileio.foreign_path(saved) is None and Path(saved).expanduser().resolve() == run.resolve():
        return config
    return config.with_overrides({"train.output_dir": str(run), "export.name": config.run_name})


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


def step_suffix(step: int) -> str:
    """What a step save's adapter adds to the run's adapter name (``-step00000250``), as sd-scripts names them.
    ``prune_checkpoints`` never touches these files: it prunes the resumable state only."""
    return f"-step{step:08d}"


def step_of_suffix(stem: str, name: str) -> int | None:
    """The step of a step save's adapter file stem (``name-step00000250`` -> 250), else None."""
    match = STEP_ADAPTER.search(stem)
    return int(match.group(1)) if match and stem[: match.start()] == name else None
