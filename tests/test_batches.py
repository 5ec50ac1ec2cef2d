"""BatchSource: exact resume, VAE latent cache (memory and disk), text-encoder cache."""

from pathlib import Path

import pytest
import torch

from conftest import draw_image, tiny_config
from stylelora.batches import BatchSource, TrainingSet
from stylelora.models import load_base_model


@pytest.fixture(scope="module")
def model():
    return load_base_model("builtin:tiny")


class Counter:
    """Wraps a module method and counts the rows (images or captions) it was called with."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, obj: object, name: str):
        self.rows = 0
        self.calls = 0
        original = getattr(obj, name)

        def counted(x, *args, **kwargs):
            self.rows += x.shape[0]
            self.calls += 1
            return original(x, *args, **kwargs)

        monkeypatch.setattr(obj, name, counted)


def source_for(data_dir: Path, tmp_path: Path, model, **overrides) -> BatchSource:
    config = tiny_config(data_dir, tmp_path / "out", **overrides)
    return BatchSource(TrainingSet.from_config(config), config, model)


def test_resumed_source_gives_the_same_batches(dataset: Path, tmp_path: Path, model) -> None:
    opts = {"train.batch_size": 3, "data.random_flip": True, "data.caption_dropout": 0.3, "data.shuffle_tags": True}
    whole = source_for(dataset, tmp_path, model, **opts)
    batches = [whole.next_batch() for _ in range(5)]
    assert whole.state() == {"epoch": 2, "batch": 1}  # 4 images in batches of 3: two per epoch
    resumed = source_for(dataset, tmp_path, model, **opts)
    resumed.load_state({"epoch": 1, "batch": 1})
    for expected in batches[3:]:
        got = resumed.next_batch()
        assert got.images == expected.images and got.captions == expected.captions
        assert torch.equal(got.latents, expected.latents)  # bit for bit, though one run read its cache


def test_latent_cache_encodes_each_image_once_and_keeps_sampling(dataset: Path, tmp_path: Path, model,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    vae = Counter(monkeypatch, model.vae, "encode")
    cached = source_for(dataset, tmp_path, model, **{"train.batch_size": 2})
    first = [cached.next_batch() for _ in range(6)]  # 3 epochs of 4 images
    assert vae.rows == 4
    vae.rows = 0
    plain = source_for(dataset, tmp_path, model, **{"train.batch_size": 2, "cache.latents": "off"})
    second = [plain.next_batch() for _ in range(6)]
    assert vae.rows == 12  # without the cache every use encodes again
    for a, b in zip(first, second, strict=True):
        assert a.images == b.images
        assert torch.allclose(a.latents, b.latents, atol=1e-5)  # cached == fresh, noise included
    # the cache holds the posterior, not one sample: the same image differs between epochs
    by_image: dict[Path, list[torch.Tensor]] = {}
    for batch in first:
        for image, latent in zip(batch.images, batch.latents, strict=True):
            by_image.setdefault(image, []).append(latent)
    assert all(not torch.equal(v[0], v[1]) for v in by_image.values())


def test_flips_are_cached_per_side(dataset: Path, tmp_path: Path, model, monkeypatch: pytest.MonkeyPatch) -> None:
    vae = Counter(monkeypatch, model.vae, "encode")
    source = source_for(dataset, tmp_path, model, **{"data.random_flip": True})
    for _ in range(40):
        source.next_batch()
    sides = {(source.data.example(ep, s), source.data.view(ep, s).flip) for ep in range(10) for s in range(4)}
    assert len({f for _, f in sides}) == 2 and vae.rows == len(sides) <= 8


def test_disk_cache_is_reused_by_a_second_run_and_keyed_by_vae(dataset: Path, tmp_path: Path, model,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    opts = {"cache.latents": "disk", "cache.dir": str(tmp_path / "cache"), "data.random_flip": True}
    vae = Counter(monkeypatch, model.vae, "encode")
    first = source_for(dataset, tmp_path, model, **opts)
    a = [first.next_batch() for _ in range(8)]
    encoded = vae.rows
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert encoded > 0 and len(files) == encoded
    assert not list((tmp_path / "cache").rglob("*.tmp"))

    fresh_model = load_base_model("builtin:tiny")  # a new process would load the same weights again
    vae2 = Counter(monkeypatch, fresh_model.vae, "encode")
    second = source_for(dataset, tmp_path, fresh_model, **opts)
    b = [second.next_batch() for _ in range(8)]
    assert vae2.rows == 0
    assert all(torch.allclose(x.latents, y.latents, atol=1e-5) for x, y in zip(a, b, strict=True))

    # an edited image and a different VAE each miss the cache
    draw_image(dataset / "img0.png", (96, 80), seed=99)
    with torch.no_grad():
        fresh_model.vae.encoder.conv_in.bias.add_(0.01)
    third = source_for(dataset, tmp_path, fresh_model, **opts)
    [third.next_batch() for _ in range(2)]
    assert vae2.rows == 2


def test_random_crop_turns_the_latent_cache_off_with_a_note(dataset: Path, tmp_path: Path, model,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    vae = Counter(monkeypatch, model.vae, "encode")
    source = source_for(dataset, tmp_path, model, **{"data.center_crop": False})
    assert any("latent cache off" in n and "center_crop" in n for n in source.notes)
    for _ in range(8):
        source.next_batch()
    assert vae.rows == 8


def test_text_encoder_runs_once_per_caption_when_cached(dataset: Path, tmp_path: Path, model,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    te = Counter(monkeypatch, model.text_encoder, "forward")
    cached = source_for(dataset, tmp_path, model, **{"train.batch_size": 2})
    first = [cached.next_batch() for _ in range(4)]
    assert te.rows == 4
    te.rows = 0
    plain = source_for(dataset, tmp_path, model, **{"train.batch_size": 2, "cache.text_encoder": False})
    second = [plain.next_batch() for _ in range(4)]
    assert te.rows == 8
    for a, b in zip(first, second, strict=True):
        assert a.text is not None and b.text is not None
        assert torch.allclose(a.text.states, b.text.states, atol=1e-5)

    shuffled = source_for(dataset, tmp_path, model, **{"data.shuffle_tags": True})
    assert shuffled.text_cache is None and any("shuffle_tags" in n for n in shuffled.notes)
    training = source_for(dataset, tmp_path, model, **{"lora.train_text_encoder": True})
    te.rows = 0
    assert training.next_batch().text is None and te.rows == 0  # the loop runs it, with gradients
