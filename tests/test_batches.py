"""BatchSource: exact resume, VAE latent cache (memory and disk), text-encoder cache."""

from pathlib import Path

import pytest
import torch

from conftest import draw_image, tiny_config
from stylelora.data.batches import BatchSource, TrainingSet
from stylelora.families import load_base_model
from stylelora.model.losses import noise_and_timesteps


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


def _noise(batch) -> tuple[torch.Tensor, torch.Tensor]:
    return noise_and_timesteps(batch.noise_generators, batch.latents.shape[1:], 1000, offset=0.1)


def test_processes_deal_out_one_global_order_of_batches(dataset: Path, tmp_path: Path, model) -> None:
    # every per-example random choice on: flips, random crops, caption dropout, the posterior sample, noise
    opts = {"data.random_flip": True, "data.center_crop": False, "data.caption_dropout": 0.3}
    single = source_for(dataset, tmp_path, model, **opts)
    expected = [single.next_batch() for _ in range(10)]  # two and a half epochs of 4 images
    config = tiny_config(dataset, tmp_path / "out", **opts)
    ranks = [BatchSource(TrainingSet.from_config(config), config, model, rank, 2) for rank in (0, 1)]
    for b in range(5):  # process r's batch b is the single process's batch 2b + r
        for rank, source in enumerate(ranks):
            got, want = source.next_batch(), expected[2 * b + rank]
            assert got.images == want.images and got.captions == want.captions
            assert torch.equal(got.latents, want.latents)
            assert all(torch.equal(x, y) for x, y in zip(_noise(got), _noise(want), strict=True))
        assert ranks[0].state() == ranks[1].state()  # the position saved is the global one
    assert ranks[0].state() == single.state() == {"epoch": 2, "batch": 2}


def test_an_example_trains_the_same_in_batches_of_1_and_of_2(dataset: Path, tmp_path: Path, model) -> None:
    ones = source_for(dataset, tmp_path, model, **{"data.random_flip": True})
    twos = source_for(dataset, tmp_path, model, **{"data.random_flip": True, "train.batch_size": 2})
    for _ in range(4):  # two epochs: a batch of 2 holds the next two batches of 1, with their noise
        pair, first, second = twos.next_batch(), ones.next_batch(), ones.next_batch()
        assert pair.images == first.images + second.images
        assert torch.equal(pair.latents, torch.cat([first.latents, second.latents]))
        noise, timesteps = _noise(pair)
        (n1, t1), (n2, t2) = _noise(first), _noise(second)
        assert torch.equal(noise, torch.cat([n1, n2])) and torch.equal(timesteps, torch.cat([t1, t2]))


def test_processes_share_the_disk_cache_and_each_entry_has_one_writer(dataset: Path, tmp_path: Path) -> None:
    from stylelora.data.cache import LatentCache

    keys = [(image, (64, 64), "0,0", flip) for image in sorted(dataset.glob("*.png")) for flip in (False, True)]
    posterior = (torch.zeros(4, 8, 8), torch.ones(4, 8, 8))
    folder = tmp_path / "cache"
    written: list[set[Path]] = []
    for rank in (0, 1):  # each process puts every key, as both meet every image over a run
        before = set(folder.rglob("*.safetensors"))
        process = LatentCache(folder, "vae", writer=(rank, 2))
        for key in keys:
            process.put(key, posterior)
        written.append(set(folder.rglob("*.safetensors")) - before)
    assert all(written) and len(written[0]) + len(written[1]) == len(keys)  # split, none written twice
    reader = LatentCache(folder, "vae")  # a later run, or the other process, reads every entry
    assert all(reader.get(key) is not None for key in keys) and reader.hits == len(keys)
