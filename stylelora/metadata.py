"""Metadata embedded in exported adapters: kohya's ss_* keys, modelspec, and the run's config."""

from __future__ import annotations

import datetime as dt

from .config import Config
from .models import BaseModel

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}


def kohya_metadata(config: Config, model: BaseModel, steps: int, num_images: int) -> dict[str, str]:
    """String metadata as sd-scripts writes it, so A1111, ComfyUI and Civitai show the right facts."""
    res = config.data.resolution
    te_lr = config.train.text_encoder_lr or config.train.lr
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.lora.rank),
        "ss_network_alpha": f"{config.lora.alpha:g}",
        "ss_base_model_version": BASE_MODEL_VERSION[model.kind],
        "ss_v2": str(model.kind == "sd2"),
        "ss_output_name": config.run_name,
        "ss_sd_model_name": config.model.name,
        "ss_resolution": f"({res}, {res})",
        "ss_steps": str(steps),
        "ss_max_train_steps": str(config.train.steps),
        "ss_num_train_images": str(num_images),
        "ss_learning_rate": f"{config.train.lr:g}",
        "ss_unet_lr": f"{config.train.lr:g}",
        "ss_text_encoder_lr": f"{te_lr:g}" if config.lora.train_text_encoder else "0",
        "ss_batch_size_per_device": str(config.train.batch_size),
        "ss_gradient_accumulation_steps": str(config.train.gradient_accumulation_steps),
        "ss_lr_scheduler": config.train.lr_scheduler,
        "ss_seed": str(config.train.seed),
        "ss_network_train_unet_only": str(not config.lora.train_text_encoder),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{ARCHITECTURE[model.kind]}/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": config.run_name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": model.prediction_type,
        "modelspec.date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "stylelora.config": config.to_toml(),
    }
    meta.update(_data_facts(config))
    if config.data.trigger_word:
        meta["modelspec.trigger_phrase"] = config.data.trigger_word
    return meta


def _data_facts(config: Config) -> dict[str, str]:
    """How the data was fed, under the keys sd-scripts uses (Civitai and the A1111 info panel show them)."""
    data = config.data
    return {
        "ss_enable_bucket": str(data.buckets),
        "ss_bucket_no_upscale": str(data.bucket_no_upscale),
        "ss_min_bucket_reso": str(data.bucket_step),
        "ss_max_bucket_reso": str(max(data.bucket_step, 2 * data.resolution // data.bucket_step * data.bucket_step)),
        "ss_flip_aug": str(data.random_flip),
        "ss_random_crop": str(not data.center_crop),
        "ss_shuffle_caption": str(data.shuffle_tags),
        "ss_keep_tokens": str(data.keep_tags),
        "ss_caption_dropout_rate": f"{data.caption_dropout:g}",
        "ss_prior_loss_weight": f"{data.prior_loss_weight:g}" if data.reg_path else "1",
        "ss_cache_latents": str(config.cache.latents != "off" and data.center_crop),
    }
