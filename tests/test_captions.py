"""Caption options, kohya-style folder repeats and regularisation images in an epoch."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import draw_image, tiny_config
from stylelora.core.config import DataConfig
from stylelora.core.errors import ConfigError
from stylelora.data.batches import TrainingSet
from stylelora.data.captions import build_caption

TAGS = "zxc style, red hat, blue sky, a cat, grass, sunset"


def test_shuffle_keeps_the_first_tags_and_moves_the_rest() -> None:
    config = DataConfig(shuffle_tags=True, keep_tags=2)
    seen = set()
    for i in range(30):
        tags = build_caption(TAGS, config, np.random.default_rng(i)).split(", ")
        assert tags[:2] == ["zxc style", "red hat"]
        assert sorted(tags) == sorted(TAGS.split(", "))
        seen.add(tuple(tags))
    assert len(seen) > 10
    assert build_caption(TAGS, DataConfig(), np.random.default_rng(0)) == TAGS  # off: untouched


def test_trigger_word_stays_first_when_shuffling() -> None:
    config = DataConfig(shuffle_tags=True, keep_tags=1, trigger_word="sks")
    for i in range(10):
        tags = build_caption("sks, " + TAGS, config, np.random.default_rng(i)).split(", ")
        assert tags[:2] == ["sks", "zxc style"] and tags.count("sks") == 1
    assert build_caption("a cat", config, np.random.default_rng(0), trigger=False) == "a cat"


def test_caption_dropout_rate_on_a_seeded_run(tmp_path: Path) -> None:
    for i in range(10):
        draw_image(tmp_path / "d" / f"{i}.png", (16, 16), seed=i)
        (tmp_path / "d" / f"{i}.txt").write_text(f"tag{i}, other")
    for rate in (0.0, 0.25):
        data = TrainingSet.from_config(tiny_config(tmp_path / "d", tmp_path / "o", **{"data.caption_dropout": rate}))
        captions = [data.caption(epoch, slot) for epoch in range(200) for slot in range(len(data))]
        dropped = sum(c == "" for c in captions) / len(captions)
        assert abs(dropped - rate) < 0.03, dropped
        again = TrainingSet.from_config(tiny_config(tmp_path / "d", tmp_path / "o", **{"data.caption_dropout": rate}))
        assert [again.caption(3, s) for s in range(10)] == [data.caption(3, s) for s in range(10)]
    config = tiny_config(tmp_path / "d", tmp_path / "o", **{"data.shuffle_tags": True, "data.trigger_word": "zxc"})
    shuffled = TrainingSet.from_config(config)
    orders = {shuffled.caption(epoch, 0) for epoch in range(20)}
    assert orders == {"zxc, tag0, other", "zxc, other, tag0"}


def test_folder_repeats_like_kohya(tmp_path: Path) -> None:
    draw_image(tmp_path / "d" / "3_sks style" / "a.png", (16, 16))
    (tmp_path / "d" / "3_sks style" / "a.txt").write_text("a cat")
    draw_image(tmp_path / "d" / "1_sks style" / "b.png", (16, 16))  # no caption: the folder's words
    draw_image(tmp_path / "d" / "plain" / "c.png", (16, 16))
    data = TrainingSet.from_config(tiny_config(tmp_path / "d", tmp_path / "o", **{"data.repeats": 2}))
    counts = Counter(e.image.name for e in data.images)
    assert counts == {"a.png": 3, "b.png": 1, "c.png": 2}  # folders override data.repeats
    assert data.num_images == 3 and len(data) == 6
    captions = {e.image.name: e.caption for e in data.images}
    assert captions["b.png"] == "sks style" and captions["a.png"] == "a cat"
    plan = data.epoch_batches(0)
    assert Counter(data.example(0, s).image.name for b in plan for s in b) == counts


def test_regularisation_images_are_mixed_in_one_for_one(tmp_path: Path) -> None:
    for i in range(3):
        draw_image(tmp_path / "d" / f"t{i}.png", (16, 16), seed=i)
    for i in range(5):
        draw_image(tmp_path / "reg" / f"r{i}.png", (16, 16), seed=10 + i)
    (tmp_path / "reg" / "r0.txt").write_text("a painting of a house")
    config = tiny_config(tmp_path / "d", tmp_path / "o", **{
        "data.reg_path": str(tmp_path / "reg"), "data.reg_caption": "a painting", "data.trigger_word": "sks",
        "train.batch_size": 2})
    data = TrainingSet.from_config(config)
    assert len(data) == 6 and data.num_images == 3
    used = Counter()
    for epoch in range(5):
        slots = [s for b in data.epoch_batches(epoch) for s in b]
        examples = [data.example(epoch, s) for s in slots]
        assert sum(e.regularisation for e in examples) == 3
        used.update(e.image.name for e in examples if e.regularisation)
        for s, e in zip(slots, examples, strict=True):
            caption = data.caption(epoch, s)
            assert caption.startswith("sks") != e.regularisation  # no trigger word on class images
    assert set(used) == {f"r{i}.png" for i in range(5)}  # every class image is used in turn
    captions = {e.image.name: e.caption for e in data.reg}
    assert captions["r0.png"] == "a painting of a house" and captions["r1.png"] == "a painting"


def test_new_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="data.caption_dropout: must be <= 1"):
        tiny_config(Path("x"), Path("y"), **{"data.caption_dropout": 1.5})
    with pytest.raises(ConfigError, match="data.bucket_step: must be a multiple of 8"):
        tiny_config(Path("x"), Path("y"), **{"data.bucket_step": 60})
    with pytest.raises(ConfigError, match="cache.latents: must be one of"):
        tiny_config(Path("x"), Path("y"), **{"cache.latents": "gpu"})


def test_a_missing_regularisation_folder_is_named(tmp_path: Path) -> None:
    from stylelora.core.errors import DataError

    draw_image(tmp_path / "d" / "a.png", (16, 16))
    config = tiny_config(tmp_path / "d", tmp_path / "o", **{"data.reg_path": str(tmp_path / "nope")})
    with pytest.raises(DataError, match=r"data.reg_path: '.*nope': no such folder. Point it at a folder of class"):
        TrainingSet.from_config(config)


def test_repeat_folders_work_with_metadata_jsonl(tmp_path: Path) -> None:
    import json

    draw_image(tmp_path / "d" / "2_x" / "a.png", (16, 16))
    draw_image(tmp_path / "d" / "b.png", (16, 16))
    rows = [{"file_name": "2_x/a.png", "text": "first"}, {"file_name": "b.png", "text": "second"}]
    (tmp_path / "d" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = TrainingSet.from_config(tiny_config(tmp_path / "d", tmp_path / "o"))
    assert Counter(e.caption for e in data.images) == {"first": 2, "second": 1}


def test_data_options_are_in_the_adapter_metadata(tmp_path: Path) -> None:
    from stylelora.adapters.metadata import kohya_metadata
    from stylelora.families import load_base_model

    config = tiny_config(tmp_path, tmp_path / "o", **{
        "data.shuffle_tags": True, "data.keep_tags": 2, "data.caption_dropout": 0.1, "data.buckets": False,
        "data.reg_path": str(tmp_path), "data.prior_loss_weight": 0.5})
    meta = kohya_metadata(config, load_base_model("builtin:tiny"), 3, 4)
    assert meta["ss_shuffle_caption"] == "True" and meta["ss_keep_tokens"] == "2"
    assert meta["ss_caption_dropout_rate"] == "0.1" and meta["ss_enable_bucket"] == "False"
    assert meta["ss_prior_loss_weight"] == "0.5" and meta["ss_cache_latents"] == "True"


def test_a_batch_larger_than_an_epoch_is_refused_counting_repeats_and_reg(tmp_path: Path) -> None:
    from stylelora.core.errors import DataError

    draw_image(tmp_path / "d" / "3_x" / "a.png", (16, 16))
    draw_image(tmp_path / "reg" / "r.png", (16, 16))
    assert len(TrainingSet.from_config(tiny_config(tmp_path / "d", tmp_path / "o", **{"train.batch_size": 3}))) == 3
    with pytest.raises(DataError, match="3 examples per epoch .* cannot fill one batch of 4; lower the batch size to 3"
                       ):
        TrainingSet.from_config(tiny_config(tmp_path / "d", tmp_path / "o", **{"train.batch_size": 4}))
    reg = {"train.batch_size": 6, "data.reg_path": str(tmp_path / "reg")}
    with_reg = tiny_config(tmp_path / "d", tmp_path / "o", **reg)
    assert len(TrainingSet.from_config(with_reg)) == 6


def test_validation_and_check_captions_match_what_training_uses() -> None:
    import numpy as np

    from stylelora.core.config import DataConfig
    from stylelora.data.captions import build_caption, with_trigger

    config = DataConfig(trigger_word="zxc")
    for caption in ["a cat, zxc, oil", "zxc, a cat", "a cat", "", "zxcvb, a cat"]:
        trained = build_caption(caption, config, np.random.default_rng(0))
        assert with_trigger(caption, "zxc") == trained
    assert with_trigger("a cat, zxc, oil", "zxc") == "zxc, a cat, oil"
    assert with_trigger("zxcvb, a cat", "zxc") == "zxc, zxcvb, a cat"
