"""kohya module names (A1111, ComfyUI, sd-scripts) for the modules of a base model, and back.

Each model family writes the forward map from the rules kohya's tools use for it
(``ModelFamily.kohya_names``); the reverse map is the inverse of the forward map over the base model's own
module list, so no key is ever parsed by guessing which underscores were dots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..core.errors import FormatError

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


class KohyaNames:
    """Kohya name <-> (part, module path) for one base model's module list.

    In a family whose original layout fuses modules (``ModelFamily.kohya_fuses``: FLUX.1's q, k and v are one
    ``qkv`` linear) several modules share a name: ``fused`` lists them under it, in the order the family's
    ``kohya_names`` gives them (their order in the fused layer), and ``adapters.fused`` writes and reads them as
    one module. Elsewhere two modules with one name are an error."""

    def __init__(self, modules: Mapping[str, Sequence[str]], family: Any, denoiser_config: Any = None) -> None:
        self.family = family
        self.forward: dict[tuple[str, str], str] = family.kohya_names(modules, denoiser_config)
        self.reverse: dict[str, tuple[str, str]] = {}
        self.fused: dict[str, list[tuple[str, str]]] = {}
        for key, name in self.forward.items():
            if name in self.fused:
                self.fused[name].append(key)
            elif name in self.reverse and family.kohya_fuses:
                self.fused[name] = [self.reverse.pop(name), key]
            elif name in self.reverse:  # two modules whose names differ only in '.' vs '_'
                raise FormatError(f"kohya name {name} is ambiguous: {self.reverse[name][1]} and {key[1]}")
            else:
                self.reverse[name] = key
        for name, key in family.kohya_aliases(modules).items():  # read, never written
            self.reverse.setdefault(name, key)

    def name(self, part: str, path: str) -> str:
        try:
            return self.forward[(part, path)]
        except KeyError:
            raise FormatError(
                f"{part} module '{path}' has no kohya name for this {self.family.name} model (it is not a module "
                "kohya's tools adapt); export it in the diffusers format instead"
            ) from None
