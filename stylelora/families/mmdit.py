"""The original (Stability AI MMDiT) names of a diffusers SD3/SD3.5 transformer: what kohya's sd-scripts names LoRA
modules after (``lora_unet_joint_blocks_0_x_block_attn_qkv``), what ComfyUI keys LoRAs by, and the layout of the
checkpoints Stability ships (``model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight``).

The original fuses each stream's q, k and v into one ``qkv`` linear, and keeps the last block's context
modulation and the final norm with their two halves (shift, scale) swapped against diffusers'
(``convert_sd3_transformer_checkpoint_to_diffusers``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# diffusers path inside transformer_blocks.N -> (MMDiT module inside joint_blocks.N, place in it)
JOINT = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", 0),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2), "attn.to_add_out": ("context_block.attn.proj", 0),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2), "attn2.to_out.0": ("x_block.attn2.proj", 0),
    "ff.net.0.proj": ("x_block.mlp.fc1", 0), "ff.net.2": ("x_block.mlp.fc2", 0),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", 0), "ff_context.net.2": ("context_block.mlp.fc2", 0),
    "norm1.linear": ("x_block.adaLN_modulation.1", 0), "norm1_context.linear": ("context_block.adaLN_modulation.1", 0),
}
TOP = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
}
NORMS = {"attn.norm_q.weight": "x_block.attn.ln_q.weight", "attn.norm_k.weight": "x_block.attn.ln_k.weight",
         "attn.norm_added_q.weight": "context_block.attn.ln_q.weight",
         "attn.norm_added_k.weight": "context_block.attn.ln_k.weight",
         "attn2.norm_q.weight": "x_block.attn2.ln_q.weight", "attn2.norm_k.weight": "x_block.attn2.ln_k.weight"}
BLOCKS = "transformer_blocks."


def mmdit_module(path: str, config: Mapping[str, Any]) -> tuple[str, int, bool] | None:
    """(MMDiT module, place among the modules fused into it, halves swapped) of a diffusers SD3 module path; the
    last block's context modulation is swapped (it only pre-norms the text), so the block count
    (``num_layers``) must be known for it."""
    if path in TOP:
        return TOP[path], 0, False
    if path == "norm_out.linear":
        return "final_layer.adaLN_modulation.1", 0, True
    if not path.startswith(BLOCKS):
        return None
    number, _, inner = path[len(BLOCKS):].partition(".")
    found = JOINT.get(inner)
    if found is None:
        return None
    swap = inner == "norm1_context.linear" and int(number) == int(config.get("num_layers", -1)) - 1
    if inner == "norm1_context.linear" and "num_layers" not in config:
        return None  # which block is the last one is unknown
    return f"joint_blocks.{number}.{found[0]}", found[1], swap


def mmdit_parameter(key: str) -> str | None:
    """The MMDiT name of an SD3 parameter that belongs to no linear layer (position table, q/k norm scales)."""
    if key == "pos_embed.pos_embed":
        return "pos_embed"
    if key.startswith(BLOCKS):
        number, _, inner = key[len(BLOCKS):].partition(".")
        return f"joint_blocks.{number}.{NORMS[inner]}" if inner in NORMS else None
    return None
