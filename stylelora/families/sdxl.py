"""SDXL: a UNet with two text encoders (CLIP-L and OpenCLIP-G, penultimate states side by side, the pooled
text of the second) and the added size/crop conditioning (time ids); kohya names its UNet modules by the
original SGM layout. Built-in: ``builtin:tiny-sdxl``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..model.base import Configs
from ..model.builtin import clip_config, clip_tokenizer
from .sgm import sgm_path
from .stable_diffusion import StableDiffusionFamily

if TYPE_CHECKING:
    import torch

    from ..core.config import Config
    from ..model.base import BaseModel
    from ..model.text import TextStates

SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1."  # SGM checkpoints keep the second text encoder here
TIME_IDS = 6  # original size (h, w), crop top-left (top, left), target size (h, w)


def build_tiny_sdxl(prediction_type: str = "epsilon") -> Any:
    """An SDXL-shaped pipeline with small random deterministic weights: two text encoders, the
    added time/text conditioning, and SDXL's block layout (DownBlock2D then two cross-attention
    levels, two layers per block), so SGM key names and the XL loaders are exercised for real."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            cross_attention_dim=64,  # text_encoder hidden (32) + text_encoder_2 hidden (32)
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids + pooled text_encoder_2
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=64,
            force_upcast=True,  # as SDXL's own VAE: it overflows in fp16
        )
        encoders = []
        for cls in (CLIPTextModel, CLIPTextModelWithProjection):
            encoders.append(cls(clip_config(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, projection_dim=32, hidden_act="gelu")))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(pad_token="!"),  # OpenCLIP's, as SDXL's tokenizer_2
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def _joined(states: torch.Tensor, batch: int, chunks: int, window: int) -> torch.Tensor:
    """(batch * chunks, window, width) states as one sequence per caption: the first start state, each
    chunk's text states, the last end state (as :func:`encode`)."""
    import torch

    states = states.reshape(batch, chunks * window, -1)
    if chunks == 1:
        return states
    pieces = [states[:, :1]] + [states[:, i * window + 1 : (i + 1) * window - 1] for i in range(chunks)]
    return torch.cat([*pieces, states[:, -1:]], dim=1)


def encode_sdxl(text_encoder: Any, text_encoder_2: Any, ids: torch.Tensor, ids_2: torch.Tensor) -> TextStates:
    """SDXL's conditioning as its base model was trained and as kohya's sd-scripts and diffusers compute it:
    the penultimate hidden states of both encoders (no final layer norm), each caption's chunks joined as in
    :func:`encode`, side by side on width; the pooled text is text_encoder_2's projected output at the end
    token of the first chunk. SDXL already skips the last layer, so clip skip is not applied (kohya's SDXL
    trainer ignores it too)."""
    import torch

    from ..model.text import TextStates

    states = []
    output: Any = None
    for encoder, tokens in ((text_encoder, ids), (text_encoder_2, ids_2)):
        if tokens.dim() == 2:
            tokens = tokens[:, None]
        batch, chunks, window = tokens.shape
        output = encoder(tokens.reshape(batch * chunks, window).to(encoder.device), output_hidden_states=True)
        states.append(_joined(output.hidden_states[-2], batch, chunks, window))
    pooled = output.text_embeds.reshape(batch, chunks, -1)[:, 0]
    return TextStates(torch.cat(states, dim=-1), pooled)


class SDXL(StableDiffusionFamily):
    name = "sdxl"
    kinds: ClassVar[dict[str, str]] = {"sdxl": "SDXL"}
    architecture: ClassVar[str] = "sdxl-unet"
    structure = "two text encoders and added time conditioning"
    presets: ClassVar[dict[str, str]] = {"sdxl": "sdxl-style"}
    builtins: ClassVar[dict[str, Any]] = {"tiny-sdxl": build_tiny_sdxl}
    suggestions = ("builtin:tiny-sdxl", "stabilityai/stable-diffusion-xl-base-1.0")
    text_parts = ("text_encoder", "text_encoder_2")
    below_native_warning = frozenset({"sdxl"})
    base_model_version: ClassVar[dict[str, str]] = {"sdxl": "sdxl_base_v1-0"}
    modelspec_architecture: ClassVar[dict[str, str]] = {"sdxl": "stable-diffusion-xl-v1-base"}

    def detect(self, configs: Configs) -> str | None:
        """An XL pipeline class, or a UNet with SDXL's added text/time conditioning."""
        xl = "XL" in configs.pipeline_class or configs.get("denoiser", "addition_embed_type") == "text_time"
        return "sdxl" if xl else None

    def detect_single_file(self, keys: Any) -> str | None:
        return "sdxl" if any(k.startswith(SDXL_SINGLE_FILE_KEY) for k in keys) else None

    def single_file_resolution(self, kind: str) -> int:
        return 1024

    def pipeline_class(self, kind: str) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def single_file_kwargs(self, kind: str) -> dict[str, Any]:
        return {}

    def check_model(self, model: BaseModel, config: Config) -> None:
        """SDXL's conditioning already skips the last layer (``encode_sdxl``): clip skip does not apply."""

    def ignored_settings(self, kind: str) -> dict[str, str]:
        return {"model.clip_skip": "SDXL is conditioned on the layer before the last of both text encoders already "
                                   "(as kohya's SDXL trainer does); clip skip does not apply to SDXL"}

    def predict(self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextStates,
                time_ids: torch.Tensor | None) -> torch.Tensor:
        """The UNet with its added conditioning: the pooled text and the size/crop time ids."""
        if time_ids is None:
            raise ValueError("an SDXL UNet needs time ids (original size, crop, target size) beside the text")
        added = {"text_embeds": text.pooled, "time_ids": time_ids.to(text.pooled)}
        return denoiser(noisy, timesteps, text.states, added_cond_kwargs=added).sample

    def encode_text(self, encoders: Sequence[Any], ids: Sequence[torch.Tensor], clip_skip: int = 1,
                    frozen: TextStates | None = None) -> TextStates:
        return encode_sdxl(encoders[0], encoders[1], ids[0], ids[1])

    def vae_dtype(self, vae_config: Mapping[str, Any] | None, weight_dtype: torch.dtype) -> torch.dtype:
        """fp32 instead of fp16 for a VAE that overflows in fp16 (SDXL's own; its config says force_upcast, a
        fixed fp16 VAE does not)."""
        import torch

        if weight_dtype == torch.float16 and (vae_config or {}).get("force_upcast", False):
            return torch.float32
        return weight_dtype

    def prompt_embeddings(self, model: BaseModel, prompt: str, negative_prompt: str, guided: bool, clip_skip: int,
                          max_token_length: int) -> dict[str, Any]:
        """SDXL's two text encoders are the pipeline's own business (diffusers counts clip skip from 0)."""
        encoded = model.pipeline.encode_prompt(
            prompt, device=model.denoiser.device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt or None, clip_skip=clip_skip - 1 or None,
        )
        names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        return {n: e for n, e in zip(names, encoded, strict=False) if e is not None}

    def example_inputs(self, model: BaseModel, batch: int, side: int, max_token_length: int, encode: bool,
                       device: Any, dtype: Any) -> tuple[torch.Tensor, torch.Tensor, TextStates, torch.Tensor | None]:
        """As the SD families', with the pooled text and time ids; the text states are zeros (the encoders'
        share of a step is small beside the UNet's)."""
        import torch

        latents, timesteps, text, _ = super().example_inputs(model, batch, side, max_token_length, False, device,
                                                               dtype)
        unet = model.denoiser.config
        pooled = unet.projection_class_embeddings_input_dim - TIME_IDS * unet.addition_time_embed_dim
        text.pooled = torch.zeros(batch, pooled, device=device, dtype=dtype)
        return latents, timesteps, text, torch.zeros(batch, TIME_IDS, device=device, dtype=dtype)

    def kohya_prefix(self, part: str) -> str:
        return {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part]

    def kohya_unet_paths(self, paths: Sequence[str], denoiser_config: Any) -> dict[str, str | None]:
        """kohya's SDXL tools use the original SGM UNet's names."""
        lpb = (denoiser_config or {}).get("layers_per_block", 2)
        lpb = lpb if isinstance(lpb, int) else int(lpb[0])
        up_attention = {int(m.split(".")[1]) for m in paths if m.startswith("up_blocks.")
                        and m.split(".")[2] == "attentions"}
        return {path: sgm_path(path, lpb, up_attention) for path in paths}

    def kohya_aliases(self, modules: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, str]]:
        """Some trainers name SDXL files with diffusers paths: read them too."""
        return {"lora_unet_" + path.replace(".", "_"): ("unet", path) for path in modules.get("unet", [])}
