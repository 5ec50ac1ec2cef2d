"""Models with the real architectures of SD1.5 and SDXL base 1.0 and random weights, written as diffusers folders
the way those models are shipped (fp16 ``.safetensors``, one file per component), for memory benchmarks that
must see real sizes without downloading anything.

    python benchmarks/real_shapes.py sd15|sdxl FOLDER [--dtype fp16|bf16|fp32]

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
}
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


def _component(library: str, class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    if library == "transformers":
        import transformers

        cls = getattr(transformers, class_name)
        return cls(cls.config_class(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))
    import diffusers

    return getattr(diffusers, class_name).from_config({k: v for k, v in config.items() if k != "_class_name"})


def write_model(shape: str, folder: Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """The ``shape`` (sd15, sdxl) model with random weights as a diffusers folder stored in ``dtype``."""
    from stylelora.model.builtin import clip_tokenizer

    spec = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": spec["_class_name"], "_diffusers_version": "0.42.1", **spec["extra"]}
    torch.manual_seed(seed)
    for part, entry in spec.items():
        if part.startswith("_") or part == "extra":
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
            write_safetensors(folder / part / "model.safetensors", module.state_dict())
        else:
            module.save_config(folder / part)
            write_safetensors(folder / part / "diffusion_pytorch_model.safetensors", module.state_dict())
        del module
    for part, pad in (("tokenizer", None), ("tokenizer_2", "!")):
        if part == "tokenizer" or "text_encoder_2" in spec:
            index[part] = ["transformers", "CLIPTokenizer"]
            (clip_tokenizer(pad_token=pad) if pad else clip_tokenizer()).save_pretrained(folder / part)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def write_configs(shape: str, folder: Path) -> Path:
    """Only the config files of ``shape`` (``flux-dev``: FLUX.1 [dev] as published, whose ~33 GB of bf16 weights
    fit no 24 GB machine): enough for ``stylelora train --estimate``, which plans the model on the meta device."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from published_models import flux_dev

    parts = flux_dev().pipeline  # on the meta device: no memory
    for part in ("transformer", "vae"):
        getattr(parts, part).save_config(folder / part)
    for part in ("text_encoder", "text_encoder_2"):
        getattr(parts, part).config.save_pretrained(folder / part)
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=256, max_image_seq_len=4096).save_config(folder / "scheduler")
    index = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


CONFIGS_ONLY = {"flux-dev": write_configs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    args = parser.parse_args()
    print(write_model(args.shape, args.folder, DTYPES[args.dtype]))


if __name__ == "__main__":
    main()
