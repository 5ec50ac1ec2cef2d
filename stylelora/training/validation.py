"""Validation loss on held-out images, with noise and timesteps fixed once, so values compare across steps.

The held-out images are picked by the run's seed and never trained on. Each is scored at a few
timesteps spread over the schedule; the VAE's mean latent is used (no sampling), the UNet and the
text encoder run in eval mode (no dropout), so identical weights give an identical number.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from ..model import losses

T = TypeVar("T")
TIMESTEPS_PER_IMAGE = 4


def split_holdout(items: list[T], count: int, seed: int) -> tuple[list[T], list[T]]:
    """(training items, held-out items): ``count`` items picked by ``seed``, the rest in their order."""
    if count <= 0:
        return list(items), []
    from ..core.errors import ConfigError

    if count >= len(items):
        raise ConfigError(
            f"train.validation_images: {count} held out of {len(items)} images leaves nothing to train on; "
            "hold out fewer (1-2 of a small dataset) or set it to 0"
        )
    picked = set(torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()[:count])
    return [x for i, x in enumerate(items) if i not in picked], [x for i, x in enumerate(items) if i in picked]


class Validator:
    """Scores the current LoRA on fixed (image, caption, noise, timestep) tuples."""

    def __init__(self, examples: list[dict[str, Any]], model: Any, objective: Any, device: torch.device,
                 dtype: torch.dtype, seed: int, max_token_length: int = 75, clip_skip: int = 1):
        self.model, self.objective, self.device, self.dtype = model, objective, device, dtype
        self.clip_skip = clip_skip
        vae = model.vae
        pixels = torch.stack([e["pixels"] for e in examples]).to(device, vae.dtype)
        with torch.no_grad():
            shift = getattr(vae.config, "shift_factor", None) or 0.0  # as the batches scale latents
            latents = (vae.encode(pixels).latent_dist.mode() - shift) * vae.config.scaling_factor
        ids = model.family.tokenize(model, [str(e["caption"]) for e in examples], max_token_length)
        time_ids = torch.tensor([e["view"].time_ids for e in examples], dtype=torch.float32)
        n, k = len(examples), TIMESTEPS_PER_IMAGE
        self.timesteps = objective.spread(n, k).to(device)  # each image at k timesteps over the schedule
        self.latents = latents.repeat_interleave(k, dim=0)
        self.ids = [t.repeat_interleave(k, dim=0).to(device) for t in ids]
        self.time_ids = time_ids.repeat_interleave(k, dim=0).to(device)
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(self.latents.shape, generator=generator).to(self.latents)

    @torch.no_grad()
    def loss(self, autocast: Any = None) -> float:
        import contextlib

        denoiser, encoders, family = self.model.denoiser, self.model.text_encoders, self.model.family
        networks = [denoiser, *encoders]
        modes = [network.training for network in networks]
        for network in networks:
            network.eval()
        try:
            with autocast() if autocast else contextlib.nullcontext():
                noisy = self.objective.noisy(self.latents, self.noise, self.timesteps)
                target = self.objective.target(self.latents, self.noise, self.timesteps)
                text = family.encode_text(encoders, self.ids, self.clip_skip)
                pred = family.predict(denoiser, noisy, self.timesteps, text, self.time_ids)
                return float(losses.per_example_mse(pred, target).mean())
        finally:
            for network, mode in zip(networks, modes, strict=True):
                network.train(mode)
