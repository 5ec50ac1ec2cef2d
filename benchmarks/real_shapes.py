"""Models with the real architectures of SD1.5 and SDXL base 1.0 and random weights, written as diffusers folders
the way those models are shipped (fp16 ``.safetensors``, one file per component), for memory benchmarks that
must see real sizes without downloading anything.

    python benchmarks/real_shapes.py sd15|sdxl|flux-dev-slice|sd35-large-slice FOLDER [--dtype fp16|bf16|fp32]

``flux-dev-slice`` is FLUX.1 [dev] at its real widths (the 3072-wide transformer, T5-XXL's 4096-wide encoder,
CLIP-L, the 16-channel VAE) cut to 2 double and 4 single blocks and 2 T5 layers: 2.0 B parameters instead of
16.9 B, so a FLUX-shaped run can be measured on a 24 GB machine (store it in bf16, as FLUX.1 ships).
``sd35-large-slice`` is SD3.5 Large the same way: its 2432-wide transformer cut to 4 of its 38 joint blocks, T5-XXL
cut to 2 layers, CLIP-L and CLIP-G whole (2.2 B of its 13.7 B parameters; bf16 as it ships).

Each component is built alone in the stored precision (torch's own initialisation, run in that precision: no
fp32 copy is ever made) and streamed to its file tensor by tensor, so writing the SDXL folder (6.9 GB of fp16)
never holds more than its UNet (5.1 GB). The configs are the fields that set the architecture in the public
repositories (stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0); the
tokenizer is stylelora's built-in CLIP tokenizer (a small vocabulary: ids stay inside the real embedding).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
       "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
VAE_16 = {**VAE, "latent_channels": 16, "sample_size": 1024, "use_quant_conv": False,
          "use_post_quant_conv": False}  # FLUX.1's and SD3.5's, each with its own shift and scale
CLIP_L = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 768,
          "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G = {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "hidden_size": 1280,
          "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 1280, "hidden_act": "gelu"}
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0,
}
# FLUX.1 [dev]'s published widths (benchmarks/published_models.py), cut in depth
FLUX_SLICE_TRANSFORMER = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64,
                          "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 128,
                          "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
                          "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
T5_XXL_SLICE = {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": 32128, "d_model": 4096,
                "d_kv": 64, "d_ff": 10240, "num_layers": 2, "num_heads": 64, "feed_forward_proj": "gated-gelu",
                "is_encoder_decoder": False}
# SD3.5 Large's published widths (published_models.SD35_LARGE_TRANSFORMER), cut in depth
SD35_SLICE_TRANSFORMER = {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2,
                          "in_channels": 16, "num_layers": 4, "attention_head_dim": 64, "num_attention_heads": 38,
                          "joint_attention_dim": 4096, "caption_projection_dim": 2432, "pooled_projection_dim": 2048,
                          "out_channels": 16, "pos_embed_max_size": 192, "qk_norm": "rms_norm"}
FLUX_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096}
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
SHAPES: dict[str, dict[str, Any]] = {
    "sd15": {
        "_class_name": "StableDiffusionPipeline",
        "unet": ("diffusers", "UNet2DConditionModel", SD15_UNET),
        "vae": ("diffusers", "AutoencoderKL", {**VAE, "sample_size": 512, "scaling_factor": 0.18215}),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L),
        "scheduler": ("diffusers", "DDIMScheduler", {**SCHEDULER, "clip_sample": False, "set_alpha_to_one": False}),
        "extra": {"safety_checker": [None, None], "feature_extractor": [None, None],
                  "requires_safety_checker": False},
    },
    "sdxl": {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ("diffusers", "UNet2DConditionModel", SDXL_UNET),
        "vae": ("diffusers", "AutoencoderKL", {**VAE, "sample_size": 1024, "scaling_factor": 0.13025,
                                               "force_upcast": True}),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_G),
        "scheduler": ("diffusers", "EulerDiscreteScheduler", {**SCHEDULER, "timestep_spacing": "leading"}),
        "extra": {"force_zeros_for_empty_prompt": True},
    },
    "flux-dev-slice": {
        "_class_name": "FluxPipeline",
        "transformer": ("diffusers", "FluxTransformer2DModel", FLUX_SLICE_TRANSFORMER),
        "vae": ("diffusers", "AutoencoderKL", {**VAE_16, "shift_factor": 0.1159, "scaling_factor": 0.3611}),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L),
        "text_encoder_2": ("transformers", "T5EncoderModel", T5_XXL_SLICE),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", FLUX_SCHEDULER),
        "tokenizers": {"tokenizer": "clip", "tokenizer_2": "t5"},
        "extra": {},
    },
    "sd35-large-slice": {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ("diffusers", "SD3Transformer2DModel", SD35_SLICE_TRANSFORMER),
        "vae": ("diffusers", "AutoencoderKL", {**VAE_16, "shift_factor": 0.0609, "scaling_factor": 1.5305}),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_G),
        "text_encoder_3": ("transformers", "T5EncoderModel", T5_XXL_SLICE),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
        "tokenizers": {"tokenizer": "clip", "tokenizer_2": "clip-g", "tokenizer_3": "t5"},
        "extra": {},
    },
}
STORED = {"flux-dev-slice": torch.bfloat16, "sd35-large-slice": torch.bfloat16}  # how each is shipped when not fp16
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A ``.safetensors`` file written tensor by tensor (safetensors' own writer serialises the whole file in
    memory first, which would double a 5 GB UNet)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for t in tensors.values():
            flat = t.contiguous().reshape(-1)
            f.write(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with each tied weight once (T5's ``shared`` and ``encoder.embed_tokens``), as models ship."""
    seen: set[int] = set()
    out = {}
    for name, t in state.items():
        if t.data_ptr() not in seen or not t.numel():
            seen.add(t.data_ptr())
            out[name] = t
    return out


def _component(library: str, class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    if library == "transformers":
        import transformers

        cls = getattr(transformers, class_name)
        return cls(cls.config_class(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))
    import diffusers

    return getattr(diffusers, class_name).from_config({k: v for k, v in config.items() if k != "_class_name"})


def write_model(shape: str, folder: Path, dtype: torch.dtype | None = None, seed: int = 0) -> Path:
    """The ``shape`` (sd15, sdxl, flux-dev-slice, sd35-large-slice) model with random weights as a diffusers folder
    stored in ``dtype`` (by default as the model ships: fp16, FLUX.1 and SD3.5 bf16)."""
    dtype = dtype or STORED.get(shape, torch.float16)
    from stylelora.model.builtin import clip_tokenizer, t5_tokenizer

    spec = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": spec["_class_name"], "_diffusers_version": "0.42.1", **spec["extra"]}
    torch.manual_seed(seed)
    for part, entry in spec.items():
        if part.startswith("_") or part in ("extra", "tokenizers"):
            continue
        library, class_name, config = entry
        index[part] = [library, class_name]
        (folder / part).mkdir(exist_ok=True)
        if part == "scheduler":
            import diffusers

            getattr(diffusers, class_name)(**config).save_config(folder / part)
            continue
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built and initialised in the stored precision: no fp32 copy
        try:
            module = _component(library, class_name, config)
        finally:
            torch.set_default_dtype(default)
        if library == "transformers":
            module.config.save_pretrained(folder / part)
            write_safetensors(folder / part / "model.safetensors", untied(module.state_dict()))
        else:
            module.save_config(folder / part)
            write_safetensors(folder / part / "diffusion_pytorch_model.safetensors", module.state_dict())
        del module
    # SD's CLIP tokenizers (SDXL's second pads with "!"); FLUX.1's second is T5's
    default = {"tokenizer": "clip", **({"tokenizer_2": "clip-g"} if "text_encoder_2" in spec else {})}
    makers = {"clip": (clip_tokenizer, "CLIPTokenizer"), "clip-g": (lambda: clip_tokenizer(pad_token="!"),
                                                                    "CLIPTokenizer"),
              "t5": (t5_tokenizer, "T5TokenizerFast")}
    for part, which in spec.get("tokenizers", default).items():
        make, class_name = makers[which]
        index[part] = ["transformers", class_name]
        make().save_pretrained(folder / part)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def write_configs(shape: str, folder: Path) -> Path:
    """Only the config files of ``shape`` (``flux-dev``: FLUX.1 [dev] as published, ``sd35-large``: SD3.5 Large, whose
    ~33 and ~28 GB of bf16 weights fit no 24 GB machine): enough for ``stylelora train --estimate``, which plans the
    model on the meta device."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from published_models import flux_dev, sd35_large

    model = {"flux-dev": flux_dev, "sd35-large": sd35_large}[shape]()  # on the meta device: no memory
    parts = model.pipeline
    encoders = [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3") if hasattr(parts, name)]
    for part in ("transformer", "vae"):
        getattr(parts, part).save_config(folder / part)
    for part in encoders:
        getattr(parts, part).config.save_pretrained(folder / part)
    scheduler = FLUX_SCHEDULER if shape == "flux-dev" else {"shift": 3.0}
    FlowMatchEulerDiscreteScheduler(**scheduler).save_config(folder / "scheduler")
    index = {"_class_name": model.family.pipeline_class(model.kind).__name__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", type(parts.transformer).__name__], "vae": ["diffusers", "AutoencoderKL"],
             **{part: ["transformers", type(getattr(parts, part)).__name__] for part in encoders}}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


CONFIGS_ONLY = {"flux-dev": write_configs, "sd35-large": write_configs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="default: as the model ships (fp16; FLUX.1, SD3.5 bf16)")
    args = parser.parse_args()
    print(write_model(args.shape, args.folder, DTYPES[args.dtype] if args.dtype else None))


if __name__ == "__main__":
    main()
