import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import draw_image, make_dataset
from stylelora.core.config import DataConfig
from stylelora.core.errors import DataError
from stylelora.data.dataset import CaptionedImages, load_image, scan


def test_sidecar_captions_are_read_and_cleaned(tmp_path: Path) -> None:
    draw_image(tmp_path / "a.png")
    draw_image(tmp_path / "sub" / "b.jpg")
    (tmp_path / "a.txt").write_bytes("\ufeffred  square,\r\nflat style\r\n".encode())
    (tmp_path / "sub" / "b.txt").write_text("blue square")
    draw_image(tmp_path / ".hidden" / "c.png")
    items = scan(tmp_path)
    assert [(i.image.name, i.caption) for i in items] == [("a.png", "red square, flat style"), ("b.jpg", "blue square")]


def test_training_warns_of_a_guessed_caption_encoding_only_as_the_dataset_check_does(tmp_path: Path, caplog) -> None:
    """A cp1252 caption is a guess (accents may be wrong): a warning. UTF-16 with its mark is read exactly: the
    dataset check calls it a note, and the run, which counts the check's warnings, must not warn of it either."""
    from stylelora.data.doctor import check_dataset

    for seed, (name, raw) in enumerate((("cp.png", "café style".encode("cp1252")),
                                        ("wide.png", "flat style".encode("utf-16")))):
        draw_image(tmp_path / name, seed=seed)
        (tmp_path / name).with_suffix(".txt").write_bytes(raw)
    with caplog.at_level("WARNING", logger="stylelora"):
        items = scan(tmp_path)
    assert [i.caption for i in items] == ["café style", "flat style"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "cp.txt: text is not UTF-8" in warned[0]
    levels = {(f.path.name, f.level) for f in check_dataset(tmp_path, 64, 1).findings if "UTF" in f.problem}
    assert levels == {("cp.png", "warning"), ("wide.png", "info")}


def test_metadata_jsonl_layout(tmp_path: Path) -> None:
    draw_image(tmp_path / "x.png")
    draw_image(tmp_path / "y.png")
    rows = [{"file_name": "x.png", "text": "first"}, {"file_name": "y.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert [(i.image.name, i.caption) for i in scan(tmp_path)] == [("x.png", "first"), ("y.png", "second")]


def test_metadata_jsonl_errors_name_line_and_file(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "t"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:1: image 'missing.png' does not exist"):
        scan(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "../etc/passwd", "text": "t"}\n')
    with pytest.raises(DataError, match="outside the dataset folder"):
        scan(tmp_path)


def test_missing_or_empty_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        scan(tmp_path / "nope")
    with pytest.raises(DataError, match="no images found"):
        scan(tmp_path)


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_alpha_becomes_white_and_16_bit_is_scaled(tmp_path: Path) -> None:
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png").getpixel((0, 0)) == (255, 255, 255)


def test_examples_have_resolution_trigger_and_repeats(tmp_path: Path) -> None:
    make_dataset(tmp_path, n=3, size=(120, 64))
    data = CaptionedImages.from_config(DataConfig(path=str(tmp_path), resolution=64, trigger_word="zxc", repeats=2))
    assert len(data) == 6
    ex = data.example(0, seed=1, epoch=0)
    assert ex["pixels"].shape == (3, 64, 64)
    assert -1.0 <= float(ex["pixels"].min()) and float(ex["pixels"].max()) <= 1.0
    assert ex["caption"] == "zxc, a picture number 0, flat style"


def test_random_flip_and_crop_are_seeded(tmp_path: Path) -> None:
    make_dataset(tmp_path, n=1, size=(128, 64))
    config = DataConfig(path=str(tmp_path), resolution=64, center_crop=False, random_flip=True)
    data = CaptionedImages.from_config(config)
    views = [data.example(0, seed=3, epoch=e)["pixels"] for e in range(8)]
    assert torch.equal(views[0], data.example(0, seed=3, epoch=0)["pixels"])
    assert len({v.sum().item() for v in views}) > 1  # different epochs crop or flip differently


def test_upper_case_caption_files_from_windows_are_read(tmp_path: Path) -> None:
    """A set made on Windows names its captions IMG_01.TXT; Linux is case-sensitive, the captions still count."""
    from stylelora.data.doctor import check_dataset

    draw_image(tmp_path / "IMG_01.JPEG")
    (tmp_path / "IMG_01.TXT").write_text("red square")
    draw_image(tmp_path / "b.png", seed=5)
    (tmp_path / "b.Txt").write_text("blue square")
    assert [(i.image.name, i.caption) for i in scan(tmp_path)] == [("IMG_01.JPEG", "red square"),
                                                                   ("b.png", "blue square")]
    report = check_dataset(tmp_path, resolution=64)
    problems = [f"{f.path.name}: {f.problem}" for f in report.findings]
    assert not [p for p in problems if "caption" in p], problems
