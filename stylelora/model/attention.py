"""The UNet's attention kernel (``train.attention``): PyTorch's scaled-dot-product attention or plain matmuls.

On a CPU, a bf16 or fp16 run still computes the attention itself in fp32. PyTorch's CPU flash-attention
kernel is slower in bf16 than in fp32 at every shape of the SD UNet (measured on an AMX Xeon: at 1024
tokens and head width 16, forward + backward take 28 ms in bf16 and 22 ms in fp32), so a bf16 step spent
a third of its time there; upcasting query, key and value costs far less than it saves
(benchmarks/RESULTS.md). Everything else in the block (the projections and their LoRA) keeps the run's
precision, and on a GPU nothing changes: diffusers' own processor runs.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0


class CpuSdpaProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor, with the attention computed in fp32 when the block runs on a CPU.

    Only the plain attention of the SD UNets' transformer blocks takes this path (no mask, no group or
    spatial norm, no residual inside the block, no q/k norm); anything else, and every GPU call, is
    diffusers' ``AttnProcessor2_0`` unchanged."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if hidden_states.device.type != "cpu" or attention_mask is not None or not _plain(attn, hidden_states):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        dtype, head_dim = query.dtype, key.shape[-1] // attn.heads
        query, key, value = (t.float().view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                             for t in (query, key, value))
        with torch.autocast("cpu", enabled=False):  # autocast would put SDPA back in bf16
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(dtype)
        return attn.to_out[1](attn.to_out[0](out))  # projection, dropout


def _plain(attn: Attention, hidden_states: torch.Tensor) -> bool:
    return (hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
            and not attn.residual_connection and attn.rescale_output_factor == 1.0
            and getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None)


def set_attention(unet: torch.nn.Module, kind: str) -> None:
    """``kind``: "sdpa" (scaled-dot-product attention) or "default" (diffusers' plain matmul processor)."""
    unet.set_attn_processor(CpuSdpaProcessor() if kind == "sdpa" else AttnProcessor())
