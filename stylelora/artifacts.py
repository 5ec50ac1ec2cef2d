"""What a run hands the user: the adapter files (kohya and diffusers) and the sample images."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import Config
from .fileio import atomic_path
from .formats import Adapter, save_diffusers, save_kohya
from .metadata import kohya_metadata
from .models import LOCON_TARGETS, BaseModel, lora_state


def _fold_conv_alpha(state: dict[str, dict[str, torch.Tensor]], config: Config) -> dict[str, dict[str, torch.Tensor]]:
    """LoCon convs train with conv_alpha, but a file holds one alpha per part (diffusers mis-scales mixed
    alphas): fold conv_alpha/alpha into their up weights, so alpha/rank * up @ down is the trained delta."""
    if not config.lora.conv_rank or "unet" not in state:
        return state
    ratio = config.lora.conv_alpha / config.lora.alpha
    unet = {
        k: v * ratio if k.endswith(".lora_B.weight") and k.split(".")[-3] in LOCON_TARGETS else v
        for k, v in state["unet"].items()
    }
    return {**state, "unet": unet}


def export_adapter(model: BaseModel, config: Config, out: Path, step: int, num_images: int) -> list[Path]:
    """Write the run's adapter in kohya and diffusers formats."""
    alpha = {part: config.lora.alpha for part in ("unet", "text_encoder")}
    metadata = kohya_metadata(config, model, step, num_images)
    network_args = {}
    if config.lora.conv_rank:
        network_args.update({"conv_dim": str(config.lora.conv_rank), "conv_alpha": f"{config.lora.conv_alpha:g}"})
    if config.lora.dora:
        network_args["dora_wd"] = "true"
    if network_args:
        metadata["ss_network_args"] = json.dumps(network_args)
    cfg = config.train
    metadata.update({  # the training facts sd-scripts records, so tools and Civitai show them
        "ss_optimizer": cfg.optimizer, "ss_min_snr_gamma": f"{cfg.min_snr_gamma:g}",
        "ss_noise_offset": f"{cfg.noise_offset:g}", "ss_zero_terminal_snr": str(cfg.zero_terminal_snr),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing), "ss_mixed_precision": cfg.mixed_precision,
    })
    adapter = Adapter(_fold_conv_alpha(lora_state(model), config), alpha, metadata)
    kohya = save_kohya(out / f"{config.run_name}.safetensors", adapter, config.export.precision)
    diffusers = save_diffusers(out / "diffusers", adapter, config.export.precision)
    return [kohya, diffusers]


def render_samples(model: BaseModel, config: Config, out: Path, step: int) -> list[Path]:
    paths = []
    unet_mode, te_mode = model.unet.training, model.text_encoder.training
    model.unet.eval()
    model.text_encoder.eval()
    for i, prompt in enumerate(config.sample.prompts):
        image = model.pipeline(
            prompt,
            negative_prompt=config.sample.negative_prompt or None,
            num_inference_steps=config.sample.steps,
            guidance_scale=config.sample.guidance,
            height=config.data.resolution,
            width=config.data.resolution,
            generator=torch.Generator().manual_seed(config.sample.seed + i),
        ).images[0]
        path = out / "samples" / f"step-{step:06d}-{i:02d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        paths.append(path)
    model.unet.train(unet_mode)
    model.text_encoder.train(te_mode)
    return paths
