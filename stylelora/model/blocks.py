"""UNet blocks by the names users know: ``down.0``, ``down.1.attn.0``, ``mid``, ``up.0.attn.1``, ``up.2.res.1``.

A block name is the diffusers path of a UNet block, shortened: ``down_blocks.1.attentions.0`` is
``down.1.attn.0``, ``mid_block.resnets.1`` is ``mid.res.1``, ``up_blocks.0.upsamplers.0`` is
``up.0.upsample``. A selector picks a block and everything inside it: ``up.0`` picks every module of
``up_blocks.0``, ``up.0.attn.1`` only that transformer. Diffusers prefixes (``up_blocks.0.attentions.1``)
are read as well.

Two presets follow B-LoRA (Frenkel et al. 2024, arXiv:2403.14572), which found in SDXL that LoRA on
``up_blocks.0.attentions.1`` alone learns the style of an image and leaves its content behind, while
``up_blocks.0.attentions.0`` carries the content: ``style`` and ``content``.

For per-block strength the UNet falls in three groups, as AUTOMATIC1111's "LoRA block weight" extension
has them: IN (``conv_in``, the time and added embeddings, the down blocks), MID (the mid block) and OUT
(the up blocks and ``conv_out``). Text encoders belong to no group; they keep the main strength.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..core.errors import ConfigError

PRESETS = {"style": ("up.0.attn.1",), "content": ("up.0.attn.0",)}
# The UNet modules that get LoRA unless lora.unet_targets names others: every attention projection, the
# transformer blocks' proj_in/proj_out and feed-forward layers (sd-scripts' Transformer2DModel targets).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
# LoCon covers what kohya's conv_dim covers (sd-scripts networks/lora.py): every Conv2d and Linear
# inside the UNet's ResnetBlock2D, Downsample2D and Upsample2D. Its kxk convs (ResNet conv1/conv2, the
# down/upsampler conv) take conv_rank/conv_alpha; the 1x1 conv_shortcut (ResNets that change width)
# and time_emb_proj take the network's rank/alpha, as kohya gives 1x1 convs and Linears.
# (No other UNet module ends in these names.)
LOCON_KXK_TARGETS = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]
LOCON_LINEAR_TARGETS = ["conv_shortcut", "time_emb_proj"]
LOCON_TARGETS = LOCON_KXK_TARGETS + LOCON_LINEAR_TARGETS
GROUPS = ("IN", "MID", "OUT")
TEXT_PARTS = {"te": ("text_encoder", "text_encoder_2"), "te1": ("text_encoder",), "te2": ("text_encoder_2",)}

_LONG = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up", "attentions": "attn", "resnets": "res"}
_SAMPLERS = {"downsamplers": "downsample", "upsamplers": "upsample"}
SELECTOR = re.compile(r"^(down|up)(\.\d+(\.(attn|res)\.\d+|\.(downsample|upsample))?)?$|^mid(\.(attn|res)\.\d+)?$")
_IN_TOP = ("conv_in", "time_embedding", "add_embedding", "class_embedding")


def block_name(path: str) -> str | None:
    """The block of a UNet module path (``up_blocks.0.attentions.1.proj_in`` -> ``up.0.attn.1``); None for
    modules outside the blocks (``conv_in``, ``time_embedding``, ``conv_out``)."""
    parts = path.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) >= 3 and parts[1].isdigit():
        head = f"{_LONG[parts[0]]}.{parts[1]}"
        if parts[2] in _SAMPLERS:
            return f"{head}.{_SAMPLERS[parts[2]]}"
        if parts[2] in ("attentions", "resnets") and len(parts) >= 4:
            return f"{head}.{_LONG[parts[2]]}.{parts[3]}"
        return head
    if parts[0] == "mid_block":
        if len(parts) >= 3 and parts[1] in ("attentions", "resnets"):
            return f"mid.{_LONG[parts[1]]}.{parts[2]}"
        return "mid"
    return None


def normalise(selector: str) -> str:
    """A selector in short form: diffusers prefixes are shortened (``up_blocks.0.attentions.1`` -> ``up.0.attn.1``)."""
    parts, out = selector.strip().split("."), []
    while parts:
        part = parts.pop(0)
        if part in _SAMPLERS:  # a block has one down/upsampler: downsamplers.0 -> downsample
            out.append(_SAMPLERS[part])
            if parts and parts[0] == "0":
                parts.pop(0)
        else:
            out.append(_LONG.get(part, part))
    return ".".join(out)


def expand(selectors: Iterable[str], field: str = "lora.blocks") -> list[str]:
    """Selectors with presets expanded and diffusers prefixes shortened; a malformed one raises ConfigError."""
    out: list[str] = []
    for raw in selectors:
        if raw in PRESETS:
            out += [s for s in PRESETS[raw] if s not in out]
            continue
        selector = normalise(raw)
        if not SELECTOR.match(selector):
            raise ConfigError(
                f"{field}: '{raw}' is not a block name; use down.N, mid or up.N, optionally with .attn.M, .res.M "
                f"or .downsample/.upsample (e.g. up.0.attn.1), or a preset: {', '.join(PRESETS)}"
            )
        if selector not in out:
            out.append(selector)
    return out


def selects(selector: str, path: str) -> bool:
    """Whether ``selector`` (short form) picks the UNet module ``path``."""
    block = block_name(path)
    return block is not None and (block == selector or block.startswith(selector + "."))


def select(paths: Iterable[str], selectors: Iterable[str], field: str = "lora.blocks",
           what: str = "this model's UNet") -> list[str]:
    """The module paths inside the selected blocks. A selector that picks none of ``paths`` raises
    ConfigError naming the blocks that do exist (e.g. ``style`` on an SD1.5 UNet, whose first up block
    has no attention)."""
    paths = list(paths)
    wanted = expand(selectors, field)
    picked: list[str] = []
    for selector in wanted:
        found = [p for p in paths if selects(selector, p)]
        if not found:
            known = sorted({b for b in (block_name(p) for p in paths) if b is not None}, key=_block_order)
            raise ConfigError(
                f"{field}: '{selector}' names no module of {what}; its blocks are: {', '.join(known) or 'none'}"
                + (" (the style and content presets follow B-LoRA's finding for SDXL's UNet)"
                   if selector in PRESETS["style"] + PRESETS["content"] else "")
            )
        picked += [p for p in found if p not in picked]
    return [p for p in paths if p in set(picked)]


def group_of(path: str) -> str:
    """IN, MID or OUT: the per-block strength group of a UNet module path."""
    block = block_name(path)
    if block is None:
        return "IN" if path.startswith(_IN_TOP) else "OUT"
    return {"down": "IN", "mid": "MID", "up": "OUT"}[block.split(".")[0]]


def _block_order(block: str) -> tuple[int, str]:
    return ({"down": 0, "mid": 1, "up": 2}[block.split(".")[0]], block)
