"""What a run hands the user: the adapter files (kohya and diffusers) and the sample images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..adapters.adapter import Adapter, ModelLayout
from ..adapters.formats import save_diffusers, save_kohya
from ..adapters.metadata import adapter_facts, kohya_metadata
from ..core.config import Config
from ..core.fileio import atomic_path
from ..model.base import BaseModel
from ..model.lora import lora_alphas, lora_state

log = logging.getLogger(__name__)


def export_adapter(
    model: BaseModel, config: Config, out: Path, step: int, num_images: int, items: list | None = None,
    total_steps: int | None = None, epoch: int | None = None,
) -> list[Path]:
    """Write the run's adapter in kohya and diffusers formats, each re-read and verified (LoHa and LoKr:
    the kohya file only, in LyCORIS' layout).

    Alphas are read from the injected peft layers, so LoCon's conv alpha comes out as trained.
    DoRA has no kohya form that loads right everywhere, so a DoRA run writes the diffusers file only.
    """
    adapter = Adapter.from_module_alphas(lora_state(model), lora_alphas(model))
    layout = ModelLayout.of(model)
    adapter.metadata.update(adapter_facts(adapter, layout.kind))  # what the weights say, for both files
    adapter.metadata.update(kohya_metadata(config, model, step, num_images, items, total_steps, epoch))
    cfg = config.train
    adapter.metadata.update({  # the loop's facts under sd-scripts' keys, so tools and Civitai show them
        "ss_min_snr_gamma": f"{cfg.min_snr_gamma:g}",
        "ss_noise_offset": f"{cfg.noise_offset:g}",
        "ss_zero_terminal_snr": str(cfg.zero_terminal_snr),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_lr_scheduler_num_cycles": str(cfg.lr_scheduler_cycles),
        "ss_lr_scheduler_power": f"{cfg.lr_scheduler_power:g}",
        "stylelora.ema": f"{cfg.ema_decay:g}" if cfg.ema else "off",
    })
    # an epoch's adapter sits beside the final one, named as kohya names them (name-000002.safetensors)
    suffix = f"-{epoch:06d}" if epoch is not None else ""
    paths = []
    if adapter.is_dora:
        log.warning("DoRA adapter: writing the diffusers format only (no kohya file; see stylelora export)")
    else:
        paths.append(save_kohya(out / f"{config.run_name}{suffix}.safetensors", adapter, layout,
                                config.export.precision))
    # diffusers loads LoRA only (LoHa and LoKr live in the LyCORIS layout); an epoch gets one file
    if adapter.network == "lora" and (epoch is None or adapter.is_dora):
        paths.append(save_diffusers(out / f"diffusers{suffix}", adapter, layout, config.export.precision,
                                    bake_alpha=config.export.bake_alpha))
    return paths


def render_samples(model: BaseModel, config: Config, out: Path, step: int) -> list[Path]:
    """The sample prompts rendered with the model's own pipeline, one PNG per prompt."""
    paths = []
    model.pipeline.set_progress_bar_config(disable=True)  # progress is the run's events, not a bar per sample
    networks = [model.denoiser, *model.text_encoders]
    modes = [network.training for network in networks]
    for network in networks:
        network.eval()
    for i, prompt in enumerate(config.sample.prompts):
        image = _sample(model, config, prompt, torch.Generator().manual_seed(config.sample.seed + i))
        path = out / "samples" / f"step-{step:06d}-{i:02d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        paths.append(path)
    for network, mode in zip(networks, modes, strict=True):
        network.train(mode)
    return paths


def _sample(model: BaseModel, config: Config, prompt: str, generator: torch.Generator) -> Any:
    """One sample image. The latents are decoded here, in the VAE's own precision: the pipeline would hand
    the VAE latents in whatever the denoiser returned, which is fp32 from one accelerate wraps for a bf16 or
    fp16 run, and fp16 beside the fp32 VAE an fp16 SDXL run keeps."""
    pipe, family = model.pipeline, model.family
    sample, side = config.sample, config.data.resolution
    own = family.sample_settings(model.kind)  # the model's steps and guidance where the config sets none
    steps, guidance = sample.steps or own["steps"], own["guidance"] if sample.guidance is None else sample.guidance
    with torch.no_grad():
        prompts = family.prompt_embeddings(model, prompt, sample.negative_prompt, guidance > 1,
                                           config.model.clip_skip, config.data.max_token_length)
    latents = pipe(
        **prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=side,
        width=side,
        generator=generator,
        output_type="latent",
    ).images
    with torch.no_grad():
        pixels = family.decode(model, latents, (side, side))
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]
