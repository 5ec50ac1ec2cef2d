"""Learned descriptors through transformers, and ``load_descriptor`` for any ``eval.descriptor`` string.

- CLIP (``clip`` is ``openai/clip-vit-large-patch14``; any CLIP folder or hub id): one image embedding serves
  style, content and copying (it mixes what and how); its text embedding gives the prompt score.
- DINOv2 (``dinov2`` is ``facebook/dinov2-base``): self-supervised image features, strong on layout and on
  near-duplicates (copy detection), weak on colour.
- CSD (Somepalli et al. 2024; ``csd`` is ``yuxi-liu-wired/CSD``): a CLIP ViT-L trained to embed style apart from
  content; its style head gives the style score, its backbone the content and copying. The weights are read from
  a ``.safetensors`` file in the authors' layout (``backbone.*``, ``last_layer_style``) into transformers' CLIP
  vision model; nothing is unpickled.
- ``builtin:tiny-clip``: a CLIP with random weights built in code (for tests: it exercises the CLIP path offline).

A model that is not on disk while offline fails at once with a message saying how to point at a local copy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..core.errors import ModelError, offline_hint
from .descriptors import BUILTIN, BuiltinDescriptor, Descriptor, Embeddings, normalised

ALIASES = {"clip": "openai/clip-vit-large-patch14", "dinov2": "facebook/dinov2-base", "csd": "yuxi-liu-wired/CSD"}
CSD_FILES = ("model.safetensors", "csd_clip_model_pytorch.safetensors")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


class _Encoder(Descriptor):
    """A transformers image model and its image processor, on one device, without gradients."""

    def __init__(self, name: str, model: Any, processor: Any, device: str | torch.device | None = None) -> None:
        self.name, self.processor = name, processor
        self.device = torch.device(device or "cpu")
        self.model = model.to(self.device).eval().requires_grad_(False)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return inputs["pixel_values"].to(self.device, self.model.dtype)


class ClipDescriptor(_Encoder):
    what = "CLIP image embeddings (style, content and copying alike: what is shown and how); text embeddings " \
           "for the prompt score"
    copy_threshold = 0.95

    def __init__(self, name: str, model: Any, processor: Any, tokenizer: Any, device: Any = None) -> None:
        super().__init__(name, model, processor, device)
        self.tokenizer = tokenizer

    def image_text(self, images: Sequence[Image.Image]) -> torch.Tensor:
        with torch.no_grad():
            pooled = self.model.vision_model(pixel_values=self.pixels(images)).pooler_output
            return normalised(self.model.visual_projection(pooled)).cpu()

    def embed(self, images: Sequence[Image.Image]) -> Embeddings:
        e = self.image_text(images)
        return Embeddings(e, e, e)

    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.no_grad():
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            return normalised(self.model.text_projection(pooled)).cpu()


class DinoDescriptor(_Encoder):
    what = "DINOv2 image features (layout and near-duplicates; little colour)"
    copy_threshold = 0.9

    def embed(self, images: Sequence[Image.Image]) -> Embeddings:
        with torch.no_grad():
            e = normalised(self.model(pixel_values=self.pixels(images)).pooler_output).cpu()
        return Embeddings(e, e, e)


class CsdDescriptor(_Encoder):
    what = "CSD: a style embedding trained apart from content (style); its CLIP ViT-L backbone (content, copying)"
    copy_threshold = 0.95

    def __init__(self, name: str, model: Any, style_head: torch.Tensor, device: Any = None) -> None:
        super().__init__(name, model, _clip_processor(model.config.image_size), device)
        self.style_head = style_head.to(self.device, self.model.dtype)

    def embed(self, images: Sequence[Image.Image]) -> Embeddings:
        with torch.no_grad():
            features = self.model(pixel_values=self.pixels(images)).pooler_output  # ln_post of the class token
            style = normalised(features @ self.style_head).cpu()
            content = normalised(features).cpu()
        return Embeddings(style, content, content)


# --- loading -------------------------------------------------------------------------------------------------


def _clip_processor(size: int) -> Any:
    """CLIP's own preprocessing (bicubic resize of the short side, centre crop, CLIP's mean and spread)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers 5: no torchvision needed
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=CLIP_MEAN,
                     image_std=CLIP_STD)


def build_tiny_clip() -> ClipDescriptor:
    """A CLIP with random weights, the built-in models' tokenizer and 32 px input (for tests and demos)."""
    from transformers import CLIPConfig, CLIPModel

    from ..model.builtin import clip_config, clip_tokenizer

    tokenizer = clip_tokenizer()
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=clip_config(tokenizer, **size).to_dict(),
                        vision_config=dict(size, image_size=32, patch_size=8), projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    return ClipDescriptor("builtin:tiny-clip", model, _clip_processor(32), tokenizer)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def _hint(name: str) -> str:
    return offline_hint("descriptor", name, "`eval.descriptor=/path/to/folder` (a CLIP or DINOv2 model folder, or "
                        "the CSD .safetensors file), or `eval.descriptor=builtin`, which needs no download")


def _local(name: str) -> Path:
    """``name`` on disk: a folder, or a CSD file; else None (a hub id), fetching what a hub id needs."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelError(f"descriptor '{name}': no such file or folder. Give builtin, clip, dinov2, csd, a hub id "
                         "(openai/clip-vit-large-patch14) or a local folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.txt", "*.safetensors"],
                                      local_files_only=_offline()))
    except Exception as e:  # huggingface_hub raises several types for offline, missing and gated repos
        raise ModelError(_hint(name)) from e


def _csd_file(path: Path) -> Path | None:
    """The CSD weights in ``path`` (the file itself, or one of CSD_FILES in a folder), when they are CSD's."""
    candidates = [path] if path.is_file() else [path / f for f in CSD_FILES if (path / f).is_file()]
    from safetensors import SafetensorError, safe_open

    for candidate in candidates:
        try:
            with safe_open(str(candidate), framework="pt") as f:
                if any(k.endswith("last_layer_style") for k in f.keys()):
                    return candidate
        except (SafetensorError, OSError):
            continue
    return None


def load_csd(file: Path, name: str, device: Any = None) -> CsdDescriptor:
    """CSD from its authors' layout (OpenAI CLIP's visual tower as ``backbone.*``, ``last_layer_style``), mapped
    onto transformers' CLIPVisionModel; the sizes come from the tensors' shapes."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    raw = load_file(str(file))
    prefix = next(k for k in raw if k.endswith("last_layer_style")).removesuffix("last_layer_style")
    sd = {k.removeprefix(prefix): v.float() for k, v in raw.items() if k.startswith(prefix)}
    conv = sd["backbone.conv1.weight"]
    hidden, patch = conv.shape[0], conv.shape[-1]
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("backbone.transformer.resblocks."))
    positions = sd["backbone.positional_embedding"].shape[0]
    width = sd["backbone.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
                              num_attention_heads=max(1, hidden // 64),
                              image_size=patch * math.isqrt(positions - 1), patch_size=patch, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5)
    model = CLIPVisionModel(config)
    # transformers 4 names them vision_model.embeddings..., transformers 5 embeddings...
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in model.state_dict()) else ""
    mapped = {prefix + k: v for k, v in _openai_visual_to_transformers(sd, layers).items()}
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise ModelError(f"descriptor '{name}': {file} is not CSD's layout ({(missing + unexpected)[:3]})")
    return CsdDescriptor(name, model, sd["last_layer_style"], device)


def _openai_visual_to_transformers(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """OpenAI CLIP's VisionTransformer weights (under ``backbone.``) by transformers' CLIP vision tower names."""
    b = "backbone."
    out = {
        "embeddings.patch_embedding.weight": sd[b + "conv1.weight"],
        "embeddings.class_embedding": sd[b + "class_embedding"],
        "embeddings.position_embedding.weight": sd[b + "positional_embedding"],
    }
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = sd[f"{b}{theirs}.{p}"]
    for i in range(layers):
        src, dst = f"{b}transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for proj, w, bias in zip(("q_proj", "k_proj", "v_proj"), sd[src + "attn.in_proj_weight"].chunk(3),
                                 sd[src + "attn.in_proj_bias"].chunk(3), strict=True):
            out[f"{dst}self_attn.{proj}.weight"], out[f"{dst}self_attn.{proj}.bias"] = w, bias
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                out[f"{dst}{ours}.{p}"] = sd[f"{src}{theirs}.{p}"]
    return out


def _load_transformers(name: str, folder: Path, device: Any) -> Descriptor:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

    try:
        kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        kind = None
    try:
        if kind == "clip":
            return ClipDescriptor(name, CLIPModel.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder),
                                  AutoTokenizer.from_pretrained(folder), device)
        if kind == "dinov2":
            return DinoDescriptor(name, AutoModel.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder),
                                  device)
    except (OSError, ValueError) as e:
        raise ModelError(f"descriptor '{name}': cannot load {folder} ({str(e).splitlines()[0]})") from e
    raise ModelError(f"descriptor '{name}': {folder} holds neither a CLIP or DINOv2 model (config.json) nor CSD's "
                     f"weights ({' or '.join(CSD_FILES)})")


def load_descriptor(name: str, device: str | torch.device | None = None) -> Descriptor:
    """The descriptor ``eval.descriptor`` names (builtin, builtin:tiny-clip, an alias, a hub id, a folder or a
    CSD file); ModelError says what is wrong, or how to get it while offline."""
    name = name.strip()
    if name == BUILTIN:
        return BuiltinDescriptor()
    if name == "builtin:tiny-clip":
        return build_tiny_clip()
    if name.startswith("builtin:"):
        raise ModelError(f"descriptor '{name}': no such built-in; the built-ins are builtin and builtin:tiny-clip")
    source = ALIASES.get(name, name)
    path = _local(source)
    csd = _csd_file(path)
    if csd is not None:
        return load_csd(csd, name, device)
    if path.is_file():
        raise ModelError(f"descriptor '{name}': {path} is not CSD's weights (no last_layer_style); give a model folder")
    return _load_transformers(name, path, device)
