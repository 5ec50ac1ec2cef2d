"""Adapter files: kohya (AUTOMATIC1111, ComfyUI, sd-scripts) and diffusers/peft.

In memory an adapter is canonical: ``{"unet": {...}, "text_encoder": {...}}`` of peft state dicts
keyed by the model's module paths (``down_blocks.0.attentions.0.proj_in.lora_A.weight``), plus
one alpha per part. The kohya reverse map is built from the model's own module names, never by
guessing which underscores were dots.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import fileio
from .errors import FormatError

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
DIFFUSERS_PREFIX = {"unet": "unet.", "text_encoder": "text_encoder."}
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Adapter:
    """Canonical LoRA weights, their alpha per part, and the file's metadata."""

    state: dict[str, dict[str, torch.Tensor]]
    alpha: dict[str, float]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        for sd in self.state.values():
            for k, v in sd.items():
                if k.endswith("lora_A.weight"):
                    return int(v.shape[0])
        return 0


def module_paths(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".lora_", 1)[0] for k in state})


def kohya_module_path(part: str, path: str) -> str:
    """The kohya name of one module; CLIP paths keep ``text_model.`` (transformers 5 drops it)."""
    if part == "text_encoder" and not path.startswith("text_model."):
        path = "text_model." + path
    return KOHYA_PREFIX[part] + path.replace(".", "_")


# --- writing ------------------------------------------------------------------------------------


def to_kohya(adapter: Adapter, precision: str = "fp16") -> dict[str, torch.Tensor]:
    dtype = DTYPES[precision]
    out: dict[str, torch.Tensor] = {}
    for part, sd in adapter.state.items():
        for path in module_paths(sd):
            name = kohya_module_path(part, path)
            out[f"{name}.lora_down.weight"] = sd[f"{path}.lora_A.weight"].to(dtype).contiguous()
            out[f"{name}.lora_up.weight"] = sd[f"{path}.lora_B.weight"].to(dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(adapter.alpha[part]), dtype=dtype)
    return out


def to_diffusers(adapter: Adapter, precision: str = "fp16") -> dict[str, torch.Tensor]:
    dtype = DTYPES[precision]
    return {
        DIFFUSERS_PREFIX[part] + k: v.to(dtype).contiguous()
        for part, sd in adapter.state.items()
        for k, v in sd.items()
    }


def _data_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a safetensors file's data section (what kohya's sshs_model_hash covers)."""
    blob = save(tensors)
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_len :]).hexdigest()


def save_kohya(path: str | Path, adapter: Adapter, precision: str = "fp16") -> Path:
    tensors = to_kohya(adapter, precision)
    metadata = {k: v for k, v in adapter.metadata.items() if k != "lora_adapter_metadata"}
    metadata["sshs_model_hash"] = _data_hash(tensors)
    fileio.write_bytes(path, save(tensors, metadata=metadata))
    return Path(path)


def save_diffusers(folder: str | Path, adapter: Adapter, precision: str = "fp16") -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(folder)``."""
    tensors = to_diffusers(adapter, precision)
    peft_meta: dict[str, object] = {}
    for part, sd in adapter.state.items():
        paths = module_paths(sd)
        rank = int(sd[f"{paths[0]}.lora_A.weight"].shape[0])
        # diffusers reads r and lora_alpha from here; without it alpha would default to the rank.
        peft_meta.update(
            {f"{part}.r": rank, f"{part}.lora_alpha": adapter.alpha[part], f"{part}.target_modules": paths}
        )
    metadata = dict(adapter.metadata)
    metadata["format"] = "pt"
    metadata["lora_adapter_metadata"] = json.dumps(peft_meta, sort_keys=True)
    target = Path(folder) / DIFFUSERS_WEIGHT_NAME
    fileio.write_bytes(target, save(tensors, metadata=metadata))
    return target


# --- reading ------------------------------------------------------------------------------------


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and header metadata; never unpickles. Errors name the file."""
    p = Path(path)
    if p.is_dir():
        p = p / DIFFUSERS_WEIGHT_NAME
    if p.suffix.lower() in {".ckpt", ".pt", ".pth", ".bin"}:
        raise FormatError(
            f"{p}: pickled files can run code when opened and are not read; use a .safetensors file"
        )
    if not p.is_file():
        raise FormatError(f"{p}: no such adapter file")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{p}: not a readable .safetensors file ({e}); it may be truncated or corrupt") from None
    return tensors, metadata


def load_adapter(path: str | Path, modules: dict[str, list[str]]) -> Adapter:
    """Read a kohya or diffusers adapter into canonical form.

    ``modules`` lists the module paths of the base model per part (``{"unet": [...], ...}``); every
    key must map to one of them, and the error lists those that do not.
    """
    tensors, metadata = read_safetensors(path)
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in tensors):
        return _from_kohya(path, tensors, metadata, modules)
    if any(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in tensors):
        return _from_diffusers(path, tensors, metadata, modules)
    raise FormatError(
        f"{path}: no LoRA keys in a known layout (kohya lora_unet_/lora_te_ or diffusers unet./"
        f"text_encoder.); first keys: {sorted(tensors)[:3]}"
    )


def _from_kohya(path, tensors, metadata, modules) -> Adapter:
    reverse = {kohya_module_path(part, p): (part, p) for part, paths in modules.items() for p in paths}
    state: dict[str, dict[str, torch.Tensor]] = {}
    alpha: dict[str, float] = {}
    unknown = []
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if name not in reverse:
            unknown.append(key)
            continue
        part, module = reverse[name]
        sd = state.setdefault(part, {})
        if suffix == "lora_down.weight":
            sd[f"{module}.lora_A.weight"] = value.float()
        elif suffix == "lora_up.weight":
            sd[f"{module}.lora_B.weight"] = value.float()
        elif suffix == "alpha":
            alpha[part] = float(value)
        else:
            unknown.append(key)
    if unknown:
        raise FormatError(f"{path}: {len(unknown)} keys name no module of this base model: {unknown[:8]}")
    for part, sd in state.items():
        alpha.setdefault(part, float(next(v for k, v in sd.items() if "lora_A" in k).shape[0]))
    return Adapter(state, alpha, metadata)


def _from_diffusers(path, tensors, metadata, modules) -> Adapter:
    state: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        rest = rest.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
        module = rest.rsplit(".lora_", 1)[0]
        if part == "text_encoder" and module not in modules.get(part, []):
            module = module.removeprefix("text_model.")
            rest = rest.removeprefix("text_model.")
        if part not in modules or module not in modules[part]:
            unknown.append(key)
            continue
        state.setdefault(part, {})[rest] = value.float()
    if unknown:
        raise FormatError(f"{path}: {len(unknown)} keys name no module of this base model: {unknown[:8]}")
    peft_meta = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    alpha = {}
    for part, sd in state.items():
        rank = next(v for k, v in sd.items() if "lora_A" in k).shape[0]
        alpha[part] = float(peft_meta.get(f"{part}.lora_alpha", rank))
    return Adapter(state, alpha, metadata)
