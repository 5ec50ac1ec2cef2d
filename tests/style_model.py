"""A tiny model that can learn a style, and style sets drawn in code.

``builtin:tiny``'s VAE has random weights: every picture encodes to nearly the same latents (its GroupNorms
wash out colours), so no training can move its images toward a dataset's colours. ``colour_model()`` is
``builtin:tiny`` with a VAE whose weights are set by hand so that it works as a plain 8x downsampler: each
latent is the mean colour of an 8x8 block (times LATENT_GAIN), and decoding paints the blocks back. Through it a
LoRA learns real colours and 8-pixel textures in seconds on a CPU.

``style_set`` draws images whose style is known by construction: saturated colour mosaics of 8-pixel tiles with
a subject (a shape) on them; ``plain_set`` the same subjects in soft greys.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

LATENT_GAIN = 5.0  # latents are 5x the block colours (x scaling_factor 0.18215: about unit size, like noise)
OFFSET = 10.0  # where SiLU is all but linear
CONSTANT = 100.0  # a channel that keeps the single GroupNorm's mean and spread fixed, whatever the picture

SUBJECTS = ["circle", "square", "triangle", "cross", "ring", "bar", "diamond", "dot"]


def _identity(conv: torch.nn.Conv2d, pairs: list[tuple[int, int]], gain: float = 1.0) -> None:
    """``conv`` copies input channel i to output channel o (its centre tap) for each (o, i); the rest is zero."""
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    k = conv.weight.shape[-1] // 2
    for o, i in pairs:
        conv.weight[o, i, k, k] = gain


def _carry(channels: int) -> list[tuple[int, int]]:
    return [(c, c) for c in range(channels)]


def _quiet_blocks(module: torch.nn.Module) -> None:
    """Every residual branch off: resnets and attention pass their input through unchanged."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    for m in module.modules():
        if isinstance(m, ResnetBlock2D):
            m.conv2.weight.zero_()
            m.conv2.bias.zero_()
            if m.conv_shortcut is not None:
                _identity(m.conv_shortcut, _carry(min(m.conv_shortcut.in_channels, m.conv_shortcut.out_channels)))
        elif isinstance(m, Attention):
            m.to_out[0].weight.zero_()
            m.to_out[0].bias.zero_()
        elif isinstance(m, Downsample2D):  # a 2x2 mean (the conv pads right and bottom by one, stride 2)
            m.conv.weight.zero_()
            m.conv.bias.zero_()
            for c in range(m.conv.out_channels):
                m.conv.weight[c, c, :2, :2] = 0.25
        elif isinstance(m, Upsample2D):  # nearest-neighbour doubling, then a conv that passes it on
            _identity(m.conv, _carry(m.conv.out_channels))


def _through_norm(norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d, pairs: list[tuple[int, int]],
                  gain: float) -> None:
    """The closing GroupNorm (one group), SiLU and conv as a linear map: the norm's mean and spread are pinned
    by the constant channel (and each colour's negative beside it), its affine lifts the values to where SiLU
    is linear, and ``conv`` takes them back down."""
    count = norm.num_channels
    mean = CONSTANT / count  # the colours and their negatives cancel
    spread = CONSTANT * np.sqrt(count - 1) / count  # all but the constant's share is (near enough) zero
    norm.weight.fill_(spread)
    norm.bias.fill_(OFFSET + mean)
    _identity(conv, pairs, gain)
    for o, _ in pairs:
        conv.bias[o] = -OFFSET * gain


def colour_vae(config: dict) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**{**config, "norm_num_groups": 1})
    c0 = vae.config.block_out_channels[0]
    with torch.no_grad():
        enc, dec = vae.encoder, vae.decoder
        # encoder: RGB and their negatives, plus the constant channel; 8x8 means through the downsamplers
        _identity(enc.conv_in, [(c, c) for c in range(3)] + [(3 + c, c) for c in range(3)])
        for c in range(3):
            enc.conv_in.weight[3 + c, c, 1, 1] = -1.0
        enc.conv_in.bias[6] = CONSTANT
        _quiet_blocks(enc)
        _through_norm(enc.conv_norm_out, enc.conv_out, [(c, c) for c in range(3)], LATENT_GAIN)
        enc.conv_out.bias[4:] = -30.0  # log variance: sampling gives the mean
        _identity(vae.quant_conv, _carry(8))
        vae.quant_conv.bias[4:] = 0.0
        # decoder: the three colour latents back (with negatives and the constant), blocks painted 8x
        _identity(vae.post_quant_conv, _carry(4))
        _identity(dec.conv_in, [(c, c) for c in range(3)] + [(3 + c, c) for c in range(3)], 1 / LATENT_GAIN)
        for c in range(3):
            dec.conv_in.weight[3 + c, c, 1, 1] = -1 / LATENT_GAIN
        dec.conv_in.bias[6] = CONSTANT
        _quiet_blocks(dec)
        _through_norm(dec.conv_norm_out, dec.conv_out, [(c, c) for c in range(3)], 1.0)
    assert c0 >= 7
    return vae


def colour_model(prediction_type: str = "auto"):
    """``builtin:tiny`` with the colour-carrying VAE (a fresh model each call)."""
    from stylelora.families import load_base_model

    model = load_base_model("builtin:tiny", "", prediction_type)
    vae = colour_vae(dict(model.pipeline.vae.config))
    model.pipeline.register_modules(vae=vae.eval().requires_grad_(False))
    return model


def _subject(i: int, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] / n
    cx, cy, r = 0.3 + 0.4 * ((i * 37) % 10) / 10, 0.3 + 0.4 * ((i * 53) % 10) / 10, 0.22
    d = (xx - cx) ** 2 + (yy - cy) ** 2
    shapes = [d < r * r, (abs(xx - cx) < r) & (abs(yy - cy) < r), (yy > cy - r) & (abs(xx - cx) < (yy - cy + r) / 2),
              (abs(xx - cx) < r / 3) | (abs(yy - cy) < r / 3), (d < r * r) & (d > r * r / 4), abs(yy - cy) < r / 3,
              abs(xx - cx) + abs(yy - cy) < r, d < r * r / 4]
    return shapes[i % len(shapes)]


def style_image(i: int, n: int = 64) -> Image.Image:
    """A saturated mosaic: 8-pixel tiles in magenta and cyan, the subject in yellow and orange tiles."""
    yy, xx = np.mgrid[0:n, 0:n]
    tiles = ((xx // 8 + yy // 8 + i) % 2).astype(bool)[..., None]
    image = np.where(tiles, [230, 20, 200], [10, 200, 230])
    subject = np.where(tiles, [250, 230, 10], [250, 120, 0])
    mask = _subject(i, n)
    image[mask] = subject[mask]
    return Image.fromarray(image.astype(np.uint8))


def plain_image(i: int, n: int = 64) -> Image.Image:
    """The same subject, soft and grey."""
    yy, xx = np.mgrid[0:n, 0:n] / n
    grey = 100 + 60 * (xx + yy) / 2
    image = np.stack([grey, grey, grey], -1)
    mask = _subject(i, n)
    image[mask] = image[mask] * 0.6 + 40
    return Image.fromarray(image.astype(np.uint8)).filter(ImageFilter.GaussianBlur(3))


def draw_set(folder: Path, draw, count: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        subject = SUBJECTS[i % len(SUBJECTS)]
        draw(i).save(folder / f"{subject}-{i}.png")
        (folder / f"{subject}-{i}.txt").write_text(f"a {subject}", encoding="utf-8")
    return folder
