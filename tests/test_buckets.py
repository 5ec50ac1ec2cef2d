"""Aspect-ratio buckets: the bucket list, the assignment rule, and batches of one shape."""

import math
from pathlib import Path

import pytest
from PIL import Image

from conftest import draw_image, tiny_config
from stylelora.data.batches import TrainingSet
from stylelora.data.buckets import assign_bucket, crop_after_resize, make_buckets, oriented_size

ASPECTS = [(1000, 1010), (1140, 1000), (1000, 1140), (1500, 1000), (1000, 1500), (1920, 1080),
           (1080, 1920), (2000, 1000), (3000, 1000), (1000, 2400), (777, 555), (512, 512)]


def test_buckets_surround_the_target_area_in_steps() -> None:
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (576, 448) in buckets and (448, 576) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w, h) <= 1024
    # each bucket is as tall as its width allows: one step more would pass the target area
    for w, h in buckets:
        assert w * (h + 64) > 512 * 512 or h + 64 > 1024 or (h, w) in buckets


@pytest.mark.parametrize("size", ASPECTS)
def test_each_image_goes_near_its_aspect_with_less_than_a_step_of_crop(size: tuple[int, int]) -> None:
    bucket = assign_bucket(size, 512, 64)
    _, crop = crop_after_resize(size, bucket)
    assert max(crop) < 64, (size, bucket, crop)
    assert bucket[0] * bucket[1] >= 0.75 * 512 * 512
    # nearest aspect among the buckets, unless that one would crop a full step
    nearest = min(make_buckets(512, 64), key=lambda b: abs(math.log(b[0] / b[1] * size[1] / size[0])))
    if max(crop_after_resize(size, nearest)[1]) < 64:
        assert bucket == nearest


def test_no_upscale_keeps_small_images_small() -> None:
    assert assign_bucket((300, 200), 512, 64) == (640, 384)  # upscaled by 2.1 without the option
    small = assign_bucket((300, 200), 512, 64, no_upscale=True)
    assert small == (256, 192)
    for size in [(300, 200), (530, 700), (1500, 1000), (100, 1000)]:
        w, h = assign_bucket(size, 512, 64, no_upscale=True)
        scale, crop = crop_after_resize(size, (w, h))
        assert scale <= 1.0 and max(crop) < 64 and w * h <= 512 * 512


def test_exif_rotated_images_are_bucketed_upright(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (120, 60)).save(tmp_path / "r.jpg", exif=exif)
    assert oriented_size(tmp_path / "r.jpg") == (60, 120)


def _mixed(folder: Path) -> Path:
    sizes = [(128, 64), (64, 128), (96, 96), (124, 60), (60, 124), (80, 80), (128, 40)]
    for i, size in enumerate(sizes):
        draw_image(folder / f"m{i}.png", size, seed=i)
        (folder / f"m{i}.txt").write_text(f"picture {i}")
    return folder


def test_mixed_aspects_make_batches_of_one_shape_with_small_crops(tmp_path: Path) -> None:
    config = tiny_config(_mixed(tmp_path / "d"), tmp_path / "o", **{"data.bucket_step": 32, "train.batch_size": 2})
    data = TrainingSet.from_config(config)
    buckets = {e.image.name: e.bucket for e in data.images}
    assert buckets["m0.png"][0] > buckets["m0.png"][1] and buckets["m1.png"][0] < buckets["m1.png"][1]
    assert len(set(buckets.values())) >= 3
    for e in data.images:
        assert max(crop_after_resize(e.size, e.bucket)[1]) < 32
    for epoch in range(3):
        plan = data.epoch_batches(epoch)
        assert sorted(s for b in plan for s in b) == list(range(len(data)))
        for batch in plan:
            assert len({data.example(epoch, s).bucket for s in batch}) == 1
            shapes = {tuple(data.pixels(epoch, s).shape) for s in batch}
            assert len(shapes) == 1
    assert data.epoch_batches(0) != data.epoch_batches(1)


def test_without_buckets_every_image_is_a_square_crop(tmp_path: Path) -> None:
    config = tiny_config(_mixed(tmp_path / "d"), tmp_path / "o", **{"data.buckets": False})
    data = TrainingSet.from_config(config)
    assert {e.bucket for e in data.images} == {(64, 64)}


def test_no_upscale_option_reaches_the_training_set(tmp_path: Path) -> None:
    draw_image(tmp_path / "d" / "small.png", (100, 70))
    opts = {"data.resolution": 128, "data.bucket_step": 32}
    big = TrainingSet.from_config(tiny_config(tmp_path / "d", tmp_path / "o", **opts)).images[0].bucket
    small = TrainingSet.from_config(
        tiny_config(tmp_path / "d", tmp_path / "o", **opts, **{"data.bucket_no_upscale": True})).images[0]
    assert big[0] > 100 and small.bucket == (96, 64)
    assert tuple(TrainingSet.from_config(tiny_config(tmp_path / "d", tmp_path / "o", **opts)).pixels(0, 0).shape) \
        == (3, big[1], big[0])
