"""FLUX.1: a 12B rectified-flow transformer (19 double-stream and 38 single-stream blocks, 3072 wide) on 16-channel
latents packed in 2x2 patches, conditioned on T5-XXL's states and CLIP-L's pooled text. Two kinds: ``flux-dev``
(guidance-distilled: the guidance scale is an input of the model, fed 1.0 in training) and ``flux-schnell``
(timestep-distilled, no guidance input, 4 steps). Built-ins: ``builtin:tiny-flux`` ([dev]'s layout) and
``builtin:tiny-flux-schnell``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.errors import ConfigError
from ..model.base import Configs
from ..model.builtin import clip_config, clip_tokenizer, t5_config, t5_tokenizer
from .bfl import bfl_module, bfl_parameter
from .transformer import Original, TransformerFamily

if TYPE_CHECKING:
    import torch

    from ..model.base import BaseModel
    from ..model.text import TextStates

# a transformer in BFL's layout: bare (BFL's own files), or inside a checkpoint (ComfyUI)
SINGLE_FILE_KEYS = ("double_blocks.", "model.diffusion_model.double_blocks.", "single_transformer_blocks.")
TRAINING_GUIDANCE = 1.0  # [dev]'s guidance input while training (ai-toolkit's; sd-scripts and diffusers default 3.5)
PATCH = 2  # latents are packed in 2x2 patches: 16 channels become 64 per token
# the linear layers kohya's sd-scripts and ai-toolkit adapt in every double and single block (all of them)
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear"]


def build_tiny_flux(guidance: bool = True) -> Any:
    """A FLUX.1-shaped pipeline with small random deterministic weights: two double and two single blocks 32
    wide, a 16-channel VAE (FLUX's shift and scaling factor), a CLIP and a T5 encoder whose tokenizers are
    made in code, FLUX's scheduler; [dev] (a guidance input) unless ``guidance`` is off."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
            axes_dims_rope=(2, 2, 4))
        vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=8,
                            layers_per_block=1, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.1159, scaling_factor=0.3611)
        text_encoder = CLIPTextModel(clip_config(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, projection_dim=32))
        text_encoder_2 = T5EncoderModel(t5_config(tokenizer_2, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                  num_heads=4))
    if guidance:  # [dev]: the shift grows with the image's size; [schnell]: none
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def build_tiny_flux_schnell() -> Any:
    return build_tiny_flux(guidance=False)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents as FLUX's tokens: (B, h/2 · w/2, 4C), each token one 2x2 patch."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``pack`` undone for latents ``height`` x ``width``."""
    b, _, channels = tokens.shape
    c = channels // (PATCH * PATCH)
    patches = tokens.reshape(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def image_ids(height: int, width: int, device: Any, dtype: Any) -> torch.Tensor:
    """Each token's (0, row, column) in the patch grid, the positions FLUX's rotary embedding reads."""
    import torch

    rows = torch.arange(height // PATCH, device=device, dtype=dtype)[:, None].expand(-1, width // PATCH)
    cols = torch.arange(width // PATCH, device=device, dtype=dtype)[None, :].expand(height // PATCH, -1)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


class Flux(TransformerFamily):
    name = "flux"
    kinds: ClassVar[dict[str, str]] = {"flux-dev": "FLUX.1 [dev]", "flux-schnell": "FLUX.1 [schnell]"}
    architecture: ClassVar[str] = "flux"
    structure: ClassVar[str] = "double- and single-stream transformer blocks"
    presets: ClassVar[dict[str, str]] = {"flux-dev": "flux-style", "flux-schnell": "flux-style"}
    builtins: ClassVar[dict[str, Any]] = {"tiny-flux": build_tiny_flux, "tiny-flux-schnell": build_tiny_flux_schnell}
    suggestions = ("builtin:tiny-flux", "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")
    default_targets: ClassVar[list[str]] = TARGETS
    text_parts = ("text_encoder",)
    t5_part, t5_tokenizer = "text_encoder_2", "tokenizer_2"
    title = "FLUX.1"
    transformer_class = "FluxTransformer2DModel"
    block_lists: ClassVar[dict[str, str]] = {"double": "transformer_blocks", "single": "single_transformer_blocks"}
    block_aliases: ClassVar[dict[str, str]] = {"double_blocks": "double", "single_blocks": "single",
                                               "transformer_blocks": "double", "single_transformer_blocks": "single"}
    kohya_text_prefixes: ClassVar[dict[str, str]] = {"text_encoder": "lora_te1_"}  # sd-scripts' CLIP-L
    # T5 tokens: sd-scripts' t5xxl_max_token_length defaults and BFL's own sampling
    max_sequence_lengths: ClassVar[dict[str, int]] = {"flux-dev": 512, "flux-schnell": 256}
    samplers: ClassVar[dict[str, dict[str, Any]]] = {"flux-dev": {"steps": 28, "guidance": 3.5},
                                                     "flux-schnell": {"steps": 4, "guidance": 0.0}}

    # --- detection and loading -----------------------------------------------------------------------
    def detect(self, configs: Configs) -> str | None:
        """A FLUX pipeline, or a transformer with rotary axes and a guidance switch; [dev] when it has the
        guidance input."""
        if "Flux" not in configs.pipeline_class and configs.get("denoiser", "axes_dims_rope") is None:
            return None
        return "flux-dev" if configs.get("denoiser", "guidance_embeds") else "flux-schnell"

    def detect_single_file(self, keys: Sequence[str]) -> str | None:
        if not any(k.startswith(SINGLE_FILE_KEYS) for k in keys):
            return None
        return "flux-dev" if any("guidance_in." in k or "guidance_embedder." in k for k in keys) else "flux-schnell"

    def pipeline_class(self, kind: str) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline

    def apply_kind(self, pipeline: Any, kind: str, prediction_type: str) -> None:
        """[dev] and [schnell] differ in a module (the guidance input): ``model.kind`` cannot turn one into the
        other."""
        has = bool(pipeline.transformer.config.guidance_embeds)
        if has != (kind == "flux-dev"):
            actual = "flux-dev" if has else "flux-schnell"
            raise ConfigError(f"model.kind: '{kind}' does not fit this model, which is {self.display(actual)} by "
                              f"its structure ({'a' if has else 'no'} guidance input); set model.kind=auto")

    def native_resolution(self, pipeline: Any) -> int:
        return int(pipeline.vae.config.get("sample_size") or 1024)

    def size_multiple(self, pipeline: Any) -> int:
        return int(pipeline.vae_scale_factor) * PATCH

    # --- conditioning and the step ---------------------------------------------------------------------
    def encode_text(self, encoders: Sequence[Any], ids: Sequence[torch.Tensor], clip_skip: int = 1,
                    frozen: TextStates | None = None) -> TextStates:
        """T5's states (attended to) and CLIP-L's pooled output (the global vector), as FluxPipeline encodes."""
        from ..model.text import TextStates

        clip = encoders[0]
        pooled = clip(ids[0][:, 0].to(clip.device)).pooler_output
        states = frozen.states if frozen is not None else self.encode_t5(encoders[1], ids[1])
        return TextStates(states, pooled)

    def flow_shift(self, model: BaseModel) -> Any:
        """[dev]: the shift its scheduler samples with, growing with the image's token count (sd-scripts'
        flux_shift); [schnell]: its scheduler's fixed shift."""
        from ..model.losses import resolution_shift, static_shift

        s = model.pipeline.scheduler.config
        if s.get("use_dynamic_shifting"):
            return resolution_shift(s.get("base_shift", 0.5), s.get("max_shift", 1.15),
                                    s.get("base_image_seq_len", 256), s.get("max_image_seq_len", 4096), PATCH)
        return static_shift(float(s.get("shift", 1.0)))

    def predict(self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextStates,
                time_ids: torch.Tensor | None) -> torch.Tensor:
        """The transformer on the packed latents with their patch positions (image ids), zero text ids, the
        sigma as timestep (it scales by 1000 itself) and, for [dev], the guidance input at 1.0."""
        import torch

        module = getattr(denoiser, "module", denoiser)  # accelerate may have wrapped it
        b, _, h, w = noisy.shape
        dtype = text.states.dtype
        guidance = (torch.full((b,), TRAINING_GUIDANCE, device=noisy.device)
                    if module.config.guidance_embeds else None)
        out = denoiser(hidden_states=pack(noisy), timestep=timesteps.to(noisy.dtype), guidance=guidance,
                       pooled_projections=text.pooled, encoder_hidden_states=text.states,
                       txt_ids=torch.zeros(text.states.shape[1], 3, device=noisy.device, dtype=dtype),
                       img_ids=image_ids(h, w, noisy.device, dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def example_inputs(self, model: BaseModel, batch: int, side: int, max_token_length: int, encode: bool,
                       device: Any, dtype: Any) -> tuple[torch.Tensor, torch.Tensor, TextStates, None]:
        import torch

        from ..model.text import TextStates

        config = model.denoiser.config
        latents = torch.zeros(batch, config.in_channels // PATCH**2, side, side, device=device, dtype=dtype)
        tokens = self.max_sequence_lengths[model.kind]
        states = torch.zeros(batch, tokens, config.joint_attention_dim, device=device, dtype=dtype)
        if encode:
            pooled = model.text_encoder(torch.zeros(batch, 77, dtype=torch.long, device=device)).pooler_output
        else:
            pooled = torch.zeros(batch, config.pooled_projection_dim, device=device, dtype=dtype)
        return latents, torch.zeros(batch, device=device, dtype=dtype), TextStates(states, pooled), None

    def decode(self, model: BaseModel, latents: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """FluxPipeline returns packed latents; unpacked for the image's ``size`` first."""
        if latents.dim() == 3:
            if size is None:
                raise ValueError("packed FLUX latents need the image size to be unpacked")
            factor = model.pipeline.vae_scale_factor
            latents = unpack(latents, size[0] // factor, size[1] // factor)
        return super().decode(model, latents)

    def prompt_embeddings(self, model: BaseModel, prompt: str, negative_prompt: str, guided: bool, clip_skip: int,
                          max_token_length: int) -> dict[str, Any]:
        """The prompt encoded as training encodes captions. FLUX.1 has no negative prompt (its guidance is an
        input of the model, not a second pass)."""
        text = self.encode_text(model.text_encoders, self.tokenize(model, [prompt], max_token_length))
        return {"prompt_embeds": text.states, "pooled_prompt_embeds": text.pooled}

    # --- adapter files --------------------------------------------------------------------------------------
    def original(self, path: str, denoiser_config: Mapping[str, Any]) -> Original | None:
        return bfl_module(path)

    def original_parameter(self, key: str) -> str | None:
        return bfl_parameter(key)

    def metadata(self, kind: str) -> dict[str, str]:
        """As sd-scripts' FLUX LoRAs say it (flux_utils.MODEL_VERSION_FLUX_V1, sai_model_spec's architectures)."""
        return {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux",
                "modelspec.architecture": f"{kind.replace('flux', 'flux-1')}/lora",
                "modelspec.implementation": "https://github.com/black-forest-labs/flux"}

    def save_single_file(self, pipeline: Any, out: Path, precision: str) -> Path:
        """The transformer alone in BFL's layout (``double_blocks.0.img_attn.qkv.weight``), as BFL ships FLUX.1
        and ComfyUI's "Load Diffusion Model" and Forge load it (the text encoders and VAE stay their own files);
        verified by reading every tensor back."""
        from .original_layout import save_transformer

        kind = self.detect(Configs("FluxPipeline", pipeline.transformer.config)) or "flux-dev"
        return save_transformer(pipeline.transformer, out, precision, bfl_module, bfl_parameter,
                                {"modelspec.architecture": kind.replace("flux", "flux-1")})
