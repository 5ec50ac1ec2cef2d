"""Adapter layers through peft: the injection, the trained state, the alphas, and the one walk over the
modules that can carry an adapter. Where the layers go is the model family's answer (``lora_targets``)."""

from __future__ import annotations

import re
from typing import Any

import torch

from ..core.config import LoraConfig
from ..core.errors import ModelError
from .base import BaseModel

ADAPTER_NAME = "default"
# peft's own layers and weights: LoRA (lora_A, lora_B, lora_magnitude_vector), LoHa (hada_*), LoKr (lokr_*)
ADAPTER_PARAM = re.compile(r"(^|\.)(lora_|hada_|lokr_)")


def peft_config(lora: LoraConfig, targets: list[str], rank_pattern: dict[str, int] | None = None,
                alpha_pattern: dict[str, float] | None = None) -> Any:
    """The peft config of ``lora.type``: LoRA (and LoCon, DoRA), LoHa or LoKr, all through peft."""
    from peft import LoHaConfig, LoKrConfig
    from peft import LoraConfig as PeftLoraConfig

    common: dict[str, Any] = {"r": lora.rank, "target_modules": targets, "rank_pattern": rank_pattern or {},
                              "alpha_pattern": alpha_pattern or {}}
    if lora.type == "loha":
        return LoHaConfig(alpha=lora.alpha, **common)
    if lora.type == "lokr":
        return LoKrConfig(alpha=lora.alpha, decompose_factor=lora.lokr_factor, **common)
    return PeftLoraConfig(lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=lora.dora,
                          init_lora_weights="gaussian", **common)


def add_lora(model: BaseModel, lora: LoraConfig) -> list[torch.nn.Parameter]:
    """Freeze the base model and inject the adapter layers (``lora.type``) with peft where its family puts
    them; returns the trainable parameters."""
    from peft import inject_adapter_in_model

    targets = model.family.lora_targets(model, lora)
    for module in [model.vae, *model.text_encoders, *(m for _, m in model.parts())]:
        module.requires_grad_(False)
    params: list[torch.nn.Parameter] = []
    for target in targets:
        try:
            inject_adapter_in_model(peft_config(lora, target.names, target.rank_pattern, target.alpha_pattern),
                                    target.module, adapter_name=ADAPTER_NAME)
        except ValueError as e:
            raise ModelError(f"cannot add LoRA to {type(target.module).__name__}: {e}") from e
        # peft leaves only its own layers trainable in the module it injected into
        params += [p for p in target.module.parameters() if p.requires_grad]
    return params


def lora_state(model: BaseModel) -> dict[str, dict[str, torch.Tensor]]:
    """The canonical adapter: peft state dicts keyed by the model's own module paths."""
    from peft import get_peft_model_state_dict

    out: dict[str, dict[str, torch.Tensor]] = {}
    for part, module in model.parts():
        if any(ADAPTER_PARAM.search(n) for n, _ in module.named_parameters()):
            sd = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
            out[part] = {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}
    return out


def set_lora_state(model: BaseModel, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load canonical LoRA weights into the injected layers of ``model``."""
    from peft import set_peft_model_state_dict

    for part, sd in state.items():
        module = getattr(model, part)
        result = set_peft_model_state_dict(module, sd, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ModelError(f"{part}: LoRA weights for modules this model lacks: {unexpected[:5]}")


def module_shapes(model: BaseModel) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every module (per part) that can carry LoRA, every Linear and Conv2d of the UNet and text
    encoders, with its weight shape. A module peft has wrapped keeps its own path (``.base_layer``
    dropped) and peft's own layers are left out, so the answer is the same before and after LoRA.

    This is the model's own list of names; adapter loading maps file keys onto it (never guessing).
    """
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for part, module in model.parts():
        out[part] = {
            name.removesuffix(".base_layer"): tuple(sub.weight.shape)
            for name, sub in module.named_modules()
            if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)) and not ADAPTER_PARAM.search(name)
        }
    return out


def adaptable_modules(model: BaseModel) -> dict[str, list[str]]:
    """Module paths (per part) that can carry LoRA, sorted: the names of ``module_shapes``."""
    return {part: sorted(shapes) for part, shapes in module_shapes(model).items()}


def full_lokr_rank(w2: torch.Tensor) -> int:
    """The rank at which peft builds a LoKr module's second factor as this full matrix. LyCORIS and
    ComfyUI scale a module of two full factors by 1, so its alpha is this rank in every file."""
    return int(max(w2.shape[0], w2.shape[1]))


def lora_alphas(model: BaseModel) -> dict[str, dict[str, float]]:
    """The alpha of every adapted module, per part (rank_pattern/alpha_pattern included): LoRA layers keep
    it in ``lora_alpha``, LoHa and LoKr layers in ``alpha``. A LoKr module of two full factors is given
    the alpha that keeps peft's scale at ``full_lokr_rank`` (the rank the canonical adapter states)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    out: dict[str, dict[str, float]] = {}
    for part, module in model.parts():
        found = {}
        for name, sub in module.named_modules():
            if isinstance(sub, LoraLayer) and ADAPTER_NAME in sub.lora_alpha:
                found[name] = float(sub.lora_alpha[ADAPTER_NAME])
            elif isinstance(sub, LycorisLayer) and ADAPTER_NAME in sub.alpha:
                found[name] = float(sub.alpha[ADAPTER_NAME])
                w1, w2 = getattr(sub, "lokr_w1", {}), getattr(sub, "lokr_w2", {})
                if ADAPTER_NAME in w1 and ADAPTER_NAME in w2:
                    found[name] = found[name] / sub.r[ADAPTER_NAME] * full_lokr_rank(w2[ADAPTER_NAME])
        if found:
            out[part] = found
    return out
