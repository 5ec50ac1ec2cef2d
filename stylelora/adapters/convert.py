"""``export``: turn a run folder or an adapter file (ours or another trainer's) into a verified kohya
or diffusers file. Finding the adapter and its base model is shared with merge and resize. A run
folder's weights come from its newest checkpoint in fp32 (``checkpoint_weights``), so ``--precision
fp32`` is the trained weights themselves, not the run's fp16 file widened."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import Config
from ..core.errors import FormatError, continue_run, setting
from ..families import load_skeleton
from ..model.base import BaseModel
from . import checkpoint_files as ckpt
from .adapter import NETWORK_NAMES, Adapter, ModelLayout
from .formats import (
    DIFFUSERS_WEIGHT_NAME,
    DTYPES,
    adapter_from_tensors,
    file_format,
    read_safetensors,
    save_diffusers,
    save_kohya,
)

FORMATS = ("kohya", "diffusers")


@dataclass
class ExportReport:
    path: Path
    format: str
    num_tensors: int
    verified: bool
    summary: str


@dataclass
class Source:
    """An adapter read from disk, with the base model it belongs to."""

    path: Path
    format: str
    adapter: Adapter
    model: BaseModel
    layout: ModelLayout
    precision: str
    name: str
    weights_from: str = ""  # where the weights came from when not from ``path`` (a run's checkpoint)


def find_adapter_file(source: str | Path) -> tuple[Path, Config | None, str]:
    """The adapter file of a run folder, a diffusers folder or a file; with the run's config and name."""
    p = Path(source).expanduser()
    if not p.exists():
        raise FormatError(f"{p}: no such run folder or adapter file")
    if p.is_file():
        folder = p.parent.parent if p.parent.name == "diffusers" else p.parent  # a run's diffusers/ file
        name = folder.resolve().name if p.name == DIFFUSERS_WEIGHT_NAME else p.stem
        return p, None, name
    if (p / "config.toml").is_file():
        config = ckpt.run_folder_config(p)
        name = config.run_name
        # the name its files carry, or the folder's own (a folder renamed with its files), or diffusers'
        for candidate in (p / f"{name}.safetensors", p / f"{p.resolve().name}.safetensors"):
            if candidate.is_file():
                return candidate, config, candidate.stem
        if (p / "diffusers" / DIFFUSERS_WEIGHT_NAME).is_file():
            return p / "diffusers" / DIFFUSERS_WEIGHT_NAME, config, name
        raise FormatError(
            f"{p}: this run folder holds no adapter yet ({name}.safetensors or diffusers/{DIFFUSERS_WEIGHT_NAME}); "
            f"finish the training or continue it: {continue_run(p / 'config.toml')}"
        )
    if (p / DIFFUSERS_WEIGHT_NAME).is_file():
        return p / DIFFUSERS_WEIGHT_NAME, None, p.name
    raise FormatError(f"{p}: not a run folder (no config.toml) and no {DIFFUSERS_WEIGHT_NAME} inside")


def open_adapter(source: str | Path, base_model: str | BaseModel | None = None) -> Source:
    """Read the adapter named by ``source`` and load its base model: ``base_model`` if given, else the
    run's config.toml, else the config embedded in the file; without any, a clear error."""
    path, run_config, name = find_adapter_file(source)
    tensors, metadata = read_safetensors(path)
    fmt = file_format(tensors)
    if fmt is None:
        keys = sorted(tensors)[:3]
        raise FormatError(f"{path}: no LoRA keys in a known layout (kohya or diffusers); first keys: {keys}")
    if isinstance(base_model, BaseModel):
        model = base_model
    else:
        try:
            config = run_config or Adapter({}, {}, metadata).config
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
        if base_model:  # names and shapes are all a conversion needs: no weights are read
            model = load_skeleton(base_model, config.model.config if config else "")
        elif config is not None:  # the run's model as it trained: its kind and prediction type as set then
            m = config.model
            model = load_skeleton(m.name, m.config, m.prediction_type, m.kind)
        else:
            raise FormatError(
                f"{path}: the file does not say which base model it was trained on (no stylelora.core.config in "
                f"its metadata); name it in {setting('model.name')} (e.g. "
                f"{setting('model.name', 'stable-diffusion-v1-5/stable-diffusion-v1-5')}, a local folder or a "
                ".safetensors checkpoint)"
            )
    layout = ModelLayout.of(model)
    # the file's own precision: converting casts each tensor once, on writing (an SDXL adapter is not doubled)
    adapter = adapter_from_tensors(tensors, metadata, layout, str(path), upcast=False)
    dtype = next((v.dtype for v in tensors.values() if v.dim() >= 2), torch.float32)  # of the weights, not the alphas
    precision = {v: k for k, v in DTYPES.items()}.get(dtype, "fp32")
    weights_from = ""
    if run_config is not None:  # a run folder: its checkpoint holds the same weights in fp32
        adapter, weights_from = checkpoint_weights(Path(source).expanduser(), adapter, layout)
    return Source(path, fmt, adapter, model, layout, precision, name, weights_from)


def checkpoint_weights(run_dir: Path, adapter: Adapter, layout: ModelLayout) -> tuple[Adapter, str]:
    """The run's adapter with the fp32 weights of its newest checkpoint (the EMA average when the run
    kept one, as its adapter files were written from it) and the alphas stored there, when that
    checkpoint is the adapter's step and holds the same modules; else ``adapter`` as read from its file.
    Returns the adapter and a note of where its weights came from."""
    folder = ckpt.newest_complete(run_dir)
    if folder is None:
        return adapter, ""
    state = ckpt.load_checkpoint(folder)
    if str(state.step) != adapter.metadata.get("ss_steps"):
        return adapter, (f"from the adapter file: the newest checkpoint ({folder.name}) is not the adapter's "
                         f"step {adapter.metadata.get('ss_steps', '?')}")
    weights = state.ema if state.ema is not None else state.lora
    tensors = {f"{part}.{key}": value for part, sd in weights.items() for key, value in sd.items()}
    tensors.update({f"{part}.{path}.alpha": torch.tensor(alpha, dtype=torch.float64)
                    for part, per_module in (state.alphas or {}).items() for path, alpha in per_module.items()})
    stored = adapter_from_tensors(tensors, {}, layout, str(folder))  # names mapped as any diffusers-layout file
    if {p: stored.modules(p) for p in stored.state} != {p: adapter.modules(p) for p in adapter.state}:
        return adapter, f"from the adapter file: {folder.name} holds other modules than the adapter"
    alphas = {part: {path: (stored if state.alphas else adapter).alpha_of(part, path) for path in adapter.modules(part)}
              for part in adapter.state}  # checkpoints from before alphas were stored: the file's alphas
    kind = "EMA average" if state.ema is not None else "weights"
    return Adapter.from_module_alphas(stored.state, alphas, adapter.metadata), f"from {folder.name}'s fp32 {kind}"


def write_adapter(adapter: Adapter, fmt: str, out: str | Path, layout: ModelLayout, precision: str,
                  name: str, bake_alpha: bool = False) -> tuple[Path, int]:
    """Save ``adapter`` as ``fmt`` at ``out`` (verified); returns the file and its number of tensors."""
    if fmt not in FORMATS:
        raise FormatError(f"format '{fmt}': choose one of {', '.join(FORMATS)}")
    if precision not in DTYPES:
        raise FormatError(f"precision '{precision}': choose one of {', '.join(DTYPES)}")
    target = Path(out).expanduser()
    if fmt == "kohya":
        if target.is_dir():
            target = target / f"{name}.safetensors"
        elif target.suffix.lower() != ".safetensors":
            raise FormatError(f"--out {out}: a kohya adapter is one file; give a name ending in .safetensors")
        path = save_kohya(target, adapter, layout, precision)
    else:
        path = save_diffusers(target, adapter, layout, precision, bake_alpha=bake_alpha)
    tensors, _ = read_safetensors(path)
    return path, len(tensors)


def describe(adapter: Adapter) -> str:
    parts = ", ".join(f"{part} {n}" for part, n in adapter.num_modules().items())
    alphas = ", ".join(f"{part} {a:g}" for part, a in adapter.alpha.items())
    text = f"{sum(adapter.num_modules().values())} modules ({parts}), rank {adapter.rank}, alpha {alphas}"
    if adapter.conv_alpha:
        text += ", conv alpha " + ", ".join(f"{p} {a:g}" for p, a in adapter.conv_alpha.items())
    network = f", {NETWORK_NAMES[adapter.network]}" if adapter.network != "lora" else ""
    return text + (", DoRA" if adapter.is_dora else "") + network


def export(source: str | Path, fmt: str, out: str | Path, precision: str = "fp16",
           base_model: str | BaseModel | None = None, bake_alpha: bool = False) -> ExportReport:
    """Convert a run folder or adapter file to ``fmt`` ("kohya" or "diffusers") at ``out``, verified.
    ``bake_alpha`` (diffusers only) folds alpha/rank into the weights for loaders that read no alpha."""
    if fmt not in FORMATS:
        raise FormatError(f"format '{fmt}': choose one of {', '.join(FORMATS)}")
    src = open_adapter(source, base_model)
    path, count = write_adapter(src.adapter, fmt, out, src.layout, precision, src.name, bake_alpha)
    origin = f" ({src.weights_from})" if src.weights_from else ""
    summary = (
        f"{fmt} adapter {path}: {count} tensors, {describe(src.adapter)}, {precision}{origin}; verified: re-read, "
        f"every tensor equal, every key names a module of {src.model.name}"
    )
    return ExportReport(path, fmt, count, True, summary)

