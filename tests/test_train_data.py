"""The data options through train(): prior loss weight, and buckets + caches + captions resuming exactly."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import draw_image, tiny_config
from stylelora.core import events
from stylelora.families import load_base_model
from stylelora.training.loop import train


def _first_loss(tmp_path: Path, weight: float) -> float:
    draw_image(tmp_path / "d" / "style.png", (64, 64), seed=1)
    (tmp_path / "d" / "style.txt").write_text("a house")
    draw_image(tmp_path / "reg" / "class.png", (64, 64), seed=2)
    config = tiny_config(tmp_path / "d", tmp_path / f"w{weight}", **{
        "data.reg_path": str(tmp_path / "reg"), "data.reg_caption": "a house", "data.prior_loss_weight": weight,
        "train.batch_size": 2, "train.steps": 1})
    return train(config).losses[0]


def test_prior_loss_weight_scales_the_regularisation_loss(tmp_path: Path) -> None:
    # one batch holds the training image and the class image: loss = (l_train + w * l_reg) / 2
    l0, l1, l3 = (_first_loss(tmp_path, w) for w in (0.0, 1.0, 3.0))
    reg_part = l1 - l0
    assert reg_part > 1e-4
    assert l3 - l0 == pytest.approx(3 * reg_part, rel=1e-3)


class VaeRows:
    def __init__(self, model, monkeypatch: pytest.MonkeyPatch):
        self.rows = 0
        original = model.vae.encode

        def encode(x, *a, **k):
            self.rows += x.shape[0]
            return original(x, *a, **k)

        monkeypatch.setattr(model.vae, "encode", encode)


def test_buckets_caches_and_caption_options_resume_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    for i, size in enumerate([(128, 64), (64, 128), (96, 96), (124, 60), (64, 64)]):
        draw_image(data / f"m{i}.png", size, seed=i)
        (data / f"m{i}.txt").write_text(f"picture {i}, flat colours, a box, style")
    draw_image(tmp_path / "reg" / "r.png", (64, 64), seed=9)
    opts = {
        "data.bucket_step": 32, "data.random_flip": True, "data.shuffle_tags": True, "data.keep_tags": 1,
        "data.caption_dropout": 0.2, "data.trigger_word": "zxc", "data.reg_path": str(tmp_path / "reg"),
        "data.reg_caption": "a picture", "cache.latents": "disk", "cache.dir": str(tmp_path / "cache"),
        "train.batch_size": 2, "train.steps": 4, "train.save_every": 2,
    }
    model = load_base_model("builtin:tiny")
    first = VaeRows(model, monkeypatch)
    seen: list[object] = []
    whole = train(tiny_config(data, tmp_path / "whole", **opts), seen.append, model=model)
    assert whole.steps == 4 and 0 < first.rows <= 12  # at most once per image and flip side
    started = next(e for e in seen if isinstance(e, events.Started))
    assert started.num_images == 5
    assert any(isinstance(e, events.Message) and "latent cache: " in e.text for e in seen)  # where it is

    # a second run on the same data (a new output folder), stopped half way and resumed
    model = load_base_model("builtin:tiny")
    second = VaeRows(model, monkeypatch)
    steps: list[int] = []
    config = tiny_config(data, tmp_path / "split", **opts)
    stopped = train(config, lambda e: steps.append(1) if isinstance(e, events.Progress) else None,
                    stop=lambda: len(steps) >= 2, model=model)
    assert stopped.steps == 2 and stopped.stopped_early
    model = load_base_model("builtin:tiny")
    third = VaeRows(model, monkeypatch)
    resumed = train(config.with_overrides({"train.resume": "auto"}), model=model)
    assert second.rows == third.rows == 0  # the disk cache served every latent
    assert resumed.steps == 4
    assert resumed.losses == pytest.approx(whole.losses[2:], rel=1e-4, abs=1e-6)
    a, b = load_file(tmp_path / "whole/whole.safetensors"), load_file(tmp_path / "split/split.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-3), key
