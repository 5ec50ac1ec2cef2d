"""Adapter files: kohya (AUTOMATIC1111, ComfyUI, sd-scripts) and diffusers/peft; read, write, verify.

In memory an adapter is canonical: ``{"unet": {...}, "text_encoder": {...}}`` of peft state dicts
keyed by the model's own module paths (``down_blocks.0.attentions.0.proj_in.lora_A.weight``).
Alpha is per kind of module (see ``Adapter``). Every file written here is re-read and checked
(``verify_file``). Converting a run or file lives above this module, in ``stylelora.convert``;
merging and resizing in ``stylelora.merge``; the metadata written here comes from ``stylelora.metadata``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from . import fileio
from .adapter import Adapter, ModelLayout, module_paths
from .errors import FormatError, setting
from .kohya_names import KOHYA_PREFIXES
from .metadata import adapter_facts, model_hashes
from .models import PICKLE_SUFFIXES

if TYPE_CHECKING:
    from .models import BaseModel

__all__ = ["Adapter", "ModelLayout", "load_adapter", "read_safetensors", "save_diffusers", "save_kohya",
           "verify_file"]
PARTS = ("unet", "text_encoder", "text_encoder_2")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
# header keys that belong to the diffusers file only (diffusers refuses kohya files that carry them)
DIFFUSERS_ONLY_METADATA = ("format", "lora_adapter_metadata")
DORA_KOHYA_REFUSAL = (
    "DoRA adapters are not exported to kohya format: AUTOMATIC1111 normalises a kohya dora_scale per input "
    "channel where peft (and stylelora) normalise per output channel, and diffusers drops dora_scale keys, "
    "so the file would load wrong or without effect. Export it in the diffusers format (diffusers and peft load DoRA), "
    "or train without DoRA for A1111 and ComfyUI."
)


# --- writing ------------------------------------------------------------------------------------


def to_kohya(adapter: Adapter, layout: ModelLayout, precision: str = "fp16") -> dict[str, torch.Tensor]:
    if adapter.is_dora:
        raise FormatError(DORA_KOHYA_REFUSAL)
    dtype = DTYPES[precision]
    out: dict[str, torch.Tensor] = {}
    for part, sd in adapter.state.items():
        for path in module_paths(sd):
            name = layout.kohya.name(part, path)
            out[f"{name}.lora_down.weight"] = sd[f"{path}.lora_A.weight"].to(dtype).contiguous()
            out[f"{name}.lora_up.weight"] = sd[f"{path}.lora_B.weight"].to(dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(adapter.alpha_of(part, path), dtype=dtype)
    return out


def to_diffusers(adapter: Adapter, precision: str = "fp16") -> dict[str, torch.Tensor]:
    dtype = DTYPES[precision]
    out = {}
    for part, sd in adapter.state.items():
        for key, value in sd.items():
            if part.startswith("text_encoder") and key.endswith(".lora_magnitude_vector"):
                key += ".weight"  # transformers' load_adapter wants DoRA magnitudes as ...magnitude_vector.weight
            out[f"{part}.{key}"] = value.to(dtype).contiguous()
    return out


def peft_metadata(adapter: Adapter) -> dict[str, object]:
    """diffusers' ``lora_adapter_metadata``: the LoraConfig per part, so it scales every module right."""
    return {f"{part}.{k}": v for part in adapter.state for k, v in adapter.peft_fields(part).items()}


def kohya_file_metadata(adapter: Adapter, layout: ModelLayout, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The adapter's metadata for a kohya file: what the weights say (``adapter_facts``) replaces any
    older statement of it, and kohya's hashes are taken over the tensors written."""
    metadata = {k: v for k, v in adapter.metadata.items() if k not in DIFFUSERS_ONLY_METADATA}
    metadata.update(adapter_facts(adapter, layout.kind))
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hashes(tensors, metadata)
    return metadata


def save_kohya(path: str | Path, adapter: Adapter, layout: BaseModel | ModelLayout, precision: str = "fp16") -> Path:
    """Write one kohya ``.safetensors`` and verify it (a failed check raises FormatError)."""
    layout = ModelLayout.of(layout)
    tensors = to_kohya(adapter, layout, precision)
    _write_verified(path, save(tensors, metadata=kohya_file_metadata(adapter, layout, tensors)), tensors, layout)
    return Path(path)


def save_diffusers(
    folder: str | Path, adapter: Adapter, layout: BaseModel | ModelLayout | None = None, precision: str = "fp16"
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` (or the ``.safetensors`` path given) for
    ``pipe.load_lora_weights``; verified against ``layout`` when one is given."""
    target = Path(folder)
    if target.suffix.lower() != ".safetensors":
        target = target / DIFFUSERS_WEIGHT_NAME
    tensors = to_diffusers(adapter, precision)
    metadata = {k: v for k, v in adapter.metadata.items() if k not in DIFFUSERS_ONLY_METADATA}
    metadata["format"] = "pt"
    metadata["lora_adapter_metadata"] = json.dumps(peft_metadata(adapter), sort_keys=True)
    checked = None if layout is None else ModelLayout.of(layout)
    _write_verified(target, save(tensors, metadata=metadata), tensors, checked)
    return target


def _write_verified(
    path: str | Path, blob: bytes, expected: dict[str, torch.Tensor], layout: ModelLayout | None
) -> None:
    """Write under a temporary name and verify that file before it replaces ``path``: a file that
    fails the check is removed and an older file at ``path`` stays as it was."""
    with fileio.atomic_path(path) as tmp:
        tmp.write_bytes(blob)
        if layout is not None:
            verify_file(tmp, expected, layout, shown_as=path)


def verify_file(path: str | Path, expected: dict[str, torch.Tensor], layout: ModelLayout,
                shown_as: str | Path | None = None) -> Adapter:
    """Re-read a written adapter: the same keys, every tensor equal in dtype and value, and every key
    naming a real module of the base model with a fitting shape. Raises FormatError otherwise."""
    tensors, metadata = read_safetensors(path)
    path = shown_as or path
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise FormatError(f"{path}: verification failed: missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    wrong = [k for k, v in expected.items() if tensors[k].dtype != v.dtype or not torch.equal(tensors[k], v)]
    if wrong:
        raise FormatError(f"{path}: verification failed: {len(wrong)} tensors differ from those written: {wrong[:5]}")
    if is_kohya(tensors) and "lora_adapter_metadata" in metadata:
        raise FormatError(f"{path}: verification failed: a kohya file must not carry lora_adapter_metadata")
    return adapter_from_tensors(tensors, metadata, layout, str(path))


# --- reading ------------------------------------------------------------------------------------


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and header metadata; never unpickles. Errors name the file."""
    p = Path(path)
    if p.is_dir():
        p = p / DIFFUSERS_WEIGHT_NAME
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise FormatError(f"{p}: pickled files can run code when opened and are not read; use a .safetensors file")
    if not p.is_file():
        raise FormatError(f"{p}: no such adapter file")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{p}: not a readable .safetensors file ({e}); it may be truncated or corrupt") from None
    return tensors, metadata


def is_kohya(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(KOHYA_PREFIXES) for k in tensors)


def file_format(tensors: dict[str, torch.Tensor]) -> str | None:
    if is_kohya(tensors):
        return "kohya"
    if any(k.split(".", 1)[0] in PARTS and ".lora" in k for k in tensors):
        return "diffusers"
    return None


def load_adapter(path: str | Path, model: BaseModel | ModelLayout) -> Adapter:
    """Read a kohya or diffusers adapter into canonical form, strictly: every key must name a module
    of ``model`` with a fitting shape; the error lists the keys that do not."""
    tensors, metadata = read_safetensors(path)
    return adapter_from_tensors(tensors, metadata, ModelLayout.of(model), str(path))


def adapter_from_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], layout: ModelLayout, source: str = "adapter"
) -> Adapter:
    fmt = file_format(tensors)
    if fmt is None:
        raise FormatError(
            f"{source}: no LoRA keys in a known layout (kohya lora_unet_/lora_te_ or diffusers unet./"
            f"text_encoder.); first keys: {sorted(tensors)[:3]}"
        )
    state, alphas, unknown = (_from_kohya if fmt == "kohya" else _from_diffusers)(tensors, metadata, layout)
    if unknown:
        raise FormatError(
            f"{source}: {len(unknown)} keys name no module of the base model {layout.name or layout.kind} "
            f"({layout.kind}): {unknown[:8]}. Was it made for another base model? Name that one in "
            f"{setting('model.name')}."
        )
    _check_pairs_and_shapes(state, layout, source)
    return Adapter.from_module_alphas(state, alphas, metadata)


def _from_kohya(tensors, metadata, layout):
    reverse = layout.kohya.reverse
    state: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    unknown = []
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if name not in reverse:
            unknown.append(key)
            continue
        part, module = reverse[name]
        if suffix == "lora_down.weight":
            state.setdefault(part, {})[f"{module}.lora_A.weight"] = value.float()
        elif suffix == "lora_up.weight":
            state.setdefault(part, {})[f"{module}.lora_B.weight"] = value.float()
        elif suffix == "alpha":
            alphas.setdefault(part, {})[module] = float(value)
        elif suffix == "dora_scale":
            raise FormatError(f"kohya DoRA keys ({key}) are not supported; convert the DoRA adapter elsewhere")
        else:
            unknown.append(key)
    return state, alphas, unknown


def _from_diffusers(tensors, metadata, layout):
    modules = layout.shapes
    state: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    network_alphas: dict[str, dict[str, float]] = {}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        rest = rest.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
        rest = rest.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")
        module = rest.removesuffix(".alpha") if rest.endswith(".alpha") else rest.rsplit(".lora_", 1)[0]
        if part in modules and module not in modules[part] and module.startswith("text_model."):
            rest, module = rest.removeprefix("text_model."), module.removeprefix("text_model.")
        if part not in modules or module not in modules[part]:
            unknown.append(key)
        elif rest.endswith(".alpha"):
            network_alphas.setdefault(part, {})[module] = float(value)
        else:
            state.setdefault(part, {})[rest] = value.float()
    peft_meta = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    alphas: dict[str, dict[str, float]] = {}
    for part, sd in state.items():
        if f"{part}.lora_alpha" in peft_meta:
            pattern = peft_meta.get(f"{part}.alpha_pattern") or {}
            default = float(peft_meta[f"{part}.lora_alpha"])
            alphas[part] = {p: float(pattern.get(p, default)) for p in module_paths(sd)}
        else:  # no LoraConfig stored: diffusers' own convention is alpha = rank (scale 1)
            alphas[part] = network_alphas.get(part, {})
    return state, alphas, unknown


def _check_pairs_and_shapes(state, layout: ModelLayout, source: str) -> None:
    problems = []
    for part, sd in state.items():
        for path in module_paths(sd):
            down, up = sd.get(f"{path}.lora_A.weight"), sd.get(f"{path}.lora_B.weight")
            if down is None or up is None:
                problems.append(f"{part} {path}: has only one of the down/up (lora_A/lora_B) weights")
                continue
            weight = layout.shapes[part][path]
            if not weight:  # a layout from bare module names: nothing to check the shapes against
                continue
            fits = (down.shape[1] == weight[1] and up.shape[0] == weight[0] and up.shape[1] == down.shape[0]
                    and tuple(down.shape[2:]) == tuple(weight[2:]) and all(s == 1 for s in up.shape[2:]))
            if not fits:
                problems.append(f"{part} {path}: down {tuple(down.shape)} / up {tuple(up.shape)} "
                                f"do not fit the module's weight {weight}")
    if problems:
        raise FormatError(f"{source}: {len(problems)} modules do not fit the base model: " + "; ".join(problems[:5]))
