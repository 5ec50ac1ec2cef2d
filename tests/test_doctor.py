"""The dataset doctor on a corpus of broken and odd files built here: what it says, what training uses."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import draw_image, make_dataset, run_cli, tiny_config
from stylelora.core import events
from stylelora.core.errors import DataError
from stylelora.data.doctor import check_dataset

RES = 64


def folder_fingerprint(root: Path) -> str:
    """Names, contents, link targets and modification times of everything under ``root``."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        h.update(f"{path.relative_to(root)}|{st.st_mode}|{st.st_mtime_ns}|{st.st_size}".encode())
        if path.is_symlink():
            h.update(str(os.readlink(path)).encode())
        elif path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb() -> bytes:
    """A valid-looking PNG header that declares 100000 x 100000 pixels (10 gigapixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def caption(folder: Path, stem: str, text: str | bytes) -> None:
    path = folder / f"{stem}.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def build_corpus(d: Path) -> tuple[set[str], set[str]]:
    """Write a dataset with every kind of problem; returns (good image names, unusable image names)."""
    d.mkdir(parents=True)
    good, bad = set(), set()

    def ok(name: str, text: str | bytes | None = "a flat style picture") -> Path:
        good.add(name)
        if text is not None:
            caption(d, Path(name).stem, text)
        return d / name

    # --- usable, maybe converted ---
    draw_image(ok("plain.png"), (96, 80), seed=1)
    draw_image(ok("photo.jpg"), (96, 80), seed=2)
    draw_image(ok("cmyk.jpg"), (96, 80), seed=3, mode="CMYK")
    Image.fromarray(np.full((80, 96), 40000, dtype=np.uint16)).save(ok("grey16.png"))
    draw_image(ok("palette.png"), (96, 80), seed=4, mode="P")
    im = Image.new("P", (96, 80), 1)
    im.paste(0, (0, 0, 48, 80))  # index 0, the transparent one, on the left half
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.info["transparency"] = 0
    im.save(ok("palette_transparent.png"), transparency=0)
    rgba = np.zeros((80, 96, 4), dtype=np.uint8)
    rgba[..., 0], rgba[20:60, 20:60, 3] = 200, 255
    Image.fromarray(rgba).save(ok("alpha.png"))
    frames = [Image.new("RGB", (96, 80), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    frames[0].save(ok("animated.gif"), save_all=True, append_images=frames[1:], duration=100)
    pages = [Image.new("RGB", (96, 80), c) for c in ((0, 120, 250), (250, 250, 0))]
    pages[0].save(ok("pages.tif"), save_all=True, append_images=pages[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    noise((120, 72), 5).save(ok("rotated.jpg"), exif=exif)
    draw_image(ok("grey.png"), (96, 80), seed=6, mode="L")
    draw_image(ok("no_caption.png", None), (96, 80), seed=7)
    draw_image(ok("empty_caption.png", ""), (96, 80), seed=8)
    draw_image(ok("latin1.png", "caf\xe9 style, cr\xe8me".encode("cp1252")), (96, 80), seed=9)
    draw_image(ok("utf16.png", "\ufeffpastel style".encode("utf-16-le")), (96, 80), seed=10)
    draw_image(ok("bom_crlf.png", b"\xef\xbb\xbfline one\r\nline two\r\n"), (96, 80), seed=11)
    draw_image(ok("long_caption.png", "a very detailed caption " * 8), (96, 80), seed=12)
    draw_image(ok("small.png"), (40, 36), seed=13)
    draw_image(ok("wide.png"), (200, 64), seed=14)
    Image.open(d / "plain.png").convert("RGB").resize((150, 125)).save(ok("plain_resized.jpg"), quality=70)
    (d / "sub.png").mkdir()  # a folder named like an image; what is inside still counts
    draw_image(ok("sub.png/inside.png"), (96, 80), seed=15)
    caption(d / "sub.png", "inside", "inside a folder")

    # --- unusable ---
    def nope(name: str, data: bytes) -> None:
        bad.add(name)
        (d / name).write_bytes(data)
        caption(d, Path(name).stem, "a caption for a broken file")

    nope("zero.png", b"")
    nope("text.png", b"this is not a picture, just some text\n")
    png = encoded(noise((64, 64), 20), "PNG")
    nope("truncated.png", png[: int(len(png) * 0.6)])
    jpg = encoded(noise((64, 64), 21), "JPEG", quality=90)
    nope("truncated.jpg", jpg[: len(jpg) // 2])
    nope("garbage.jpg", b"\xff\xd8\xff\xe0" + np.random.default_rng(22).bytes(400))
    nope("bomb.png", png_bomb())
    nope("tiny.png", encoded(noise((8, 8), 23), "PNG"))
    nope("strip.png", encoded(noise((330, 30), 24), "PNG"))
    nope("plain_copy.png", (d / "plain.png").read_bytes())
    nope("photo.heic", b"\0\0\0\x18ftypheic" + bytes(64))
    bad.add("dangling.png")
    (d / "dangling.png").symlink_to(d / "gone.png")

    # --- ignored, with a note ---
    caption(d, "orphan", "a caption whose image was deleted")
    caption(d, "README", "how this dataset was made")
    draw_image(d / ".hidden.png", (96, 80), seed=30)
    draw_image(d / "._plain.png", (96, 80), seed=31)  # macOS resource-fork litter
    draw_image(d / ".thumbnails" / "t.png", (96, 80), seed=32)
    return good, bad


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, set[str], set[str]]:
    folder = tmp_path / "corpus"
    good, bad = build_corpus(folder)
    return folder, good, bad


def problems(report, name: str) -> str:
    return " | ".join(f"{f.problem} -> {f.action}" for f in report.findings if f.path.name == Path(name).name)


def test_corpus_every_unusable_file_is_named_and_every_good_file_used(corpus, monkeypatch) -> None:
    folder, good, bad = corpus
    assert len(good) + len(bad) >= 20
    before = folder_fingerprint(folder)
    report = check_dataset(folder, RES, batch_size=2, model="builtin:tiny")
    assert folder_fingerprint(folder) == before

    used = {str(p.relative_to(folder)) for p in report.usable}
    assert used == good
    for name in bad:
        found = [f for f in report.findings if f.path == folder / name]
        assert found and not any(f.usable for f in found), f"{name}: {found}"
    for f in report.findings:
        if str(f.path.relative_to(folder)) in good:
            assert f.usable, f
    assert report.can_train
    c = report.counts
    assert (c["images"], c["usable"], c["skipped"]) == (len(good) + len(bad), len(good), len(bad))

    said = {name: problems(report, name) for name in [*good, *bad]}
    assert "empty (0 bytes)" in said["zero.png"]
    assert "not an image" in said["text.png"]
    assert "cut short" in said["truncated.png"] and "cut short" in said["truncated.jpg"]
    assert "corrupt" in said["garbage.jpg"] or "cut short" in said["garbage.jpg"]
    assert "10000 MP" in said["bomb.png"] and "decompression bombs" in said["bomb.png"]
    assert "too small: 8x8" in said["tiny.png"] and "skipped" in said["tiny.png"]
    assert "aspect ratio" in said["strip.png"]
    assert "exact duplicate of plain.png" in said["plain_copy.png"]
    assert "not supported" in said["photo.heic"]
    assert "broken link" in said["dangling.png"]
    assert "CMYK" in said["cmyk.jpg"]
    assert "16-bit" in said["grey16.png"]
    assert "palette" in said["palette.png"]
    assert "transparency" in said["alpha.png"] and "white" in said["alpha.png"]
    assert "transparency" in said["palette_transparent.png"]
    assert "animated (3 frames)" in said["animated.gif"] and "first frame" in said["animated.gif"]
    assert "EXIF orientation 6" in said["rotated.jpg"]
    assert "multi-page TIFF (2 pages): the first page is used" in said["pages.tif"]
    assert "no caption" in said["no_caption.png"]
    assert "empty" in said["empty_caption.png"]
    assert "not UTF-8" in said["latin1.png"] and "cp1252" in said["latin1.png"]
    assert "UTF-16" in said["utf16.png"]
    assert "byte-order mark" in said["bom_crlf.png"] and "CRLF" in said["bom_crlf.png"]
    assert "tokens" in said["long_caption.png"] and "cut off" in said["long_caption.png"]
    assert "enlarged" in said["small.png"]
    assert "middle 32%" in said["wide.png"]
    assert "near duplicate of plain.png" in said["plain_resized.jpg"]
    assert "named like an image" in problems(report, "sub.png")
    assert "caption without an image" in problems(report, "orphan.txt")
    assert "not a caption" in problems(report, "README.txt")
    assert "hidden file" in problems(report, ".hidden.png") and "hidden file" in problems(report, "._plain.png")
    assert "hidden folder (1 image inside)" in problems(report, ".thumbnails")
    # near duplicates and different-looking pictures: only the real copy is flagged
    assert sum("near duplicate" in f.problem for f in report.findings) == 1


def test_check_data_cli_names_each_unusable_file_and_exits_0(corpus) -> None:
    folder, good, bad = corpus
    before = folder_fingerprint(folder)
    r = run_cli("check-data", str(folder), "--resolution", str(RES), "--batch-size", "2", "--model", "builtin:tiny")
    assert r.returncode == 0, r.stderr
    assert folder_fingerprint(folder) == before
    lines = r.stdout.splitlines()
    for name in bad:
        at = lines.index(name)  # the file's own heading, then its findings indented under it
        assert lines[at + 1].startswith("  error:") or lines[at + 1].startswith("  warning:"), lines[at + 1]
        assert "skipped" in lines[at + 1]
    summary = f"{len(good) + len(bad)} images found, {len(good)} usable, {len(bad)} skipped"
    assert summary in r.stdout and f"training can proceed with {len(good)} images" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_training_uses_exactly_the_usable_images_and_never_writes_the_dataset(corpus, tmp_path, monkeypatch) -> None:
    import stylelora.data.dataset as dataset
    from stylelora.training.loop import train

    folder, good, bad = corpus
    before = folder_fingerprint(folder)
    loaded: list[Path] = []
    real = dataset.load_image
    monkeypatch.setattr(dataset, "load_image", lambda path, notes=None: loaded.append(path) or real(path, notes))
    messages: list[str] = []
    out = tmp_path / "run"
    config = tiny_config(folder, out, **{"train.steps": 1, "train.batch_size": len(good)})
    train(config, lambda e: messages.append(e.text) if isinstance(e, events.Message) else None)

    assert {str(p.relative_to(folder)) for p in loaded} == good  # one batch holds every usable image
    skipped = [m for m in messages if m.startswith("skipped ")]
    assert sorted(m.split(":")[0].removeprefix("skipped ") for m in skipped) == sorted(bad)
    assert any("warnings about the dataset" in m for m in messages)
    from safetensors import safe_open

    with safe_open(str(out / "run.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == str(len(good))
    assert folder_fingerprint(folder) == before


def test_caption_length_is_counted_with_the_models_tokenizer_or_estimated(tmp_path: Path, monkeypatch) -> None:
    make_dataset(tmp_path, n=1)
    (tmp_path / "img0.txt").write_text("x" * 100)
    report = check_dataset(tmp_path, RES, model="builtin:tiny")  # a character-level tokenizer
    (f,) = [f for f in report.findings if "tokens" in f.problem]
    assert "102 tokens" in f.problem and f'"{"x" * 25}"' in f.action  # 75 of the 100 are kept
    assert "builtin:tiny" in report.to_text()

    import stylelora.families

    monkeypatch.setattr(stylelora.families, "load_tokenizer", lambda name: None)
    (tmp_path / "img0.txt").write_text(" ".join(f"word{i}" for i in range(60)) + ", the last words")
    report = check_dataset(tmp_path, RES)
    (f,) = [f for f in report.findings if "tokens" in f.problem]
    assert "estimated" in f.problem and "the last words" in f.action
    assert "an estimate" in report.to_text()
    (tmp_path / "img0.txt").write_text("short and sweet")
    assert not [f for f in check_dataset(tmp_path, RES).findings if "tokens" in f.problem]


def test_dataset_smaller_than_one_batch_cannot_train(tmp_path: Path, capsys) -> None:
    from stylelora.cli import main

    make_dataset(tmp_path / "d", n=2)
    report = check_dataset(tmp_path / "d", RES, batch_size=4)
    assert not report.can_train and "cannot fill one batch of 4" in report.to_text()
    assert check_dataset(tmp_path / "d", RES, batch_size=4, repeats=2).can_train
    assert main(["check-data", str(tmp_path / "d"), "--resolution", "64", "--batch-size", "4"]) == 1
    assert "lower the batch size to 2" in capsys.readouterr().out


def test_nothing_usable_stops_training_with_the_reasons(tmp_path: Path) -> None:
    from stylelora.training.loop import train

    d = tmp_path / "broken"
    d.mkdir()
    (d / "a.png").write_bytes(b"")
    (d / "b.jpg").write_text("not a jpeg")
    with pytest.raises(DataError) as e:
        train(tiny_config(d, tmp_path / "out"))
    text = str(e.value)
    assert "none of the 2 images can be used" in text and "a.png: the file is empty" in text
    assert "b.jpg: not an image" in text and "check-data" in text
    assert not (tmp_path / "out").exists()
    assert not check_dataset(tmp_path / "empty-does-not-exist").can_train


def test_metadata_jsonl_rows_without_images_are_reported_not_fatal(tmp_path: Path) -> None:
    draw_image(tmp_path / "x.png")
    draw_image(tmp_path / "unlisted.png", seed=3)
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "x.png", "text": "first"}\n{"file_name": "gone.png", "text": "t"}\nnot json\n')
    report = check_dataset(tmp_path, RES)
    text = report.to_text()
    assert "line 2: image 'gone.png' does not exist" in text and "line 3: expected a JSON object" in text
    assert "not listed in metadata.jsonl" in problems(report, "unlisted.png")
    assert [p.name for p in report.usable] == ["x.png"] and report.can_train


def test_loaded_pixels_follow_the_stated_conversions(corpus) -> None:
    from stylelora.data.dataset import load_image

    folder, _, _ = corpus
    assert load_image(folder / "animated.gif").getpixel((5, 5)) == (250, 0, 0)  # the first frame
    assert load_image(folder / "palette_transparent.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(folder / "alpha.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(folder / "alpha.png").getpixel((30, 30)) == (200, 0, 0)
    assert load_image(folder / "rotated.jpg").size == (72, 120)
    assert load_image(folder / "grey16.png").getpixel((0, 0)) == (155, 155, 155)


def test_check_data_level_filter_shows_only_serious_findings(corpus, capsys) -> None:
    from stylelora.cli import main

    folder, good, bad = corpus
    assert main(["check-data", str(folder), "--resolution", str(RES), "--level", "error"]) == 0
    out = capsys.readouterr().out
    assert "  error:" in out and "  warning:" not in out and "  info:" not in out
    assert all(f"\n{name}\n" in out for name in bad if name != "plain_copy.png")  # a duplicate is a warning
    assert f"{len(good)} usable" in out


def test_of_two_identical_images_the_captioned_one_is_trained(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    draw_image(folder / "astronaut.png", (64, 64), seed=3)
    (folder / "astronaut.txt").write_text("an astronaut, flat style\n")
    (folder / "astronaut-2.png").write_bytes((folder / "astronaut.png").read_bytes())  # sorts first, no caption
    draw_image(folder / "boat.png", (64, 64), seed=4)
    (folder / "boat.txt").write_text("a boat\n")
    report = check_dataset(folder, 64)
    assert sorted(p.name for p in report.usable) == ["astronaut.png", "boat.png"]
    said = {f.path.name: f.problem for f in report.findings}
    assert said["astronaut-2.png"] == "exact duplicate of astronaut.png (same bytes)"


def test_txt_captions_beside_a_metadata_jsonl_are_named_as_ignored(tmp_path: Path) -> None:
    """A kohya set (.txt captions) with a metadata.jsonl for some images: the .txt captions are not used, and
    the check says so by file rather than leaving the user to wonder where the captions went."""
    from stylelora.data.doctor import check_dataset

    draw_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red square from the txt")
    draw_image(tmp_path / "b.png", seed=3)
    (tmp_path / "b.txt").write_text("blue square")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "red square from the jsonl"}\n')
    report = check_dataset(tmp_path, resolution=64)
    found = {f.path.name: f"{f.problem} -> {f.action}" for f in report.findings}
    assert "b.txt is ignored" in found["b.png"] and "metadata.jsonl" in found["b.png"]
    assert "a.txt" in found["a.png"] and "metadata.jsonl" in found["a.png"]
