"""The original (Black Forest Labs) names of a diffusers FLUX.1 transformer: what kohya's sd-scripts names LoRA
modules after (``lora_unet_double_blocks_0_img_attn_qkv``), what ComfyUI and Forge key LoRAs by, and the layout of
the transformer files BFL ships (``double_blocks.0.img_attn.qkv.weight``).

The original fuses what diffusers keeps apart: a double block's q, k and v (image and text stream each) are one
``qkv`` linear, a single block's q, k, v and MLP input one ``linear1``. The final norm's two halves (shift and
scale) are swapped between the two (diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``)."""

from __future__ import annotations

# double block: diffusers path inside transformer_blocks.N -> (BFL module inside double_blocks.N, place in it)
DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_add_out": ("txt_attn.proj", 0),
    "ff.net.0.proj": ("img_mlp.0", 0), "ff.net.2": ("img_mlp.2", 0),
    "ff_context.net.0.proj": ("txt_mlp.0", 0), "ff_context.net.2": ("txt_mlp.2", 0),
    "norm1.linear": ("img_mod.lin", 0), "norm1_context.linear": ("txt_mod.lin", 0),
}
SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0), "norm.linear": ("modulation.lin", 0),
}
TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
# the q/k RMS norms' scales: diffusers parameter inside the block -> BFL parameter
DOUBLE_NORMS = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
BLOCKS = (("transformer_blocks.", "double_blocks.", DOUBLE, DOUBLE_NORMS),
          ("single_transformer_blocks.", "single_blocks.", SINGLE, SINGLE_NORMS))


def bfl_module(path: str) -> tuple[str, int, bool] | None:
    """(BFL module, place among the modules fused into it, halves swapped) of a diffusers FLUX module path."""
    if path in TOP:
        return TOP[path], 0, False
    if path == "norm_out.linear":
        return "final_layer.adaLN_modulation.1", 0, True
    for ours, theirs, table, _ in BLOCKS:
        if path.startswith(ours):
            number, _, inner = path[len(ours):].partition(".")
            found = table.get(inner)
            return None if found is None else (f"{theirs}{number}.{found[0]}", found[1], False)
    return None


def bfl_parameter(key: str) -> str | None:
    """The BFL name of a FLUX parameter that belongs to no linear layer (the q/k norm scales); None otherwise."""
    for ours, theirs, _, norms in BLOCKS:
        if key.startswith(ours):
            number, _, inner = key[len(ours):].partition(".")
            return f"{theirs}{number}.{norms[inner]}" if inner in norms else None
    return None
