"""The canonical adapter in memory (peft weights keyed by the model's module paths, alpha per kind of
module) and the layout of a base model that adapter files are mapped onto and checked against."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from .. import families
from ..core.config import Config
from ..core.errors import ConfigError, FormatError
from ..model.blocks import LOCON_TARGETS
from ..model.lora import ADAPTER_PARAM, full_lokr_rank, module_shapes
from .kohya_names import KohyaNames

if TYPE_CHECKING:
    from ..model.base import BaseModel, ModelFamily


def module_of(key: str) -> str:
    """The module path of one adapter weight's key (LoRA's ``.lora_A.weight``, LoHa's ``.hada_w1_a``, ...)."""
    return key[: ADAPTER_PARAM.search(key).start()]  # type: ignore[union-attr]


def module_paths(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({module_of(k) for k in state})


NETWORK_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


def network_of(state: dict[str, dict[str, torch.Tensor]]) -> str:
    """"lora" (LoRA, LoCon, DoRA), "loha" or "lokr", from the weights' names."""
    for sd in state.values():
        for key in sd:
            if ".hada_" in key:
                return "loha"
            if ".lokr_" in key:
                return "lokr"
    return "lora"


def most_common(values: list[float]) -> float | None:
    return collections.Counter(values).most_common(1)[0][0] if values else None


@dataclass
class Adapter:
    """Canonical LoRA weights with their alphas, and the file's metadata.

    Alpha is looked up per module by kind: ``alpha[part]`` for linear and 1x1-conv modules,
    ``conv_alpha[part]`` for kxk convs (LoCon; falls back to ``alpha[part]``), and
    ``module_alpha[part][path]`` only for the odd module of a file from another trainer whose
    alpha differs from its kind. ``alpha_of(part, path)`` is the one lookup everything uses.
    """

    state: dict[str, dict[str, torch.Tensor]]
    alpha: dict[str, float]
    metadata: dict[str, str] = field(default_factory=dict)
    conv_alpha: dict[str, float] = field(default_factory=dict)
    module_alpha: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def from_module_alphas(
        cls, state: dict[str, dict[str, torch.Tensor]], alphas: dict[str, dict[str, float]],
        metadata: dict[str, str] | None = None,
    ) -> Adapter:
        """Fold per-module alphas into one alpha per kind (plus exceptions); a missing alpha is the rank."""
        adapter = cls(state, {}, dict(metadata or {}))
        for part, sd in state.items():
            given = alphas.get(part, {})
            per_module = {p: float(given.get(p, adapter.rank_of(part, p))) for p in module_paths(sd)}
            linear = [a for p, a in per_module.items() if not adapter.is_kxk_conv(part, p)]
            conv = [a for p, a in per_module.items() if adapter.is_kxk_conv(part, p)]
            adapter.alpha[part] = most_common(linear) or most_common(conv) or 1.0
            if conv:
                adapter.conv_alpha[part] = most_common(conv)  # type: ignore[assignment]
            odd = {p: a for p, a in per_module.items() if a != adapter.alpha_of(part, p)}
            if odd:
                adapter.module_alpha[part] = odd
        return adapter

    def modules(self, part: str) -> list[str]:
        return module_paths(self.state.get(part, {}))

    @property
    def network(self) -> str:
        return network_of(self.state)

    def rank_of(self, part: str, path: str) -> int:
        """LoRA's rank; LoHa's and a LoKr's inner dimension; for a LoKr module made of two full
        matrices, the rank at which peft builds it that way (``full_lokr_rank``)."""
        sd = self.state[part]
        for key in ("lora_A.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
            if f"{path}.{key}" in sd:
                return int(sd[f"{path}.{key}"].shape[0])
        return full_lokr_rank(sd[f"{path}.lokr_w2"])

    def is_full_lokr(self, part: str, path: str) -> bool:
        sd = self.state[part]
        return f"{path}.lokr_w1" in sd and f"{path}.lokr_w2" in sd

    def is_kxk_conv(self, part: str, path: str) -> bool:
        sd = self.state[part]
        down = sd.get(f"{path}.lora_A.weight", sd.get(f"{path}.lokr_w2"))
        if down is not None and down.dim() == 4:
            return down.shape[2] * down.shape[3] > 1
        # LoHa and LoKr keep convs flattened: the ResNet convs are known by name
        return down is None and path.rsplit(".", 1)[-1] in LOCON_TARGETS

    def alpha_of(self, part: str, path: str) -> float:
        if path in self.module_alpha.get(part, {}):
            return self.module_alpha[part][path]
        if self.is_kxk_conv(part, path) and part in self.conv_alpha:
            return self.conv_alpha[part]
        return self.alpha[part]

    @property
    def rank(self) -> int:
        """The rank of most modules (kxk convs may have their own)."""
        ranks = [self.rank_of(part, p) for part in self.state for p in self.modules(part)
                 if not self.is_kxk_conv(part, p)]
        return int(most_common(ranks) or 0)

    @property
    def is_dora(self) -> bool:
        return any(k.endswith("lora_magnitude_vector") for sd in self.state.values() for k in sd)

    @property
    def config(self) -> Config | None:
        """The training config embedded in the file (``stylelora.config``), or None."""
        text = self.metadata.get("stylelora.config")
        if not text:
            return None
        try:
            return Config.from_toml(text, "the adapter's embedded stylelora.core.config")
        except ConfigError as e:
            raise FormatError(f"the embedded training config cannot be read ({e}); pass the base model") from None

    def with_alpha_baked(self) -> Adapter:
        """The same deltas for loaders that read no alpha: alpha/rank folded into each lora_B, and every
        module of a part padded with zero rows/columns to the part's largest rank, so one rank and
        alpha = rank hold for the whole part (a loader without the header takes alpha = some module's
        rank for every module: scale 1 everywhere only when all ranks agree). DoRA magnitudes stay:
        W + scale·B·A is unchanged."""
        state: dict[str, dict[str, torch.Tensor]] = {}
        alphas: dict[str, dict[str, float]] = {}
        for part, sd in self.state.items():
            state[part] = dict(sd)
            alphas[part] = {}
            top = max(self.rank_of(part, p) for p in self.modules(part))
            for path in self.modules(part):
                rank = self.rank_of(part, path)
                down, up = sd[f"{path}.lora_A.weight"].float(), sd[f"{path}.lora_B.weight"]
                up = (up.double() * (self.alpha_of(part, path) / rank)).float()
                if rank < top:  # zero directions add nothing to up @ down
                    down = torch.cat([down, down.new_zeros((top - rank, *down.shape[1:]))])
                    up = torch.cat([up, up.new_zeros((up.shape[0], top - rank, *up.shape[2:]))], dim=1)
                state[part][f"{path}.lora_A.weight"], state[part][f"{path}.lora_B.weight"] = down, up
                alphas[part][path] = float(top)
        return Adapter.from_module_alphas(state, alphas, self.metadata)

    def num_modules(self) -> dict[str, int]:
        return {part: len(self.modules(part)) for part in self.state}

    def peft_fields(self, part: str) -> dict[str, Any]:
        """The peft config fields (``LoraConfig``, ``LoHaConfig`` or ``LoKrConfig`` by ``network``) that
        recreate one part's layers: the rank of most modules, the part's alpha, the modules that differ
        from them (by plain module path) and every module."""
        paths = self.modules(part)
        ranks = {p: self.rank_of(part, p) for p in paths}
        alphas = {p: self.alpha_of(part, p) for p in paths}
        r = int(most_common(list(ranks.values())) or 0)
        fields: dict[str, Any] = {
            "r": r,
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: a for p, a in alphas.items() if a != self.alpha[part]},
            "target_modules": paths,
        }
        if self.network == "lora":
            fields["lora_alpha"] = self.alpha[part]
            fields["use_dora"] = any(k.endswith("lora_magnitude_vector") for k in self.state[part])
        else:
            fields["alpha"] = self.alpha[part]
        if self.network == "lokr":
            fields["decompose_factor"] = self.lokr_factor(part)
            fields["decompose_both"] = any(k.endswith(".lokr_w1_a") for k in self.state[part])
        return fields

    def lokr_factor(self, part: str) -> int:
        """The ``decompose_factor`` that splits every LoKr module of ``part`` into the stored shapes."""
        from peft.tuners.lokr.layer import factorization

        sd = self.state[part]
        sides = []
        for path in self.modules(part):
            w1 = sd.get(f"{path}.lokr_w1")
            w1_rows = w1.shape[0] if w1 is not None else sd[f"{path}.lokr_w1_a"].shape[0]
            w1_cols = w1.shape[1] if w1 is not None else sd[f"{path}.lokr_w1_b"].shape[1]
            w2 = sd.get(f"{path}.lokr_w2")
            w2_rows = w2.shape[0] if w2 is not None else sd[f"{path}.lokr_w2_a"].shape[0]
            w2_cols = w2.shape[1] if w2 is not None else None  # a flattened w2_b also holds the kernel
            cols = w1_cols * w2_cols if w2_cols is not None else None
            sides.append((w1_rows * w2_rows, w1_rows, cols, w1_cols))
        for factor in [-1, *sorted({s[1] for s in sides} | {s[3] for s in sides})]:
            if all(factorization(out, factor)[0] == rows and (cols is None or factorization(cols, factor)[0] == c)
                   for out, rows, cols, c in sides):
                return int(factor)
        raise FormatError(f"{part}: the LoKr factors do not come from one decompose factor; cannot rebuild them")

    def delta(self, part: str, path: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The change this module makes to a base weight of ``shape``, at strength 1 (alpha/rank applied)."""
        sd = self.state[part]
        scale = self.alpha_of(part, path) / self.rank_of(part, path)
        if self.network == "loha":
            w1 = sd[f"{path}.hada_w1_a"] @ sd[f"{path}.hada_w1_b"]
            weight = w1 * (sd[f"{path}.hada_w2_a"] @ sd[f"{path}.hada_w2_b"])
        elif self.network == "lokr":
            w1 = sd.get(f"{path}.lokr_w1")
            w1 = w1 if w1 is not None else sd[f"{path}.lokr_w1_a"] @ sd[f"{path}.lokr_w1_b"]
            w2 = sd.get(f"{path}.lokr_w2")
            w2 = w2 if w2 is not None else sd[f"{path}.lokr_w2_a"] @ sd[f"{path}.lokr_w2_b"]
            # a full conv factor (out, in, k, k): the kernel stays with each entry, as peft's make_kron does
            weight = torch.kron(w1[:, :, None, None], w2) if w2.dim() > 2 else torch.kron(w1, w2)
        else:
            weight = sd[f"{path}.lora_B.weight"].flatten(1) @ sd[f"{path}.lora_A.weight"].flatten(1)
        return (weight * scale).reshape(shape)


@dataclass
class ModelLayout:
    """What adapter files are checked against: a base model's adaptable modules and their weight shapes."""

    kind: str
    shapes: dict[str, dict[str, tuple[int, ...]]]
    denoiser_config: dict[str, Any] = field(default_factory=dict)  # what kohya names may depend on
    name: str = ""

    @classmethod
    def of(cls, model: BaseModel | ModelLayout | dict[str, list[str]]) -> ModelLayout:
        """The layout of a loaded model; a layout passes through; a bare ``{part: [module paths]}``
        (``lora.adaptable_modules``) gives names without shapes, so shapes go unchecked, on the plainest
        family that has those parts."""
        if isinstance(model, ModelLayout):
            return model
        if isinstance(model, dict):
            family = families.for_parts(model)
            return cls(next(iter(family.kinds)), {part: dict.fromkeys(paths, ()) for part, paths in model.items()})
        return cls(model.kind, module_shapes(model), dict(model.denoiser.config), model.name)

    @property
    def family(self) -> ModelFamily:
        return families.family_of(self.kind)

    @property
    def modules(self) -> dict[str, list[str]]:
        return {part: sorted(s) for part, s in self.shapes.items()}

    @cached_property
    def kohya(self) -> KohyaNames:
        return KohyaNames(self.modules, self.family, self.denoiser_config)
