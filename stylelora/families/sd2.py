"""SD2: a UNet with linear proj_in/proj_out and an OpenCLIP ViT-H text encoder (gelu; its tokenizer pads
with "!"). Two kinds: ``sd2`` (512 px, epsilon) and ``sd2-v`` (768 px, v-prediction). Built-in:
``builtin:tiny-sd2v``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..model.base import Configs
from ..model.builtin import clip_config, clip_tokenizer
from .sd1 import SD1_SIZES
from .stable_diffusion import StableDiffusionFamily

if TYPE_CHECKING:

    from ..core.config import Config

OPEN_CLIP_SINGLE_FILE_KEY = "cond_stage_model.model."  # SD2's OpenCLIP text encoder in a single file


def build_tiny_sd2v(prediction_type: str = "v_prediction") -> Any:
    """An SD2-768-v-shaped pipeline with small random deterministic weights: linear proj_in/proj_out, a
    number of heads per block, an OpenCLIP-shaped text encoder (gelu, a tokenizer that pads with "!"),
    v-prediction, 96 px native (768-v is 96 latents wide, this is 12); its cross-attention is 48 wide,
    so only its structure says SD2."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer(pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=12, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16,
        )
        vae = AutoencoderKL(**SD1_SIZES["tiny"]["vae"], down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
        text_encoder = CLIPTextModel(clip_config(tokenizer, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, projection_dim=48, hidden_act="gelu"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


class SD2(StableDiffusionFamily):
    name = "sd2"
    kinds: ClassVar[dict[str, str]] = {"sd2": "SD2 512", "sd2-v": "SD2 768-v"}
    presets: ClassVar[dict[str, str]] = {"sd2-v": "sd2-768v"}
    builtins: ClassVar[dict[str, Any]] = {"tiny-sd2v": build_tiny_sd2v}
    suggestions = ("builtin:tiny-sd2v", "stabilityai/stable-diffusion-2-1")
    below_native_warning = frozenset({"sd2-v"})
    base_model_version: ClassVar[dict[str, str]] = {"sd2": "sd_v2", "sd2-v": "sd_v2_v"}  # sd-scripts: _v for v-pred
    modelspec_architecture: ClassVar[dict[str, str]] = {"sd2": "stable-diffusion-v2-512",
                                                        "sd2-v": "stable-diffusion-v2-768-v"}
    kohya_v2 = True

    def detect(self, configs: Configs) -> str | None:
        """Linear proj_in/proj_out (SD1 uses 1x1 convs), an OpenCLIP-shaped text encoder (gelu; OpenAI's CLIP
        uses quick_gelu) or SD2's 1024-wide cross-attention. 768-v: the scheduler predicts v; without a
        scheduler config, a UNet 96 latents wide (768 px; SD2-512 is 64)."""
        open_clip = configs.get("text_encoder", "hidden_act") == "gelu"
        if not (configs.get("denoiser", "use_linear_projection") or open_clip
                or configs.get("denoiser", "cross_attention_dim") == 1024):
            return None
        prediction = configs.get("scheduler", "prediction_type")
        if prediction is None:
            return "sd2-v" if (configs.get("denoiser", "sample_size") or 0) >= 96 else "sd2"
        return "sd2-v" if prediction == "v_prediction" else "sd2"

    def detect_single_file(self, keys: Any) -> str | None:
        # diffusers' default SD2 single file is 2.1, 768-v
        return "sd2-v" if any(k.startswith(OPEN_CLIP_SINGLE_FILE_KEY) for k in keys) else None

    def single_file_resolution(self, kind: str) -> int:
        return 768

    def apply_kind(self, pipeline: Any, kind: str, prediction_type: str) -> None:
        """SD2-512 against 768-v: the scheduler predicts as the kind says (unless model.prediction_type does)."""
        if prediction_type == "auto":
            self.set_prediction_type(pipeline, "v_prediction" if kind == "sd2-v" else "epsilon")

    def check_config(self, config: Config) -> list[str]:
        kind, prediction = config.model.kind, config.model.prediction_type
        if (kind, prediction) in (("sd2-v", "epsilon"), ("sd2", "v_prediction")):
            return [
                f"model.kind: '{kind}' is SD2 {'768-v (v-prediction)' if kind == 'sd2-v' else '512 (epsilon)'}, but "
                f"model.prediction_type is {prediction}; set model.kind={'sd2' if kind == 'sd2-v' else 'sd2-v'} "
                "or model.prediction_type=auto"
            ]
        return []

    def save_single_file(self, pipeline: Any, out: Any, precision: str) -> Any:
        from .ldm_single_file import save_single_file

        return save_single_file(pipeline, out, precision)
