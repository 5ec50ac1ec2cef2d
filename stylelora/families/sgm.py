"""The original (SGM/LDM) module names of a diffusers Stable Diffusion UNet: the names kohya's SDXL tools
give LoRA modules (``input_blocks.4.1.transformer_blocks.0...``, ``middle_block``, ``output_blocks``) and
the names of the UNet in a single-file checkpoint. SGM has an input/output block per diffusers layer, plus
one per level for its down/upsampler."""

from __future__ import annotations

# diffusers ResnetBlock2D layer -> SGM ResBlock layer
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}


def sgm_path(path: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str | None:
    """The SGM (original Stability) name of a diffusers SDXL UNet module, or None if it has none."""
    if path in _SGM_TOP:
        return _SGM_TOP[path]
    block, *p = path.split(".")
    if block == "down_blocks" and len(p) >= 4:
        return _sgm_down(p, layers_per_block)
    if block == "mid_block" and len(p) >= 3:
        return _sgm_mid(p)
    if block == "up_blocks" and len(p) >= 4:
        return _sgm_up(p, layers_per_block, up_blocks_with_attention)
    return None


def _sgm_layer(layer: str, rest: list[str]) -> str | None:
    """Inside an SGM input or output block: ``0.<ResBlock layer>`` for a resnet, ``1.<path>`` for attention."""
    if layer == "resnets":
        inner = _SGM_RESNET.get(".".join(rest))
        return None if inner is None else f"0.{inner}"
    return "1." + ".".join(rest) if layer == "attentions" else None


def _sgm_down(p: list[str], layers_per_block: int) -> str | None:
    i, layer, j, rest = int(p[0]), p[1], int(p[2]), p[3:]
    n = layers_per_block + 1
    if layer == "downsamplers":
        return f"input_blocks.{(i + 1) * n}.0.op" if rest == ["conv"] else None
    inner = _sgm_layer(layer, rest)
    return None if inner is None else f"input_blocks.{1 + i * n + j}.{inner}"


def _sgm_mid(p: list[str]) -> str | None:
    layer, j, rest = p[0], int(p[1]), p[2:]
    inner = _SGM_RESNET.get(".".join(rest))
    if layer == "resnets" and inner is not None:
        return f"middle_block.{2 * j}.{inner}"
    return "middle_block.1." + ".".join(rest) if layer == "attentions" and j == 0 else None


def _sgm_up(p: list[str], layers_per_block: int, up_blocks_with_attention: set[int]) -> str | None:
    i, layer, j, rest = int(p[0]), p[1], int(p[2]), p[3:]
    n = layers_per_block + 1
    if layer == "upsamplers":
        slot = 2 if i in up_blocks_with_attention else 1  # after the resnet, and the attention if any
        return f"output_blocks.{i * n + layers_per_block}.{slot}.conv" if rest == ["conv"] else None
    inner = _sgm_layer(layer, rest)
    return None if inner is None else f"output_blocks.{i * n + j}.{inner}"
