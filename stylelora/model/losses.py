"""What the denoiser learns: the noise schedule, the noise, the target, and the per-example loss weights, for
DDPM (the SD UNet families: ``DiffusionObjective``) and rectified flow (SD3.5, FLUX.1: ``FlowObjective``).

Everything random is drawn from the ``torch.Generator`` passed in, one per example in the loop (keyed
by the example's seed, epoch and slot), so a resumed run draws the same numbers as an uninterrupted
one, and an example gets the same noise and timestep in any batch, on any of several processes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError


def training_scheduler(scheduler_config: Any, prediction_type: str, zero_terminal_snr: bool = False) -> Any:
    """The DDPM noise schedule to train with, built from the model's own scheduler config.

    ``zero_terminal_snr`` rescales the betas so the last timestep is pure noise (diffusers'
    ``rescale_zero_terminal_snr``, Lin et al. 2023); it only makes sense with v-prediction.
    """
    from diffusers import DDPMScheduler

    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ConfigError(
            f"train.zero_terminal_snr: needs v-prediction, but this model predicts {prediction_type}; "
            "set model.prediction_type=v_prediction (or turn zero_terminal_snr off)"
        )
    return DDPMScheduler.from_config(
        scheduler_config, prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr
    )


def sample_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise; with ``offset`` a per-image, per-channel constant ``offset * N(0, 1)`` is added.

    The offset (Guttenberg's "noise offset") lets the model learn to change the mean brightness of an
    image, which plain noise almost never asks of it. The base noise is drawn first, then the offsets.
    """
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def noise_and_timesteps(
    generators: list[torch.Generator], latent_shape: torch.Size | tuple[int, ...], num_timesteps: int,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, from its own generator: its noise (``sample_noise``), then its timestep in [0, num_timesteps)."""
    noise, timesteps = [], []
    for generator in generators:
        noise.append(sample_noise((1, *latent_shape), generator, offset))
        timesteps.append(torch.randint(0, num_timesteps, (1,), generator=generator))
    return torch.cat(noise), torch.cat(timesteps)


def training_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "epsilon":
        return noise
    raise ConfigError(
        f"model.prediction_type: training for '{prediction_type}' is not supported; use epsilon or v_prediction"
    )


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    from diffusers.training_utils import compute_snr

    return compute_snr(scheduler, timesteps.cpu()).to(timesteps.device)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example loss weights of Min-SNR-gamma (Hang et al. 2023); all ones when ``gamma`` is 0.

    epsilon: min(snr, gamma) / snr; v-prediction: min(snr, gamma) / (snr + 1).
    """
    if not gamma:
        return torch.ones(timesteps.shape, device=timesteps.device)
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    return clipped / ratio


def per_example_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each example of the batch (shape ``[batch]``), computed in fp32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)


class DiffusionObjective:
    """DDPM training (the SD UNet families): noise and a timestep in [0, T) per example, the scheduler's noisy
    latents, the epsilon or velocity target, and Min-SNR-gamma weights (``ModelFamily.objective``)."""

    def __init__(self, scheduler: Any, noise_offset: float = 0.0, min_snr_gamma: float = 0.0) -> None:
        self.scheduler, self.noise_offset, self.min_snr_gamma = scheduler, noise_offset, min_snr_gamma

    def draw(self, generators: list[torch.Generator], latent_shape: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return noise_and_timesteps(generators, latent_shape, self.scheduler.config.num_train_timesteps,
                                   self.noise_offset)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return training_target(self.scheduler, latents, noise, timesteps)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        return min_snr_weights(self.scheduler, timesteps, self.min_snr_gamma)

    def spread(self, images: int, per_image: int) -> torch.Tensor:
        """Each image at ``per_image`` timesteps spread evenly over the schedule (offset per image)."""
        total = self.scheduler.config.num_train_timesteps
        steps = torch.arange(per_image) * (total // per_image)
        return torch.cat([(steps + (i * total // (images * per_image))) % total for i in range(images)])


def static_shift(shift: float) -> Any:
    """SD3's timestep shift: sigma = shift·u / (1 + (shift - 1)·u), toward noise for shift > 1."""

    def shifted(u: torch.Tensor, latent_shape: Any) -> torch.Tensor:
        return shift * u / (1 + (shift - 1) * u)

    return shifted


def resolution_shift(base_shift: float = 0.5, max_shift: float = 1.15, base_tokens: int = 256,
                     max_tokens: int = 4096, patch: int = 2) -> Any:
    """FLUX.1's resolution-dependent shift, as its sampler and sd-scripts' ``flux_shift`` compute it: mu grows
    linearly with the image's token count (latent pixels / patch²) from ``base_shift`` to ``max_shift``, and
    sigma = e^mu / (e^mu + 1/u - 1)."""

    def shifted(u: torch.Tensor, latent_shape: Any) -> torch.Tensor:
        tokens = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
        mu = base_shift + (max_shift - base_shift) * (tokens - base_tokens) / (max_tokens - base_tokens)
        return math.exp(mu) / (math.exp(mu) + (1 / u.clamp_min(1e-6) - 1))

    return shifted


class FlowObjective:
    """Rectified-flow training (SD3.5, FLUX.1), as diffusers' and kohya's trainers do it: per example a sigma
    in (0, 1) drawn by ``sampling`` (logit-normal by default: SD3 paper, Esser et al. 2024) and shifted toward
    noise (``shift(u, latent_shape)``), the noisy latents (1 - sigma)·x + sigma·noise, the velocity target
    noise - x, and SD3's optional loss weighting (``sigma_sqrt``, ``cosmap``). The denoiser is given sigma;
    each family scales it as its model expects."""

    def __init__(self, sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 shift: Any = None, weighting: str = "none", noise_offset: float = 0.0, mode_scale: float = 1.29):
        self.sampling, self.logit_mean, self.logit_std, self.mode_scale = sampling, logit_mean, logit_std, mode_scale
        self.shift = shift or static_shift(1.0)
        self.weighting, self.noise_offset = weighting, noise_offset

    def draw(self, generators: list[torch.Generator], latent_shape: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        noise, sigmas = [], []
        for generator in generators:
            noise.append(sample_noise((1, *latent_shape), generator, self.noise_offset))
            u = compute_density_for_timestep_sampling(self.sampling, 1, self.logit_mean, self.logit_std,
                                                      self.mode_scale, generator=generator)
            sigmas.append(self.shift(u, latent_shape))
        return torch.cat(noise), torch.cat(sigmas)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = sigmas.reshape(-1, *[1] * (latents.dim() - 1)).to(latents)
        return (1 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting, sigmas=sigmas.float())

    def spread(self, images: int, per_image: int) -> torch.Tensor:
        """Each image at ``per_image`` sigmas spread evenly inside (0, 1) (offset per image), unshifted."""
        steps = (torch.arange(per_image) + 0.5) / per_image
        return torch.cat([(steps + i / (images * per_image)) % 1 for i in range(images)]).clamp(0.01, 0.99)
