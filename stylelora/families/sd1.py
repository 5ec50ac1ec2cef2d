"""SD1.x: a UNet with 1x1-conv proj_in/proj_out and OpenAI's CLIP ViT-L text encoder (quick_gelu), 512 px,
epsilon prediction. Built-ins: ``builtin:tiny`` (tests, CPU demo) and ``builtin:small`` (benchmarks)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..model.base import Configs
from ..model.builtin import clip_config, clip_tokenizer
from .stable_diffusion import StableDiffusionFamily

# Sizes of the SD1-shaped built-ins. tiny: tests and the CPU demo (64 px native). small: the same
# layout as SD1.5 (three cross-attention levels, two layers per block, VAE factor 8) at about a tenth
# of its width, 256 px native, for benchmarks that should resemble real training.
SD1_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "unet": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16),
        "vae": dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, layers_per_block=1, sample_size=64),
        "clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     projection_dim=32),
    },
    "small": {
        "unet": dict(sample_size=32, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32),
        "vae": dict(block_out_channels=(32, 64, 128, 128), norm_num_groups=32, layers_per_block=1, sample_size=256),
        "clip": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                     projection_dim=256),
    },
}



def build_tiny(prediction_type: str = "epsilon") -> Any:
    """An SD1.x-shaped pipeline with small, random, deterministic weights (for tests and demos).

    The VAE downsamples by 8 and the UNet has cross-attention transformer blocks with 1x1-conv
    proj_in/proj_out, as SD1.5 does, so key names and shapes exercise the real code paths.
    """
    return build_sd1(SD1_SIZES["tiny"], prediction_type)


def build_small(prediction_type: str = "epsilon") -> Any:
    """``builtin:small``: SD1.5's layout at a tenth of its width (256 px native), for benchmarks."""
    return build_sd1(SD1_SIZES["small"], prediction_type)


def build_sd1(size: dict[str, Any], prediction_type: str) -> Any:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**size["unet"], use_linear_projection=False)
        vae = AutoencoderKL(
            **size["vae"],
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
        )
        text_encoder = CLIPTextModel(clip_config(tokenizer, **size["clip"]))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class SD1(StableDiffusionFamily):
    name = "sd1"
    kinds: ClassVar[dict[str, str]] = {"sd1": "SD1.x"}
    builtins: ClassVar[dict[str, Any]] = {"tiny": build_tiny, "small": build_small}
    suggestions = ("builtin:tiny", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    base_model_version: ClassVar[dict[str, str]] = {"sd1": "sd_v1"}
    modelspec_architecture: ClassVar[dict[str, str]] = {"sd1": "stable-diffusion-v1"}

    def detect(self, configs: Configs) -> str | None:
        """Any other conditional UNet (registered last: SD2 and SDXL are told apart first)."""
        return "sd1" if configs.get("denoiser", "cross_attention_dim") is not None else None

    def detect_single_file(self, keys: Any) -> str | None:
        """Any other single file (registered last): diffusers' SD1 loader says what is wrong with it."""
        return "sd1"

    def single_file_resolution(self, kind: str) -> int:
        return 512

    def save_single_file(self, pipeline: Any, out: Any, precision: str) -> Any:
        from .ldm_single_file import save_single_file

        return save_single_file(pipeline, out, precision)
