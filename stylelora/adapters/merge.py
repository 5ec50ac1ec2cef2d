"""Weight surgery on adapters: merge one into its base model, lower its rank by SVD, or keep some blocks."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core import fileio
from ..core.errors import ConfigError, FormatError, output_exists
from ..families import load_base_model
from ..model.base import BaseModel
from .adapter import NETWORK_NAMES, Adapter, module_of, module_paths
from .convert import describe, find_adapter_file, open_adapter, write_adapter
from .formats import DIFFUSERS_WEIGHT_NAME, load_adapter, save_diffusers
from .metadata import adapter_facts

if TYPE_CHECKING:
    from ..model.base import ModelFamily

log = logging.getLogger(__name__)
MERGE_ADAPTER_NAME = "stylelora_merge"
# The adapter strengths a user can mean: 0 is the base model, 1 the adapter as trained, 2 twice its change, -1 its
# change taken away; beyond them the weights drift into noise. The app's strength sliders and the merge take these.
STRENGTHS = (-1.0, 2.0)


def check_strength(scale: object, name: str = "strength") -> float:
    """``scale`` as a float when it is a strength a user can mean (``STRENGTHS``); ConfigError naming ``name``
    (the field or flag that gave it) otherwise: empty, not a number, infinite or outside the range."""
    low, high = STRENGTHS
    if scale is None or (isinstance(scale, str) and not scale.strip()):
        raise ConfigError(f"{name}: empty; give a strength from {low:g} to {high:g} (1 is the adapter as trained)")
    try:
        value = float(scale)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{name}: must be a number from {low:g} to {high:g} (0 is the base model, 1 the adapter as "
                          f"trained), got {scale!r}")
    return value


def merge(model: str | BaseModel, lora: str | Path, scale: float, out: str | Path, precision: str = "fp16",
          overwrite: bool = True) -> Path:
    """Bake ``lora`` (an adapter file, a diffusers LoRA folder or a run folder) at strength ``scale`` into the
    base weights (diffusers' own fuse_lora) and save the pipeline at ``out``: a diffusers folder, or, when ``out``
    ends in ``.safetensors``, one checkpoint file in the original layout (AUTOMATIC1111, ComfyUI) in
    ``precision``, verified. A BaseModel passed in is changed in place. Before anything is loaded: ConfigError for
    a ``scale`` outside ``STRENGTHS``; without ``overwrite`` an ``out`` already there is refused, and a folder that
    is not a diffusers model is never replaced."""
    scale = check_strength(scale, "scale")
    check_merge_target(Path(out), overwrite)
    base = model if isinstance(model, BaseModel) else load_base_model(model)
    adapter = load_adapter(find_adapter_file(lora)[0], base)  # a file, a diffusers folder or a run folder
    pipe = base.pipeline
    if adapter.network != "lora":
        add_deltas(base, adapter, scale)  # then saved as a LoRA's merge is: a folder, or one .safetensors file
    else:
        with tempfile.TemporaryDirectory(prefix="stylelora-merge-") as tmp:
            save_diffusers(tmp, adapter, precision="fp32")
            # the file named: diffusers 0.35 refuses a bare folder when HF_HUB_OFFLINE is set
            pipe.load_lora_weights(tmp, weight_name=DIFFUSERS_WEIGHT_NAME, adapter_name=MERGE_ADAPTER_NAME)
        # every part named: FLUX.1's loader fuses only the transformer unless told
        pipe.fuse_lora(components=[part for part, _ in base.parts()], lora_scale=scale,
                       adapter_names=[MERGE_ADAPTER_NAME])
        pipe.unload_lora_weights()
    if Path(out).suffix.lower() == ".safetensors":
        return base.family.save_single_file(pipe, Path(out), precision)
    with fileio.atomic_dir(out) as folder:
        pipe.save_pretrained(folder, safe_serialization=True)
    return Path(out)


def check_merge_target(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` merge cannot write, or would write over something else: a folder where the checkpoint file
    goes, a file where the diffusers folder goes, a folder holding other files (the merge replaces the whole
    folder); and, without ``overwrite``, any earlier merge there."""
    if not out.exists():
        return
    if out.suffix.lower() == ".safetensors":
        if out.is_dir():
            raise FormatError(f"--out: {out} is a folder; give the checkpoint file to write (NAME.safetensors), or "
                              "a folder name without .safetensors for a diffusers folder")
    elif not out.is_dir():
        raise FormatError(f"--out: {out} is a file; a merged diffusers model is a folder: name a new folder, or "
                          "NAME.safetensors for one checkpoint file")
    elif any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise FormatError(f"--out: {out} is a folder of other files, not a diffusers model; the merged model "
                          f"replaces the whole folder, so name a new folder (e.g. {out / 'merged'})")
    if not overwrite:
        raise FormatError(output_exists(out))


@torch.no_grad()
def add_deltas(model: BaseModel, adapter: Adapter, scale: float) -> None:
    """Add every module's change (``Adapter.delta``) at strength ``scale`` to ``model``'s weights; LoHa
    and LoKr are merged this way (diffusers' fuse_lora knows LoRA only)."""
    for part, module in model.parts():
        modules = dict(module.named_modules())
        for path in adapter.modules(part):
            weight = modules[path].weight
            weight += (scale * adapter.delta(part, path, tuple(weight.shape))).to(weight.dtype)


@dataclass
class ResizeReport:
    path: Path
    rank: int
    energy_retained: float  # kept share of the squared singular values of all deltas, 0..1
    min_energy_retained: float = 1.0  # of the worst single module
    summary: str = ""


def _low_rank(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of up@down (Eckart-Young); returns them with kept and total energy."""
    product = up.flatten(1).double() @ down.flatten(1).double()
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    root = s[:rank].sqrt()
    new_down = (root[:, None] * vh[:rank]).reshape(rank, *down.shape[1:])
    new_up = (u[:, :rank] * root).reshape(up.shape[0], rank, *up.shape[2:])
    energy = s.pow(2)
    return new_down.float(), new_up.float(), float(energy[:rank].sum()), float(energy.sum())


def resize_adapter(adapter: Adapter, rank: int) -> tuple[Adapter, float, float]:
    """Every module above ``rank`` gets rank ``rank``; alpha shrinks with it so alpha/rank, the
    scale, is unchanged. Returns the adapter, the overall and the worst module's retained energy."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    kept_all = total_all = 0.0
    worst = 1.0
    for part, sd in adapter.state.items():
        state[part] = {k: v for k, v in sd.items() if ".lora_A." not in k and ".lora_B." not in k}
        alphas[part] = {}
        for path in module_paths(sd):
            down, up = sd[f"{path}.lora_A.weight"], sd[f"{path}.lora_B.weight"]
            old, alpha = down.shape[0], adapter.alpha_of(part, path)
            scale2 = (alpha / old) ** 2
            if old <= rank:
                energy = float((up.flatten(1).double() @ down.flatten(1).double()).pow(2).sum())
                kept = total = energy
                alphas[part][path] = alpha
            else:
                down, up, kept, total = _low_rank(down, up, rank)
                alphas[part][path] = alpha * rank / old
            state[part][f"{path}.lora_A.weight"], state[part][f"{path}.lora_B.weight"] = down, up
            kept_all, total_all = kept_all + kept * scale2, total_all + total * scale2
            if total > 0:
                worst = min(worst, kept / total)
    resized = Adapter.from_module_alphas(state, alphas, adapter.metadata)
    return resized, (kept_all / total_all if total_all > 0 else 1.0), worst


def resize(path: str | Path, rank: int, out: str | Path, base_model: str | BaseModel | None = None,
           overwrite: bool = True) -> ResizeReport:
    """Lower an adapter file's rank to ``rank``; writes ``out`` in the same format, verified (without
    ``overwrite``, not over a file already there)."""
    if rank < 1:
        raise FormatError(f"--rank {rank}: must be at least 1")
    src = open_adapter(path, base_model)
    if src.adapter.network != "lora":
        raise FormatError(f"{src.path}: resizing works on LoRA and LoCon adapters; this one is "
                          f"{NETWORK_NAMES[src.adapter.network]}")
    if src.adapter.rank <= rank and all(src.adapter.rank_of(p, m) <= rank for p in src.adapter.state
                                       for m in src.adapter.modules(p)):
        raise FormatError(f"{src.path}: the adapter is already rank {src.adapter.rank}; give a --rank below that")
    before = describe(src.adapter)
    resized, energy, worst = resize_adapter(src.adapter, rank)
    resized.metadata.update(adapter_facts(resized, src.layout.kind))
    resized.metadata["stylelora.resized"] = f"from {before} to rank {rank}; energy retained {energy:.4f}"
    written, _ = write_adapter(resized, src.format, out, src.layout, src.precision, src.name, overwrite=overwrite)
    summary = (f"{written}: rank {src.adapter.rank} -> {rank}, {energy:.2%} of the adapter's energy retained "
               f"(worst module {worst:.2%}); verified")
    return ResizeReport(written, rank, energy, worst, summary)


@dataclass
class SplitReport:
    path: Path
    kept: int  # modules kept
    dropped: int
    summary: str = ""


def split_adapter(adapter: Adapter, keep: Sequence[str], family: ModelFamily) -> Adapter:
    """The adapter with only the modules of the ``keep`` selectors: the blocks of ``family``'s denoiser (SD:
    ``up.0.attn.1``, ``down.1``, ``mid``; the presets ``style`` and ``content``), the denoiser's part name
    (``unet``) for all of it, ``te``/``te1``/``te2`` for text encoders. Each module keeps its weights and
    alpha. A selector naming nothing raises ConfigError."""
    denoiser = family.denoiser
    parts: set[str] = set()
    selectors = []
    for item in keep:
        text_parts = family.text_selection(item)
        if text_parts is not None:
            found = [p for p in text_parts if p in adapter.state]
            if not found:
                raise ConfigError(f"--keep {item}: the adapter has no LoRA on that text encoder")
            parts.update(found)
        elif item == denoiser:
            parts.add(denoiser)
        else:
            selectors.append(item)
    state = {part: dict(adapter.state[part]) for part in parts if part in adapter.state}
    if selectors:
        modules = adapter.modules(denoiser)
        paths = family.select_blocks(modules, selectors, field="--keep", what=f"the adapter's {family.denoiser_label}")
        kept = set(paths) | set(modules if denoiser in parts else [])
        state[denoiser] = {k: v for k, v in adapter.state.get(denoiser, {}).items() if module_of(k) in kept}
    state = {part: sd for part, sd in state.items() if sd}
    alphas = {part: {p: adapter.alpha_of(part, p) for p in module_paths(sd)} for part, sd in state.items()}
    return Adapter.from_module_alphas(state, alphas, adapter.metadata)


def parse_keep(text: str | Sequence[str]) -> list[str]:
    """``--keep style`` or ``--keep "up.0.attn.1, te1"``: the selectors, one per comma or space."""
    items = [text] if isinstance(text, str) else list(text)
    return [s for item in items for s in item.replace(",", " ").split()]


def split(path: str | Path, keep: str | Sequence[str], out: str | Path,
          base_model: str | BaseModel | None = None, overwrite: bool = True) -> SplitReport:
    """Write the modules of the kept blocks of an adapter file as a new adapter, in the same format and
    precision, verified like every adapter written (B-LoRA: ``keep="style"`` keeps up_blocks.0.attentions.1)."""
    selectors = parse_keep(keep)
    if not selectors:
        raise ConfigError("--keep: give style, content, or blocks such as up.0.attn.1, mid, down.1 (and te1/te2)")
    src = open_adapter(path, base_model)
    sliced = split_adapter(src.adapter, selectors, src.layout.family)
    total, kept = sum(src.adapter.num_modules().values()), sum(sliced.num_modules().values())
    if kept == 0:
        raise ConfigError(f"--keep {' '.join(selectors)}: keeps none of the adapter's {total} modules")
    if kept == total:
        raise ConfigError(f"--keep {' '.join(selectors)}: keeps all {total} modules of {src.path}; "
                          "nothing to split off")
    sliced.metadata.update(adapter_facts(sliced, src.layout.kind))
    sliced.metadata["stylelora.split"] = f"kept {' '.join(selectors)}: {kept} of {total} modules ({describe(sliced)})"
    written, _ = write_adapter(sliced, src.format, out, src.layout, src.precision, src.name, overwrite=overwrite)
    summary = f"{written}: kept {' '.join(selectors)}, {kept} of {total} modules ({describe(sliced)}); verified"
    return SplitReport(written, kept, total - kept, summary)
