"""FLUX.1 [dev] and SD3.5 Large as published (their diffusers configs: black-forest-labs/FLUX.1-dev,
stabilityai/stable-diffusion-3.5-large), built on the meta device: every module's name and shape, no weights and no
memory. The estimate benchmark counts a training step on them; the tests map exported adapter keys onto them;
gpu_check builds their transformers with random weights on a card.

    from published_models import flux_dev, sd35_large
    model = flux_dev()            # a stylelora BaseModel whose parts live on the meta device
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SD35_LARGE_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                              num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                              pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
# the 16-channel VAE both use (FLUX.1's shift and scale; SD3.5's are 0.0609 and 1.5305)
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16, sample_size=1024,
           use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def _model(parts: dict[str, Any], name: str, kind: str) -> Any:
    from stylelora import families
    from stylelora.model.base import BaseModel

    return BaseModel(SimpleNamespace(**parts, vae_scale_factor=8), name, kind, families.family_of(kind))


def flux_transformer(**overrides: Any) -> Any:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**{**FLUX_DEV_TRANSFORMER, **overrides})


def sd35_transformer(**overrides: Any) -> Any:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**{**SD35_LARGE_TRANSFORMER, **overrides})


def flux_dev(device: str = "meta") -> Any:
    """FLUX.1 [dev]: its transformer, VAE, CLIP-L and T5-XXL (tokenizers left out) on ``device``."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device(device):
        parts = {"transformer": flux_transformer(), "vae": AutoencoderKL(**VAE),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                 "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL))}
    return _model(parts, "black-forest-labs/FLUX.1-dev", "flux-dev")


def sd35_large(device: str = "meta") -> Any:
    """SD3.5 Large: its transformer, VAE, CLIP-L, CLIP-G and T5-XXL on ``device``."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device(device):
        parts = {"transformer": sd35_transformer(),
                 "vae": AutoencoderKL(**{**VAE, "shift_factor": 0.0609, "scaling_factor": 1.5305}),
                 "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
                 "text_encoder_3": T5EncoderModel(T5Config(**T5_XXL))}
    return _model(parts, "stabilityai/stable-diffusion-3.5-large", "sd35-large")
