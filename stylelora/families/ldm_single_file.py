"""A diffusers SD1.x/SD2.x-shaped pipeline as one ``.safetensors`` checkpoint in the original (LDM) layout,
the single file AUTOMATIC1111 and ComfyUI load (``model.diffusion_model.``, ``first_stage_model.``,
``cond_stage_model.transformer.``).

Names are made from the rules of the original layout: the UNet by ``sgm.sgm_path`` (the same map
kohya's SDXL names use) plus the norms it has no LoRA for, the VAE and the CLIP text encoder by their
own small rules. Every file is verified before it replaces an older one: diffusers' own single-file
converter reads it back, and every tensor must come back equal to the pipeline's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ..core import fileio
from ..core.errors import FormatError
from .sgm import sgm_path

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model.transformer."
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_module(path: str, layers_per_block: int, up_attention: set[int]) -> str | None:
    if path == "conv_norm_out":
        return "out.0"
    for norm, conv, ldm_norm in (("norm1", "conv1", "in_layers.0"), ("norm2", "conv2", "out_layers.0")):
        if ".resnets." in path and path.endswith("." + norm):  # named by its conv's block: in/out_layers
            conv_path = sgm_path(path[: -len(norm)] + conv, layers_per_block, up_attention)
            return None if conv_path is None else conv_path.rsplit(".", 2)[0] + "." + ldm_norm
    return sgm_path(path, layers_per_block, up_attention)


def _vae_module(path: str, num_blocks: int) -> str | None:
    coder, _, rest = path.partition(".")
    if rest == "conv_norm_out":
        return f"{coder}.norm_out"
    parts = rest.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) >= 4:
        level = int(parts[1]) if parts[0] == "down_blocks" else num_blocks - 1 - int(parts[1])  # up runs reversed
        side = "down" if parts[0] == "down_blocks" else "up"
        if parts[2] == "resnets":
            inner = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{coder}.{side}.{level}.block.{parts[3]}.{inner}"
        if parts[2] in ("downsamplers", "upsamplers"):
            return f"{coder}.{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{'.'.join(parts[4:])}"
        return None
    if parts[0] == "mid_block" and len(parts) >= 4:
        if parts[1] == "resnets":
            inner = ".".join(parts[3:]).replace("conv_shortcut", "nin_shortcut")
            return f"{coder}.mid.block_{int(parts[2]) + 1}.{inner}"
        inner = _VAE_ATTENTION.get(".".join(parts[3:]))
        return None if inner is None else f"{coder}.mid.attn_1.{inner}"
    return path if parts[0] in ("conv_in", "conv_out") or coder in ("quant_conv", "post_quant_conv") else None


def _text_key(key: str) -> str:
    # transformers 5 flattened CLIPTextModel's names; the single-file layout keeps text_model.
    return key if key.startswith("text_model.") else "text_model." + key


def _rename(state: dict[str, torch.Tensor], module_name: Any, prefix: str, part: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        mapped = module_name(module)
        if mapped is None:
            raise FormatError(f"{part} weight '{key}' has no name in the single-file layout; this model cannot be "
                              "written as one checkpoint (write a diffusers folder instead)")
        out[f"{prefix}{mapped}.{param}"] = tensor
    return out


def ldm_vae_state(vae: Any) -> dict[str, torch.Tensor]:
    """The VAE's weights under single-file names (``first_stage_model.``; SD3.5's checkpoints hold it so too)."""
    vae_state = _rename(vae.state_dict(), lambda m: _vae_module(m, len(vae.config.block_out_channels)), VAE, "VAE")
    for key, tensor in vae_state.items():  # the original VAE's attention projections are 1x1 convs
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            vae_state[key] = tensor[:, :, None, None]
    return vae_state


def single_file_state(pipeline: Any, precision: str = "fp16") -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder under single-file names, in ``precision``."""
    if precision not in DTYPES:
        raise FormatError(f"precision '{precision}': choose one of {', '.join(DTYPES)}")
    unet, vae = pipeline.unet, pipeline.vae
    layers = int(unet.config.layers_per_block)
    up_attention = {i for i, block in enumerate(unet.config.up_block_types) if "CrossAttn" in block}
    state = _rename(unet.state_dict(), lambda m: _unet_module(m, layers, up_attention), UNET, "UNet")
    state.update(ldm_vae_state(vae))
    state.update({TEXT + _text_key(k): v for k, v in pipeline.text_encoder.state_dict().items()
                  if not k.endswith("position_ids")})
    dtype = DTYPES[precision]
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def save_single_file(pipeline: Any, out: str | Path, precision: str = "fp16") -> Path:
    """Write ``pipeline`` as one checkpoint at ``out`` (verified: diffusers reads every tensor back equal)."""
    target = Path(out)
    if target.suffix.lower() != ".safetensors":
        raise FormatError(f"{out}: a single-file checkpoint is a .safetensors file; give a name ending in it")
    state = single_file_state(pipeline, precision)
    with fileio.atomic_path(target) as tmp:
        tmp.write_bytes(save(state, metadata={"format": "pt", "modelspec.architecture": "stable-diffusion-v1"}))
        verify_single_file(tmp, pipeline, precision, shown_as=target)
    return target


def verify_single_file(path: str | Path, pipeline: Any, precision: str, shown_as: str | Path | None = None) -> None:
    """Read ``path`` back with diffusers' single-file converters; every tensor must equal the pipeline's."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file

    shown = shown_as or path
    written = load_file(str(path))
    dtype = DTYPES[precision]
    parts = {
        "UNet": (convert_ldm_unet_checkpoint(written, dict(pipeline.unet.config)), pipeline.unet.state_dict()),
        "VAE": (convert_ldm_vae_checkpoint(written, dict(pipeline.vae.config)), pipeline.vae.state_dict()),
        "text encoder": ({_text_key(k): v for k, v in convert_ldm_clip_checkpoint(written).items()},
                         {_text_key(k): v for k, v in pipeline.text_encoder.state_dict().items()
                          if not k.endswith("position_ids")}),
    }
    for part, (read, expected) in parts.items():
        missing = sorted(set(expected) - set(read))
        if missing:
            raise FormatError(f"{shown}: diffusers does not read the {part}'s {missing[:3]} back from the written "
                              "file; nothing was written")
        for key, tensor in expected.items():
            got = read[key].reshape(tensor.shape)
            if not torch.equal(got, tensor.detach().to("cpu", dtype)):
                raise FormatError(f"{shown}: the {part}'s {key} reads back different; nothing was written")
