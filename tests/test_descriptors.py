"""Issue 21's descriptors: the weight-free one tells style from content, the learned ones load through
transformers from a folder (CLIP with its text side, DINOv2), CSD's weights in its authors' layout give the
embeddings of its own forward pass, builtin:tiny-clip runs the CLIP path offline, and a model that is not on disk
while offline fails with one plain message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from style_model import plain_image, style_image

from stylelora.core.errors import ModelError
from stylelora.evaluation.descriptors import BuiltinDescriptor
from stylelora.evaluation.learned import ALIASES, ClipDescriptor, CsdDescriptor, DinoDescriptor, load_descriptor


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def test_builtin_style_follows_colour_and_texture_and_content_follows_layout() -> None:
    d = BuiltinDescriptor()
    e = d.embed([style_image(0), style_image(1), plain_image(0), plain_image(1)])
    # two pictures in one style are closer in style than one picture in two styles...
    assert cos(e.style[0], e.style[1]) > cos(e.style[0], e.style[2]) + 0.2
    # ...and the same subject in two styles is closer in layout than two subjects in one style
    assert cos(e.content[0], e.content[2]) > cos(e.content[0], e.content[1])
    # copying: a picture is its own near copy (at another size too), another picture is not
    again = d.embed([style_image(0).resize((96, 96)), style_image(3)])
    assert cos(e.copy[0], again.copy[0]) > 0.97 and cos(e.copy[0], again.copy[1]) < 0.9


def test_tiny_clip_embeds_images_and_prompts_offline() -> None:
    d = load_descriptor("builtin:tiny-clip")
    assert isinstance(d, ClipDescriptor)
    e = d.embed([style_image(0), plain_image(0)])
    text = d.text(["a circle", "a lighthouse on a cliff"])
    assert e.style.shape == (2, 32) and text.shape == (2, 32)
    assert torch.allclose(e.style.norm(dim=1), torch.ones(2)) and not torch.allclose(e.style[0], e.style[1])
    assert torch.allclose(d.image_text([style_image(0)]), e.style[:1], atol=1e-5)


def test_clip_and_dinov2_load_from_a_folder(tmp_path: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    from stylelora.evaluation.learned import _clip_processor

    tiny = load_descriptor("builtin:tiny-clip")
    tiny.model.save_pretrained(tmp_path / "clip")
    tiny.processor.save_pretrained(tmp_path / "clip")
    tiny.tokenizer.save_pretrained(tmp_path / "clip")
    clip = load_descriptor(str(tmp_path / "clip"))
    assert isinstance(clip, ClipDescriptor)
    images = [style_image(2), plain_image(5)]
    assert torch.allclose(clip.embed(images).style, tiny.embed(images).style, atol=1e-5)
    assert torch.allclose(clip.text(["a boat"]), tiny.text(["a boat"]), atol=1e-5)

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(tmp_path / "dino")
    _clip_processor(32).save_pretrained(tmp_path / "dino")
    dino = load_descriptor(str(tmp_path / "dino"))
    assert isinstance(dino, DinoDescriptor) and dino.embed(images).content.shape == (2, 32)
    assert dino.text(["a boat"]) is None  # no text side: no prompt score


class _OpenAIVisual(torch.nn.Module):
    """OpenAI CLIP's VisionTransformer as CSD builds on it (its ``clip`` package), at a tiny size: the reference
    the weights' layout comes from."""

    def __init__(self, width: int = 64, layers: int = 2, patch: int = 8, size: int = 32, out: int = 16) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = torch.nn.Parameter(torch.randn(width) * 0.1)
        self.positional_embedding = torch.nn.Parameter(torch.randn((size // patch) ** 2 + 1, width) * 0.1)
        self.ln_pre, self.ln_post = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(width, width // 64 or 1),
                                 "ln_1": torch.nn.LayerNorm(width), "ln_2": torch.nn.LayerNorm(width),
                                 "c_fc": torch.nn.Linear(width, width * 4),
                                 "c_proj": torch.nn.Linear(width * 4, width)})
            for _ in range(layers))
        self.style = torch.nn.Parameter(torch.randn(width, out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.positional_embedding
        x = self.ln_pre(x).transpose(0, 1)
        for b in self.blocks:
            h = b["ln_1"](x)
            x = x + b["attn"](h, h, h, need_weights=False)[0]
            h = b["c_fc"](b["ln_2"](x))
            x = x + b["c_proj"](h * torch.sigmoid(1.702 * h))  # QuickGELU
        return self.ln_post(x[0])

    def csd_state(self) -> dict[str, torch.Tensor]:
        sd = {"backbone.conv1.weight": self.conv1.weight, "backbone.class_embedding": self.class_embedding,
              "backbone.positional_embedding": self.positional_embedding, "last_layer_style": self.style,
              "last_layer_content": self.style.clone()}
        for name in ("ln_pre", "ln_post"):
            for p in ("weight", "bias"):
                sd[f"backbone.{name}.{p}"] = getattr(getattr(self, name), p)
        for i, b in enumerate(self.blocks):
            prefix = f"backbone.transformer.resblocks.{i}."
            sd[prefix + "attn.in_proj_weight"], sd[prefix + "attn.in_proj_bias"] = b["attn"].in_proj_weight, \
                b["attn"].in_proj_bias
            for ours, module in (("attn.out_proj", b["attn"].out_proj), ("ln_1", b["ln_1"]), ("ln_2", b["ln_2"]),
                                 ("mlp.c_fc", b["c_fc"]), ("mlp.c_proj", b["c_proj"])):
                sd[prefix + ours + ".weight"], sd[prefix + ours + ".bias"] = module.weight, module.bias
        return {k: v.detach().contiguous() for k, v in sd.items()}


def test_csd_weights_in_the_authors_layout_give_its_own_embeddings(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = _OpenAIVisual().eval()
    save_file(reference.csd_state(), str(tmp_path / "model.safetensors"))
    csd = load_descriptor(str(tmp_path))
    assert isinstance(csd, CsdDescriptor) and csd.model.config.image_size == 32
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = csd.model(pixel_values=pixels).pooler_output
        theirs = reference(pixels)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    style = csd.embed([Image.fromarray(np.full((40, 40, 3), 200, np.uint8))]).style
    assert style.shape == (1, 16)


def test_a_descriptor_missing_offline_is_one_plain_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as caught:
        load_descriptor("nobody-here/no-such-clip")
    message = str(caught.value)
    assert "could not be downloaded" in message and "`eval.descriptor=/path/to/folder`" in message
    with pytest.raises(ModelError, match="no such built-in"):
        load_descriptor("builtin:tiny-dino")
    with pytest.raises(ModelError, match="no such file or folder"):
        load_descriptor("./not/here")
    assert ALIASES["clip"] == "openai/clip-vit-large-patch14"
