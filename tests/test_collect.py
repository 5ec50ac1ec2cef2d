"""stylelora.collect: uploads land inside the dataset under safe names; bad files are refused with a reason."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import draw_image
from stylelora.core.errors import DataError
from stylelora.data.dataset import scan
from stylelora.services import collect


def _files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def _png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), seed * 40, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("../../x.png", "x.png"), ("..\\..\\evil.PNG", "evil.png"), ("/etc/passwd", "passwd"),
     (".hidden.png", "hidden.png"), ("a b<c>.jpg", "a b_c_.jpg"), ("..", "file"), ("", "file")],
)
def test_safe_filename_drops_folders_and_dots(name: str, expected: str) -> None:
    assert collect.safe_filename(name) == expected


def test_dataset_names_cannot_be_paths(tmp_path: Path) -> None:
    for bad in ["../x", "/etc", "a/b", ".hidden", "", "x" * 65]:
        with pytest.raises(DataError, match="dataset name"):
            collect.create_dataset(tmp_path, bad)
    assert collect.create_dataset(tmp_path, "my-style") == (tmp_path / "my-style").resolve()
    assert collect.list_datasets(tmp_path) == ["my-style"]


def test_upload_named_with_dot_dot_stays_inside(tmp_path: Path) -> None:
    folder = tmp_path / "root" / "datasets" / "d"
    upload = draw_image(tmp_path / "upload" / "img.png")
    other = draw_image(tmp_path / "upload" / "other.png", seed=1)
    report = collect.add_files(folder, [(upload, "../../x.png"), (other, "/tmp/abs.png")])
    assert report.refused == []
    assert _files_under(tmp_path / "root") == {"datasets/d/x.png", "datasets/d/abs.png"}


def test_zip_with_escaping_entries_writes_only_inside(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../escaped.png", _png_bytes(1))
        z.writestr("/abs/rooted.png", _png_bytes(2))
        z.writestr("sub/dir/nested.png", _png_bytes(3))
        z.writestr("sub/dir/nested.txt", "a caption, flat style")
        z.writestr("__MACOSX/._nested.png", b"junk")
        z.writestr("notes.exe", b"MZ...")
    folder = tmp_path / "root" / "datasets" / "d"
    report = collect.add_files(folder, [(archive, "evil.zip")])
    assert _files_under(tmp_path / "root") == {
        "datasets/d/escaped.png", "datasets/d/rooted.png", "datasets/d/nested.png", "datasets/d/nested.txt"}
    assert any("notes.exe" in r and "not an image" in r for r in report.refused)
    assert [(p.name, c) for p, c in collect.images(folder)][1] == ("nested.png", "a caption, flat style")
    assert len(scan(folder)) == 3


def test_zip_bomb_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.png", b"\0" * (20 * 1024**2))  # 20 MiB of zeros deflate to ~20 KiB
    folder = tmp_path / "d"
    report = collect.add_files(folder, [(archive, "bomb.zip")])
    assert report.added == []
    assert "zip bomb" in report.refused[0]
    assert _files_under(folder) == set()


def test_non_images_and_broken_images_are_refused_with_a_reason(tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"this is not a png")
    script = tmp_path / "run.sh"
    script.write_text("rm -rf /")
    folder = tmp_path / "d"
    report = collect.add_files(folder, [(fake, "fake.png"), (script, "run.sh"), (tmp_path / "gone.png", "gone.png")])
    assert report.added == []
    refused = sorted(report.refused)
    assert "fake.png: not a readable image" in refused[0]
    assert "gone.png: the upload is missing" in refused[1]
    assert "run.sh: not an image or caption" in refused[2]
    assert "added 0 file(s)" in report.to_text()


def test_same_name_uploads_do_not_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    a = draw_image(tmp_path / "a.png", seed=1)
    b = draw_image(tmp_path / "b.png", seed=2)
    collect.add_files(folder, [(a, "pic.png"), (b, "pic.png")])
    assert sorted(p.name for p in folder.iterdir()) == ["pic-2.png", "pic.png"]
    assert (folder / "pic.png").read_bytes() == a.read_bytes()


def test_caption_edit_and_trigger_word(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    for i in range(3):
        draw_image(folder / f"img{i}.png", seed=i)
    (folder / "img0.txt").write_text("a red house\n")
    collect.save_caption(folder, "img1.png", "  a  blue\nboat ")
    assert (folder / "img1.txt").read_text() == "a blue boat\n"
    assert collect.add_trigger_word(folder, "zzstyle") == 3
    assert collect.add_trigger_word(folder, "zzstyle") == 0  # already there: unchanged
    assert [c for _, c in collect.images(folder)] == ["zzstyle, a red house", "zzstyle, a blue boat", "zzstyle"]
    assert [i.caption for i in scan(folder)] == ["zzstyle, a red house", "zzstyle, a blue boat", "zzstyle"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
    with pytest.raises(DataError, match="no such image"):
        collect.save_caption(folder, "../../etc/passwd", "x")
    with pytest.raises(DataError, match="trigger word: empty"):
        collect.add_trigger_word(folder, "  ")


def test_caption_edit_in_a_metadata_jsonl_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    draw_image(folder / "a.png")
    draw_image(folder / "b.png", seed=1)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "old"}) + "\n")
    collect.save_caption(folder, "a.png", "new caption")
    collect.save_caption(folder, "b.png", "second")
    assert [(i.image.name, i.caption) for i in scan(folder)] == [("a.png", "new caption"), ("b.png", "second")]
    assert not (folder / "a.txt").exists()


def _selection(tmp_path: Path) -> list[tuple[Path, str]]:
    """What a file picker hands over: three images and their captions."""
    files = []
    for i, name in enumerate(["astronaut", "camera", "coffee"]):
        files.append((draw_image(tmp_path / "pick" / f"{name}.png", seed=i), f"{name}.png"))
        caption = tmp_path / "pick" / f"{name}.txt"
        caption.write_text(f"a {name}, flat style\n")
        files.append((caption, f"{name}.txt"))
    return files


def test_the_same_selection_added_twice_adds_nothing_and_keeps_every_caption(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    selection = _selection(tmp_path)
    first = collect.add_files(folder, selection)
    assert first.to_text().startswith("added 6 file(s): 3 image(s), 3 caption(s)")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    second = collect.add_files(folder, selection)
    assert second.added == [] and second.refused == []
    assert second.already_there == ["astronaut.png", "camera.png", "coffee.png"]
    assert "already in the dataset, not added again: astronaut.png, camera.png, coffee.png" in second.to_text()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no astronaut-2.png, no rewritten .txt
    assert [c for _, c in collect.images(folder)] == ["a astronaut, flat style", "a camera, flat style",
                                                      "a coffee, flat style"]
    # the same bytes under another name are recognised too, and said so
    again = collect.add_files(folder, [(selection[0][0], "copy of astronaut.png")])
    assert again.already_there == ["copy of astronaut.png (same bytes as astronaut.png)"] and again.added == []


def test_an_upload_never_replaces_a_caption_silently(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    selection = _selection(tmp_path)
    collect.add_files(folder, selection)
    collect.save_caption(folder, "camera.png", "an edited caption")
    report = collect.add_files(folder, selection)  # the old camera.txt comes again
    assert report.captions_kept == ["camera.png"] and report.added == []
    assert "kept the caption of camera.png: the uploaded caption differs" in report.to_text()
    assert collect.caption_of(folder, "camera.png") == "an edited caption"
    replaced = collect.add_files(folder, selection, replace_captions=True)
    assert replaced.captions_replaced == ["camera.png"]
    assert "replaced the caption of camera.png with the uploaded one" in replaced.to_text()
    assert collect.caption_of(folder, "camera.png") == "a camera, flat style"


def test_a_caption_follows_its_renamed_image(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    collect.add_files(folder, _selection(tmp_path))
    other = draw_image(tmp_path / "new" / "camera.png", seed=9)  # another picture with a taken name
    caption = tmp_path / "new" / "camera.txt"
    caption.write_text("another camera")
    report = collect.add_files(folder, [(caption, "camera.txt"), (other, "camera.png")])  # caption first
    assert [p.name for p in report.added] == ["camera-2.png", "camera-2.txt"]
    assert collect.caption_of(folder, "camera.png") == "a camera, flat style"
    assert collect.caption_of(folder, "camera-2.png") == "another camera"


def test_a_caption_edit_is_refused_when_the_caption_changed_since_it_was_shown(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    collect.add_files(folder, _selection(tmp_path))
    shown = collect.caption_of(folder, "camera.png")
    collect.add_trigger_word(folder, "zzstyle")  # the caption changes under the editor
    with pytest.raises(DataError, match=r"camera.png in dataset 'd': its caption changed since it was shown "
                                        r"\(it is now 'zzstyle, a camera, flat style'\); nothing was saved"):
        collect.save_caption(folder, "camera.png", shown + " edited", shown=shown)
    assert collect.caption_of(folder, "camera.png") == "zzstyle, a camera, flat style"
    collect.save_caption(folder, "camera.png", "zzstyle, edited", shown="zzstyle, a camera, flat style")
    assert collect.caption_of(folder, "camera.png") == "zzstyle, edited"


def test_a_caption_uploaded_without_its_image_says_it_has_none(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    (tmp_path / "ghost.txt").write_text("a ghost, flat style\n")
    image = draw_image(tmp_path / "real.png", seed=3)
    (tmp_path / "real.txt").write_text("a real one\n")
    report = collect.add_files(folder, [(tmp_path / "ghost.txt", "ghost.txt"), (image, "real.png"),
                                        (tmp_path / "real.txt", "real.txt")])
    text = report.to_text()
    assert report.captions_alone == ["ghost.txt"]
    assert "no image for ghost.txt in the dataset" in text and "real" not in text.split("\n", 1)[1]
    report = collect.add_files(folder, [(draw_image(tmp_path / "ghost.png", seed=4), "ghost.png")])
    assert report.captions_alone == [] and "no image" not in report.to_text()  # its image came: nothing to say
    assert dict((p.name, c) for p, c in collect.images(folder))["ghost.png"] == "a ghost, flat style"


def test_an_edit_is_kept_when_the_editor_moves_on_and_kohya_folders_show_their_images(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    draw_image(folder / "3_zqx style" / "a.png", seed=1)
    (folder / "3_zqx style" / "a.txt").write_text("zqx style, a\n")
    draw_image(folder / ".hidden" / "b.png", seed=2)
    assert [(collect.relative_name(folder, p), c) for p, c in collect.images(folder)] == [
        ("3_zqx style/a.png", "zqx style, a")]  # as training reads the folder: repeats folders, no hidden ones
    assert collect.save_if_edited(folder, "3_zqx style/a.png", " zqx style,  a ", "zqx style, a") is None
    assert collect.save_if_edited(folder, "3_zqx style/a.png", "zqx style, an edit", "zqx style, a") is not None
    assert collect.caption_of(folder, "3_zqx style/a.png") == "zqx style, an edit"
    with pytest.raises(DataError, match="its caption changed since it was shown"):  # never over another's edit
        collect.save_if_edited(folder, "3_zqx style/a.png", "mine", "zqx style, a")
    draw_image(tmp_path / "outside.png", seed=5)
    for name in ["../outside.png", ".hidden/b.png", "3_zqx style"]:
        with pytest.raises(DataError, match="no such image"):
            collect.save_caption(folder, name, "x")
