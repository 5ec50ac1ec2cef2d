"""kohya module names (A1111, ComfyUI, sd-scripts) for the modules of a base model, and back.

The forward map is written from the rules kohya's tools use; the reverse map is the inverse of
the forward map over the base model's own module list, so no key is ever parsed by guessing which
underscores were dots.

- SD1/SD2 UNet: ``lora_unet_`` + the diffusers path with ``.`` -> ``_`` (sd-scripts trains SD1/2 on
  a UNet with diffusers names).
- SDXL UNet: ``lora_unet_`` + the original SGM path (``input_blocks.4.1.transformer_blocks.0...``,
  ``middle_block``, ``output_blocks``), since kohya's SDXL tools use the SGM UNet.
- CLIP text encoders: ``lora_te_`` (SDXL: ``lora_te1_`` / ``lora_te2_``) + the path including
  ``text_model.``, which transformers 5 dropped from CLIPTextModel's module names.
"""

from __future__ import annotations

from ..core.errors import FormatError

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

# diffusers ResnetBlock2D layer -> SGM ResBlock layer
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}


def kohya_prefix(part: str, kind: str) -> str:
    if part == "unet":
        return "lora_unet_"
    if part == "text_encoder":
        return "lora_te1_" if kind == "sdxl" else "lora_te_"
    if part == "text_encoder_2":
        return "lora_te2_"
    raise FormatError(f"no kohya name for adapter part '{part}'")


def conventional_text_path(path: str) -> str:
    """A CLIP text-encoder module path as the exchange formats (kohya and diffusers files) spell it.

    transformers 5 flattened CLIPTextModel (``encoder.layers...``); transformers 4, A1111, ComfyUI and
    every shared file keep ``text_model.encoder.layers...``. ``text_projection`` sits outside text_model.
    """
    if path.startswith("text_model.") or path == "text_projection":
        return path
    return "text_model." + path


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


def _sgm_layer(kind: str, rest: list[str]) -> str | None:
    """Inside an SGM input or output block: ``0.<ResBlock layer>`` for a resnet, ``1.<path>`` for attention."""
    if kind == "resnets":
        inner = _SGM_RESNET.get(".".join(rest))
        return None if inner is None else f"0.{inner}"
    return "1." + ".".join(rest) if kind == "attentions" else None


# SGM has an input/output block per diffusers layer, plus one per level for its down/upsampler.
def _sgm_down(p: list[str], layers_per_block: int) -> str | None:
    i, kind, j, rest = int(p[0]), p[1], int(p[2]), p[3:]
    n = layers_per_block + 1
    if kind == "downsamplers":
        return f"input_blocks.{(i + 1) * n}.0.op" if rest == ["conv"] else None
    layer = _sgm_layer(kind, rest)
    return None if layer is None else f"input_blocks.{1 + i * n + j}.{layer}"


def _sgm_mid(p: list[str]) -> str | None:
    kind, j, rest = p[0], int(p[1]), p[2:]
    inner = _SGM_RESNET.get(".".join(rest))
    if kind == "resnets" and inner is not None:
        return f"middle_block.{2 * j}.{inner}"
    return "middle_block.1." + ".".join(rest) if kind == "attentions" and j == 0 else None


def _sgm_up(p: list[str], layers_per_block: int, up_blocks_with_attention: set[int]) -> str | None:
    i, kind, j, rest = int(p[0]), p[1], int(p[2]), p[3:]
    n = layers_per_block + 1
    if kind == "upsamplers":
        slot = 2 if i in up_blocks_with_attention else 1  # after the resnet, and the attention if any
        return f"output_blocks.{i * n + layers_per_block}.{slot}.conv" if rest == ["conv"] else None
    layer = _sgm_layer(kind, rest)
    return None if layer is None else f"output_blocks.{i * n + j}.{layer}"


class KohyaNames:
    """Kohya name <-> (part, module path) for one base model's module list."""

    def __init__(self, modules: dict[str, list[str]], kind: str, layers_per_block: int = 2) -> None:
        self.kind = kind
        self.forward: dict[tuple[str, str], str] = {}
        up_attn = {int(m.split(".")[1]) for m in modules.get("unet", []) if m.startswith("up_blocks.")
                   and m.split(".")[2] == "attentions"}
        for part, paths in modules.items():
            prefix = kohya_prefix(part, kind)
            for path in paths:
                if part == "unet":
                    mapped = sgm_path(path, layers_per_block, up_attn) if kind == "sdxl" else path
                else:
                    mapped = conventional_text_path(path)
                if mapped is not None:
                    self.forward[(part, path)] = prefix + mapped.replace(".", "_")
        self.reverse: dict[str, tuple[str, str]] = {}
        for key, name in self.forward.items():
            if name in self.reverse:  # two modules whose names differ only in '.' vs '_'
                raise FormatError(f"kohya name {name} is ambiguous: {self.reverse[name][1]} and {key[1]}")
            self.reverse[name] = key
        if kind == "sdxl":  # read (never write) SDXL files that some trainers name with diffusers paths
            for path in modules.get("unet", []):
                self.reverse.setdefault("lora_unet_" + path.replace(".", "_"), ("unet", path))

    def name(self, part: str, path: str) -> str:
        try:
            return self.forward[(part, path)]
        except KeyError:
            raise FormatError(
                f"{part} module '{path}' has no kohya name for this {self.kind} model (it is not a module "
                "kohya's tools adapt); export it in the diffusers format instead"
            ) from None
