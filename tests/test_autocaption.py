"""Auto-captioning: every --mode, batching, the style-word filter, a WD14-style tagger, the offline message."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import draw_image, run_cli
from stylelora.core.errors import ConfigError, ModelError
from stylelora.data.autocaption import (
    STYLE_WORDS,
    CaptionSettings,
    caption_folder,
    filter_style,
    load_captioner,
    plan_captions,
)
from stylelora.data.caption_tools import read_captions, undo_last


@pytest.fixture(scope="module")
def tiny_blip():
    return load_captioner("builtin:tiny-blip")


def quick(**values: object) -> CaptionSettings:
    """Settings with short captions: the tiny captioner's words are random, so length adds nothing."""
    return CaptionSettings(**{"max_tokens": 16, **values})


def half_captioned(folder: Path, n: int = 5) -> Path:
    """``n`` pictures; the even ones have a caption, the odd ones none."""
    for i in range(n):
        draw_image(folder / f"img{i}.png", (48, 40), seed=i)
        if i % 2 == 0:
            (folder / f"img{i}.txt").write_text(f"my caption {i}\n", encoding="utf-8")
    return folder


def captions(folder: Path) -> dict[str, str]:
    return {e.image.name: e.caption for e in read_captions(folder)}


def test_every_mode_writes_what_it_says(tiny_blip, tmp_path: Path) -> None:
    base = half_captioned(tmp_path / "base")
    fresh = {c.image.name: c.after for c in plan_captions(base, tiny_blip, quick(mode="overwrite")).changes}
    assert len(fresh) == 5 and len(set(fresh.values())) > 2  # different pictures, different captions
    before = captions(base)
    for mode in ("missing", "overwrite", "prefix", "suffix"):
        folder = shutil.copytree(base, tmp_path / mode)
        report = caption_folder(folder, tiny_blip, quick(mode=mode))
        after = captions(folder)
        for name, old in before.items():
            new = fresh[name]
            expected = {"missing": old or new, "overwrite": new, "prefix": f"{new}, {old}" if old else new,
                        "suffix": f"{old}, {new}" if old else new}[mode]
            assert after[name] == expected, (mode, name)
        assert len(report.changes) == (2 if mode == "missing" else 5)
        assert report.unchanged == (3 if mode == "missing" else 0)
        assert not [p for p in folder.rglob("*.tmp")]  # atomic writes leave no temporary files
    # missing mode left the existing caption files byte for byte
    assert (tmp_path / "missing" / "img0.txt").read_bytes() == (base / "img0.txt").read_bytes()


def test_batching_gives_the_same_captions_and_reports_progress(tiny_blip, tmp_path: Path) -> None:
    folder = half_captioned(tmp_path / "d", n=7)
    calls: list[tuple[int, int]] = []
    one = plan_captions(folder, tiny_blip, quick(mode="overwrite", batch_size=1))
    three = plan_captions(folder, tiny_blip, quick(mode="overwrite", batch_size=3),
                          on_progress=lambda done, total: calls.append((done, total)))
    assert [(c.image, c.after) for c in three.changes] == [(c.image, c.after) for c in one.changes]
    assert calls == [(3, 7), (6, 7), (7, 7)]
    preview = plan_captions(folder, tiny_blip, quick(mode="overwrite"), limit=2)
    assert [c.after for c in preview.changes] == [c.after for c in one.changes[:2]]
    assert captions(folder)["img1.png"] == ""  # planning and previewing never write


def test_style_filter_on_sentences_and_tags() -> None:
    cases = {
        "a watercolor painting of a cat sitting on a bench": "a cat sitting on a bench",
        "an oil painting of an old man in a watercolor style": "an old man",
        "a lighthouse on a cliff, digital art": "a lighthouse on a cliff",
        "1girl, watercolor (medium), traditional media, flower, red hat": "1girl, flower, red hat",
        "a boat on the sea": "a boat on the sea",
    }
    for caption, expected in cases.items():
        assert filter_style(caption, STYLE_WORDS) == expected
    assert filter_style("a red boat, sketch", ["boat"]) == "sketch"  # the list is the user's to edit
    assert filter_style("a painting of a cat", []) == "a painting of a cat"


def test_style_filter_applies_to_what_the_captioner_writes(tiny_blip, tmp_path: Path) -> None:
    folder = half_captioned(tmp_path / "d", n=8)
    style = {"painting", "watercolor", "illustration", "sketch", "style"}  # in builtin:tiny-blip's vocabulary
    raw = plan_captions(folder, tiny_blip, quick(mode="overwrite", style_filter=False)).changes
    kept = plan_captions(folder, tiny_blip, quick(mode="overwrite")).changes
    assert any(style & set(c.after.split()) for c in raw)
    assert not any(style & set(c.after.split()) for c in kept)
    assert len(kept) == len(raw)
    only_cats = plan_captions(folder, tiny_blip, quick(mode="overwrite", style_words=["cat", "house"]))
    assert any("style" in c.after.split() for c in only_cats.changes)
    assert not any({"cat", "house"} & set(c.after.split()) for c in only_cats.changes)


def test_captioning_can_be_undone(tiny_blip, tmp_path: Path) -> None:
    folder = half_captioned(tmp_path / "d")
    before = {p.name: p.read_bytes() for p in folder.glob("*.txt")}
    caption_folder(folder, tiny_blip, quick(mode="overwrite"))
    assert {p.name for p in folder.glob("*.txt")} == {f"img{i}.txt" for i in range(5)}
    label, restored = undo_last(folder)
    assert "overwrite" in label and restored == 5
    assert {p.name: p.read_bytes() for p in folder.glob("*.txt")} == before  # created files removed again


def make_tagger(folder: Path, size: int = 16) -> Path:
    """A tiny WD14-style tagger in the SmilingWolf layout: model.onnx (NHWC BGR 0-255 in, sigmoid scores
    out) and selected_tags.csv. Scores: a rating (always high, never written), 'red theme' and 'blue
    theme' from the mean red and blue, a style tag that is always high, a character at 0.73, 1girl at 0.5."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    tags = [("general", 9), ("red_theme", 0), ("blue_theme", 0), ("watercolor_(medium)", 0), ("hatsune_miku", 4),
            ("1girl", 0)]
    weight = np.zeros((3, len(tags)), dtype=np.float32)
    weight[2, 1], weight[0, 2] = 10.0, 10.0  # BGR: channel 2 is red, 0 is blue
    bias = np.array([6.0, -5.0, -5.0, 6.0, 1.0, 0.0], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["mean", "scale"], ["unit"]),
        helper.make_node("MatMul", ["unit", "weight"], ["logits0"]),
        helper.make_node("Add", ["logits0", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_tagger",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(tags)])],
        [numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale"),
         numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows([i, name, category, 100] for i, (name, category) in enumerate(tags))
    return folder


def test_a_wd14_style_tagger_from_a_local_folder(tmp_path: Path) -> None:
    tagger = load_captioner(str(make_tagger(tmp_path / "tagger")))
    assert tagger.kind == "tags"
    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (30, 30), (255, 0, 0)).save(data / "red.png")
    Image.new("RGB", (30, 30), (0, 0, 255)).save(data / "blue.png")
    written = {c.image.name: c.after for c in caption_folder(data, tagger, quick()).changes}
    assert written == {"red.png": "red theme, 1girl", "blue.png": "blue theme, 1girl"}
    unfiltered = plan_captions(data, tagger, quick(mode="overwrite", style_filter=False,
                                                              character_threshold=0.7, threshold=0.6))
    assert {c.image.name: c.after for c in unfiltered.changes} == {
        "red.png": "hatsune miku, watercolor (medium), red theme",
        "blue.png": "hatsune miku, watercolor (medium), blue theme",
    }


def test_a_captioner_that_is_not_on_disk_says_where_to_get_it(tmp_path: Path) -> None:
    for name in ("someone/blip-captioner", "SmilingWolf/wd-some-tagger-v3"):
        with pytest.raises(ModelError) as raised:
            load_captioner(name)
        text = str(raised.value)
        assert text.startswith(f"captioner '{name}': could not be downloaded from the Hugging Face hub")
        assert "Download it where you have internet" in text and "--captioner /path/to/folder" in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither a transformers model"):
        load_captioner(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="batch_size: must be >= 1"):
        CaptionSettings(batch_size=0)


def test_the_short_names_kohya_users_type_name_the_usual_captioners(tmp_path: Path) -> None:
    for short, hub_id in (("wd14", "SmilingWolf/wd-swinv2-tagger-v3"),
                          ("BLIP", "Salesforce/blip-image-captioning-large")):
        with pytest.raises(ModelError, match=f"^captioner '{hub_id}': could not be downloaded"):
            load_captioner(short)
    with pytest.raises(ModelError) as raised:
        load_captioner("blipp")
    assert str(raised.value).endswith("or a short name: blip (Salesforce/blip-image-captioning-large), "
                                      "wd14 (SmilingWolf/wd-swinv2-tagger-v3)")


def test_the_hub_client_s_own_warnings_stay_out_of_the_terminal() -> None:
    """Without HF_HUB_OFFLINE, a hub id tried offline printed "warning: '[Errno -2] Name or service not known'
    thrown while requesting HEAD ..." above stylelora's own message: huggingface_hub sets its level on import."""
    import logging
    import subprocess
    import sys

    code = ("import logging; from stylelora.core.logs import quiet_libraries; quiet_libraries(); "
            "import huggingface_hub.file_download; print(logging.getLogger('huggingface_hub').getEffectiveLevel())")
    level = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(level) >= logging.ERROR


def test_caption_cli_modes_dry_run_and_offline_message(tmp_path: Path) -> None:
    folder = half_captioned(tmp_path / "d", n=3)
    before = {p.name: p.read_bytes() for p in folder.glob("*.txt")}
    dry = run_cli("caption", str(folder), "--captioner", "builtin:tiny-blip", "--mode", "overwrite", "--dry-run",
                  "--max-tokens", "8")
    assert dry.returncode == 0, dry.stderr
    assert "nothing was changed" in dry.stderr and dry.stdout.count("img") == 3
    assert {p.name: p.read_bytes() for p in folder.glob("*.txt")} == before
    r = run_cli("caption", str(folder), "--captioner", "builtin:tiny-blip", "--batch-size", "2", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "1 caption(s) written, 2 left as they were" in r.stderr
    assert {p.name: p.read_bytes() for p in folder.glob("img[02].txt")} == before  # never overwritten
    assert (folder / "img1.txt").read_text().strip()
    offline = run_cli("caption", str(folder), "--captioner", "someone/blip-captioner")
    assert offline.returncode == 1 and "Traceback" not in offline.stderr
    assert "captioner 'someone/blip-captioner': could not be downloaded" in offline.stderr
