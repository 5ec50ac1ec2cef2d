"""A loaded base model: its diffusers pipeline, the name it was loaded by, its kind, and the family that
knows what that kind does differently (``stylelora.model.family.ModelFamily``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .family import ModelFamily


@dataclass
class BaseModel:
    """A pipeline plus what stylelora needs to know about it. Everything that depends on the architecture
    (which component denoises, which text encoders there are, the native size) is the family's answer."""

    pipeline: Any  # a diffusers pipeline (a skeleton holds only the adaptable parts, on the meta device)
    name: str
    kind: str  # one of family.kinds, e.g. "sd2-v"
    family: ModelFamily

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that denoises (SD's UNet, a diffusion transformer): ``pipeline.<family.denoiser>``."""
        return getattr(self.pipeline, self.family.denoiser)

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under the name Stable Diffusion code knows it by (tests and benchmarks use it)."""
        return self.denoiser

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.pipeline.text_encoder

    @property
    def text_encoder_2(self) -> torch.nn.Module | None:
        return getattr(self.pipeline, "text_encoder_2", None)

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.tokenizer

    @property
    def tokenizers(self) -> list[Any]:
        """One tokenizer per text encoder, in the order of ``text_encoders``."""
        return self.family.tokenizers(self.pipeline)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """Every text encoder the conditioning uses, in order (adaptable or frozen)."""
        return self.family.text_encoders(self.pipeline)

    @property
    def token_limit(self) -> int:
        """How many tokens (start and end included) a caption may have before the first encoder cuts it."""
        return self.family.token_limit(self.pipeline)

    def parts(self) -> list[tuple[str, torch.nn.Module]]:
        """The networks that can carry an adapter, by part name (the denoiser first, then its text encoders)."""
        found = [(part, getattr(self.pipeline, part, None)) for part in self.family.parts]
        return [(part, module) for part, module in found if module is not None]

    @property
    def prediction_type(self) -> str:
        return self.family.prediction_type(self.pipeline)

    @property
    def native_resolution(self) -> int:
        return self.family.native_resolution(self.pipeline)
