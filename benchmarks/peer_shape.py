"""The peer benchmark's model and data: an SD1.5-layout model with random weights, and 24 photos.

    python benchmarks/peer_shape.py OUT_DIR [--width-scale 1.0] [--photos 24] [--photo-size 512]

Writes ``OUT_DIR/model`` (a diffusers folder: UNet (128, 256, 512, 512) with two layers per block,
three CrossAttnDownBlock2D and one DownBlock2D, cross-attention 768 wide, 8 heads' dimension; a CLIP
text encoder 768 wide with 4 layers, 12 heads and intermediate 3072; a VAE (64, 128, 256, 256) with
two layers per block and factor 8; stylelora's generated tokenizer) and ``OUT_DIR/photos`` (photo-like
JPEGs, seeded, with a ``metadata.jsonl`` of captions that both stylelora and the ``datasets``
imagefolder loader read). The same seed gives the same files. Then, for example::

    python benchmarks/bench_train.py --model OUT_DIR/model --data OUT_DIR/photos --peer

``--width-scale`` shrinks every width (the tests build a tiny one on the CPU in seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

SEED = 0
SUBJECTS = ["a harbour", "a forest path", "a city street", "a bowl of fruit", "a mountain lake", "a portrait",
            "a cat on a sofa", "a bicycle", "a market stall", "a lighthouse", "a garden", "a train station"]


def _width(channels: int, scale: float, multiple: int = 32) -> int:
    return max(multiple, int(round(channels * scale / multiple)) * multiple)


def peer_sizes(scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """The component configs of the peer model, every width multiplied by ``scale``."""
    unet = tuple(_width(c, scale) for c in (128, 256, 512, 512))
    vae = tuple(_width(c, scale) for c in (64, 128, 256, 256))
    text = _width(768, scale, 64)
    return {
        "unet": dict(sample_size=64, block_out_channels=unet, layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=text, attention_head_dim=8),
        "vae": dict(block_out_channels=vae, layers_per_block=2, sample_size=512, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        "clip": dict(hidden_size=text, intermediate_size=4 * text, num_hidden_layers=4,
                     num_attention_heads=max(1, text // 64), projection_dim=text),
    }


def build_peer_model(folder: Path, scale: float = 1.0) -> Path:
    """The peer model as a diffusers folder (``save_pretrained``), random weights from a fixed seed."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from stylelora.model.builtin import clip_config as _clip_config
    from stylelora.model.builtin import clip_tokenizer as _builtin_tokenizer

    sizes = peer_sizes(scale)
    tokenizer = _builtin_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**sizes["unet"])
        vae = AutoencoderKL(**sizes["vae"])
        text_encoder = CLIPTextModel(_clip_config(tokenizer, **sizes["clip"]))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def photo(index: int, size: int) -> Image.Image:
    """A photo-like image: smooth seeded colour fields at several scales, a horizon, and sensor noise."""
    rng = np.random.default_rng([SEED, index])
    image = np.zeros((size, size, 3), np.float32)
    for cells, weight in ((3, 0.6), (9, 0.25), (33, 0.1)):
        coarse = rng.random((cells, cells, 3)).astype(np.float32)
        layer = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        image += weight * np.asarray(layer, np.float32) / 255
    horizon = int(size * rng.uniform(0.3, 0.7))
    image[horizon:] *= rng.uniform(0.5, 0.9)
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))


def write_photos(folder: Path, count: int = 24, size: int = 512) -> Path:
    """``count`` seeded photos of ``size`` px as JPEGs, captions in ``metadata.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        name = f"photo_{i:02d}.jpg"
        photo(i, size).save(folder / name, quality=92)
        rows.append({"file_name": name, "text": f"a photo of {SUBJECTS[i % len(SUBJECTS)]}, number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--width-scale", type=float, default=1.0, help="multiply every width (tests: 0.25)")
    p.add_argument("--photos", type=int, default=24)
    p.add_argument("--photo-size", type=int, default=512)
    args = p.parse_args()
    model = build_peer_model(args.out / "model", args.width_scale)
    photos = write_photos(args.out / "photos", args.photos, args.photo_size)
    print(f"model: {model}\nphotos: {photos}")


if __name__ == "__main__":
    main()
