"""Stable Diffusion 3 and 3.5: an MMDiT rectified-flow transformer (joint blocks: an image and a text stream
attending together) on 16-channel latents, conditioned on CLIP-L and CLIP-G (penultimate states side by side,
padded to T5's width, then T5-XXL's states after them; the two pooled outputs side by side). Kinds by structure:
``sd35-large`` (q/k norms), ``sd35-medium`` (q/k norms and MMDiT-X's second image attention in the first blocks)
and ``sd3-medium`` (neither). Built-in: ``builtin:tiny-sd35`` (3.5 Medium's layout)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..model.base import Configs
from ..model.builtin import clip_config, clip_tokenizer, t5_config, t5_tokenizer
from .mmdit import mmdit_module, mmdit_parameter
from .transformer import Original, TransformerFamily

if TYPE_CHECKING:
    import torch

    from ..model.base import BaseModel
    from ..model.text import TextStates

SINGLE_FILE_KEYS = ("joint_blocks.", "model.diffusion_model.joint_blocks.")
# the linear layers sd-scripts' lora_sd3 adapts in every joint block (all of them; diffusers' script: attention)
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
           "norm1_context.linear"]
TEXT_ENCODERS = (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5xxl", "text_encoder_3"))


def build_tiny_sd35() -> Any:
    """An SD3.5-Medium-shaped pipeline with small random deterministic weights: two joint blocks 32 wide (q/k
    norms, the first with MMDiT-X's second attention), a 16-channel VAE (SD3's shift and scaling factor), CLIP-L-
    and CLIP-G-shaped encoders of two widths (CLIP-L's projection the identity, as SD3's) and a T5 encoder wider
    than both side by side, their tokenizers made in code."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=80, out_channels=16,
            pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
        vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=8,
                            layers_per_block=1, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.0609, scaling_factor=1.5305)
        layers = dict(num_hidden_layers=2, num_attention_heads=4)
        text_encoder = CLIPTextModelWithProjection(clip_config(tokenizer, hidden_size=32, intermediate_size=64,
                                                               projection_dim=32, **layers))
        torch.nn.init.eye_(text_encoder.text_projection.weight)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer_2, hidden_size=48, intermediate_size=96,
                                                                 projection_dim=48, hidden_act="gelu", **layers))
        text_encoder_3 = T5EncoderModel(t5_config(tokenizer_3, d_model=96, d_kv=8, d_ff=64, num_layers=2,
                                                  num_heads=4))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


class SD3(TransformerFamily):
    name = "sd3"
    kinds: ClassVar[dict[str, str]] = {"sd35-large": "SD3.5 Large", "sd35-medium": "SD3.5 Medium",
                                       "sd3-medium": "SD3 Medium"}
    architecture: ClassVar[str] = "mmdit"
    structure: ClassVar[str] = "joint (MMDiT) transformer blocks"
    presets: ClassVar[dict[str, str]] = dict.fromkeys(kinds, "sd35-style")
    builtins: ClassVar[dict[str, Any]] = {"tiny-sd35": build_tiny_sd35}
    suggestions = ("builtin:tiny-sd35", "stabilityai/stable-diffusion-3.5-large",
                   "stabilityai/stable-diffusion-3.5-medium")
    default_targets: ClassVar[list[str]] = TARGETS
    text_parts = ("text_encoder", "text_encoder_2")
    t5_part, t5_tokenizer = "text_encoder_3", "tokenizer_3"
    title = "SD3"
    transformer_class = "SD3Transformer2DModel"
    block_lists: ClassVar[dict[str, str]] = {"joint": "transformer_blocks"}
    block_aliases: ClassVar[dict[str, str]] = {"joint_blocks": "joint", "transformer_blocks": "joint"}
    kohya_text_prefixes: ClassVar[dict[str, str]] = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    max_sequence_lengths: ClassVar[dict[str, int]] = dict.fromkeys(kinds, 256)  # StableDiffusion3Pipeline's
    # the model cards' sampling (Stability's: Large 28 steps at CFG 3.5, Medium 40 at 4.5; SD3 Medium 28 at 7)
    samplers: ClassVar[dict[str, dict[str, Any]]] = {"sd35-large": {"steps": 28, "guidance": 3.5},
                                                     "sd35-medium": {"steps": 40, "guidance": 4.5},
                                                     "sd3-medium": {"steps": 28, "guidance": 7.0}}
    # what sd-scripts writes: ss_base_model_version is its MMDiT model_type, modelspec "stable-diffusion-3-<it>"
    model_types: ClassVar[dict[str, str]] = {"sd35-large": "5-large", "sd35-medium": "5-medium",
                                             "sd3-medium": "medium"}

    # --- detection and loading -----------------------------------------------------------------------
    def detect(self, configs: Configs) -> str | None:
        """An SD3 pipeline, or a transformer with a caption projection; the kind by q/k norms and MMDiT-X's second
        attention layers."""
        pipeline, projection = configs.pipeline_class, configs.get("denoiser", "caption_projection_dim")
        if "StableDiffusion3" not in pipeline and projection is None:
            return None
        if not configs.get("denoiser", "qk_norm"):
            return "sd3-medium"
        return "sd35-medium" if configs.get("denoiser", "dual_attention_layers") else "sd35-large"

    def detect_single_file(self, keys: Sequence[str]) -> str | None:
        if not any(k.startswith(SINGLE_FILE_KEYS) for k in keys):
            return None
        if not any(".ln_q." in k for k in keys):
            return "sd3-medium"
        return "sd35-medium" if any(".x_block.attn2." in k for k in keys) else "sd35-large"

    def pipeline_class(self, kind: str) -> Any:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def load_single_file(self, path: Path, config_source: str, kind: str, dtype: Any = None) -> Any | None:
        """A whole checkpoint (transformer and VAE, maybe the text encoders) is diffusers' to read, the parts it
        lacks from ``model.config``; a transformer alone is read as FLUX's are."""
        from .loading import single_file_keys

        if any(k.startswith("first_stage_model.") for k in single_file_keys(path)):
            return None
        return super().load_single_file(path, config_source, kind, dtype)

    def configured_resolution(self, configs: Configs) -> int:
        levels = len(configs.get("vae", "block_out_channels") or [0] * 4)
        return int(configs.get("denoiser", "sample_size") or 128) * 2 ** (levels - 1)

    def native_resolution(self, pipeline: Any) -> int:
        return int(pipeline.transformer.config.sample_size * pipeline.vae_scale_factor)

    def size_multiple(self, pipeline: Any) -> int:
        return int(pipeline.vae_scale_factor * pipeline.transformer.config.patch_size)

    # --- conditioning and the step ---------------------------------------------------------------------
    def encode_text(self, encoders: Sequence[Any], ids: Sequence[torch.Tensor], clip_skip: int = 1,
                    frozen: TextStates | None = None) -> TextStates:
        """As StableDiffusion3Pipeline encodes: both CLIPs' penultimate states side by side, zero-padded to T5's
        width, followed by T5's states; the pooled text is both CLIPs' projected outputs side by side. SD3 already
        skips CLIP's last layer, so clip skip is not applied (as sd-scripts' SD3 trainer)."""
        import torch

        from ..model.text import TextStates

        states, pooled = [], []
        for encoder, tokens in zip(encoders[:2], ids[:2], strict=True):
            out = encoder(tokens[:, 0].to(encoder.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = frozen.states if frozen is not None else self.encode_t5(encoders[2], ids[2])
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return TextStates(torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1))

    def flow_shift(self, model: BaseModel) -> Any:
        """The shift the model's scheduler samples with (3.0 for SD3.5), as diffusers' SD3 trainer draws its
        training timesteps from that scheduler."""
        from ..model.losses import static_shift

        return static_shift(float(model.pipeline.scheduler.config.get("shift", 3.0)))

    def predict(self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextStates,
                time_ids: torch.Tensor | None) -> torch.Tensor:
        """The transformer on the latents, its timestep the sigma times 1000 (as the scheduler gives it)."""
        return denoiser(hidden_states=noisy, timestep=timesteps * 1000, encoder_hidden_states=text.states,
                        pooled_projections=text.pooled, return_dict=False)[0]

    def conditioning_tokens(self, max_token_length: int) -> int:
        return 77 + max(self.max_sequence_lengths.values())

    def example_inputs(self, model: BaseModel, batch: int, side: int, max_token_length: int, encode: bool,
                       device: Any, dtype: Any) -> tuple[torch.Tensor, torch.Tensor, TextStates, None]:
        import torch

        from ..model.text import TextStates

        config = model.denoiser.config
        latents = torch.zeros(batch, config.in_channels, side, side, device=device, dtype=dtype)
        tokens = 77 + self.max_sequence_lengths[model.kind]
        states = torch.zeros(batch, tokens, config.joint_attention_dim, device=device, dtype=dtype)
        pooled = torch.zeros(batch, config.pooled_projection_dim, device=device, dtype=dtype)
        return latents, torch.zeros(batch, device=device, dtype=dtype), TextStates(states, pooled), None

    def prompt_embeddings(self, model: BaseModel, prompt: str, negative_prompt: str, guided: bool, clip_skip: int,
                          max_token_length: int) -> dict[str, Any]:
        """The prompt (and with guidance the negative prompt) encoded as training encodes captions."""
        out = {}
        for name, text in (("", prompt), ("negative_", negative_prompt))[: 2 if guided else 1]:
            encoded = self.encode_text(model.text_encoders, self.tokenize(model, [text], max_token_length))
            out[f"{name}prompt_embeds"], out[f"{name}pooled_prompt_embeds"] = encoded.states, encoded.pooled
        return out

    # --- adapter files --------------------------------------------------------------------------------------
    def original(self, path: str, denoiser_config: Mapping[str, Any]) -> Original | None:
        return mmdit_module(path, denoiser_config)

    def kohya_names(self, modules: Mapping[str, Sequence[str]], denoiser_config: Any) -> dict[tuple[str, str], str]:
        """As the shared names, the block count taken from the modules when no config says it (which block is
        the last one decides whether its context modulation can be named)."""
        config = dict(denoiser_config or {})
        blocks = [int(p.split(".")[1]) for p in modules.get(self.denoiser, []) if p.startswith("transformer_blocks.")]
        if "num_layers" not in config and blocks:
            config["num_layers"] = max(blocks) + 1
        return super().kohya_names(modules, config)

    def original_parameter(self, key: str) -> str | None:
        return mmdit_parameter(key)

    def metadata(self, kind: str) -> dict[str, str]:
        return {"ss_base_model_version": self.model_types[kind], "ss_network_module": "networks.lora_sd3",
                "modelspec.architecture": f"stable-diffusion-3-{self.model_types[kind]}/lora",
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models"}

    def save_single_file(self, pipeline: Any, out: Path, precision: str) -> Path:
        """One checkpoint as Stability ships SD3.5 and ComfyUI's "Load Checkpoint" reads it: the MMDiT under
        ``model.diffusion_model.``, the VAE under ``first_stage_model.``, the three text encoders under
        ``text_encoders.clip_l/clip_g/t5xxl.transformer.``; the transformer verified by reading it back."""
        from ..model.text import conventional_text_path
        from .ldm_single_file import ldm_vae_state
        from .original_layout import save_transformer

        config = dict(pipeline.transformer.config)
        extra = dict(ldm_vae_state(pipeline.vae))
        for name, part in TEXT_ENCODERS:
            seen: set[int] = set()
            for key, tensor in getattr(pipeline, part).state_dict().items():
                module, _, param = key.rpartition(".")
                mapped = key if name == "t5xxl" else f"{conventional_text_path(module)}.{param}"
                # T5's embedding is tied (shared, encoder.embed_tokens): both names, each its own tensor
                extra[f"text_encoders.{name}.transformer.{mapped}"] = tensor.clone() if tensor.data_ptr() in seen \
                    else tensor
                seen.add(tensor.data_ptr())
        kind = self.detect(Configs("StableDiffusion3Pipeline", config)) or "sd35-large"
        architecture = {"modelspec.architecture": f"stable-diffusion-3-{self.model_types[kind]}"}
        return save_transformer(pipeline.transformer, out, precision, lambda p: mmdit_module(p, config),
                                mmdit_parameter, architecture, prefix="model.diffusion_model.", extra=extra)
