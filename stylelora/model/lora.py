"""Adapter layers through peft: the injection, the trained state, the alphas, and the one walk over the
modules that can carry an adapter. Where the layers go is the model family's answer (``lora_targets``)."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..core.config import LoraConfig
from ..core.errors import ConfigError, ModelError
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
    if lora.type == "lokr":
        for target in targets:
            _check_lokr_split(target.module, target.names, lora.lokr_factor)
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


def matches(path: str, names: list[str]) -> bool:
    """peft's rule for a list of target names: the module path is a name or ends with ``.name``."""
    return any(path == name or path.endswith("." + name) for name in names)


def _check_lokr_split(module: torch.nn.Module, names: list[str], factor: int) -> None:
    """ConfigError when peft would split a targeted layer's side other than LyCORIS does: a ``factor`` above
    the side's square root (peft: factor x rest, LyCORIS: rest x factor). Those Kronecker factors cannot be
    rewritten in LyCORIS' split, so its loader could not read the file."""
    sides = {(path, side) for path, layer in module.named_modules()
             if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and matches(path, names)
             for side in layer.weight.shape[:2]}
    for path, side in sorted(sides):
        if factor > 0 and side % factor == 0 and factor * factor > side:
            small, large = lycoris_factorization(side, factor)
            narrowest = min(s for _, s in sides)
            raise ConfigError(
                f"lora.lokr_factor: {factor} splits the {side} channels of {path} as {factor} x {side // factor} "
                f"in peft, where LyCORIS splits them {small} x {large}, so LyCORIS could not load the adapter; use "
                f"-1 or a factor of at most {math.isqrt(narrowest)} (the square root of the narrowest adapted side, "
                f"{narrowest})"
            )


def lora_state(model: BaseModel) -> dict[str, dict[str, torch.Tensor]]:
    """The canonical adapter: peft state dicts keyed by the model's own module paths."""
    from peft import get_peft_model_state_dict

    out: dict[str, dict[str, torch.Tensor]] = {}
    for part, module in model.parts():
        adapter = {n: p for n, p in module.named_parameters() if ADAPTER_PARAM.search(n)}
        if adapter:
            # the adapter's tensors alone: module.state_dict() would also unpack every weight of a 4-bit base, at
            # each checkpoint, to a copy the size of the model (minutes on a CPU, gigabytes on a card)
            sd = get_peft_model_state_dict(module, state_dict=adapter, adapter_name=ADAPTER_NAME)
            out[part] = {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}
    return out


def set_lora_state(model: BaseModel, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load canonical LoRA weights into the injected layers of ``model``."""
    from peft import set_peft_model_state_dict

    modules = dict(model.parts())
    for part, sd in state.items():
        module = modules.get(part)
        if module is None:
            raise ModelError(f"{part}: LoRA weights for a part this model lacks (it has {', '.join(modules)})")
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


def lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """How LyCORIS splits one side of a weight for LoKr (``lycoris.functional.factorization``), smaller part
    first: ``factor`` and the rest when it divides, else the divisor pair nearest the square root whose smaller
    part is at most ``factor`` (any size for -1). peft's copy returns ``(factor, rest)`` unsorted, so the two
    differ where ``factor`` is above the square root."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > 1 + dimension or new_m > limit:  # LyCORIS compares with the first pair's sum
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


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
