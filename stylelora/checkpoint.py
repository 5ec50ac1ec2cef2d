"""Resumable training state, stored as safetensors + JSON only (nothing is ever unpickled).

A checkpoint folder ``checkpoints/step-NNNNNN/`` holds:
- ``lora.safetensors``: canonical LoRA weights (fp32), keys ``unet.<path>`` / ``text_encoder.<path>``;
- ``optimizer.safetensors``: every tensor of the optimizer state, plus its non-tensor state as JSON;
- ``state.json``: step, data position, LR-scheduler state, RNG states, and a completeness marker.
It is written into a temporary folder and renamed, so a folder named ``step-*`` is always complete.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import fileio
from .errors import TrainingError

STEP_DIR = re.compile(r"^step-(\d{6,})$")


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
    lora = {f"{part}.{k}": v.contiguous() for part, sd in state.lora.items() for k, v in sd.items()}
    opt_tensors, opt_meta = _flatten_optimizer(state.optimizer)
    with fileio.atomic_dir(folder) as tmp:
        # Written from Python (not safetensors' own writer) so a full disk raises OSError(ENOSPC).
        (tmp / "lora.safetensors").write_bytes(save(lora))
        (tmp / "optimizer.safetensors").write_bytes(save(opt_tensors))
        meta = {
            "step": state.step,
            "epoch": state.epoch,
            "batch": state.batch,
            "optimizer": opt_meta,
            "lr_scheduler": state.lr_scheduler,
            "rng": _encode_rng(state.rng),
            "extra": state.extra,
            "complete": True,
        }
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def load_checkpoint(folder: Path) -> TrainingState:
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        flat = load_file(str(folder / "lora.safetensors"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise TrainingError(f"{folder}: not a complete stylelora checkpoint ({e}); pick an earlier one") from None
    if not meta.get("complete"):
        raise TrainingError(f"{folder}: checkpoint is incomplete; pick an earlier one")
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        part, rest = key.split(".", 1)
        lora.setdefault(part, {})[rest] = value
    return TrainingState(
        step=meta["step"],
        epoch=meta["epoch"],
        batch=meta["batch"],
        lora=lora,
        optimizer=_unflatten_optimizer(opt_tensors, meta["optimizer"]),
        lr_scheduler=meta["lr_scheduler"],
        rng=_decode_rng(meta["rng"]),
        extra=meta.get("extra", {}),
    )


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    found = [p for p in found if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"
