"""Bulk caption edits: find/replace with a preview, tag edits, tag frequency, undo, metadata.jsonl, CLI."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from conftest import draw_image, run_cli
from stylelora.core.errors import DataError
from stylelora.data import caption_tools as tools

CAPTIONS = {
    "a.png": "zxc style, a red boat, Blue_Sky",
    "b.png": "zxc style, a cat, blue sky, grass",
    "sub/10_things/c.png": "a boat on the sea, red boat",
    "d.png": "",
}


def dataset(folder: Path) -> Path:
    for i, (name, caption) in enumerate(CAPTIONS.items()):
        draw_image(folder / name, (24, 24), seed=i)
        if caption:
            (folder / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def texts(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.txt"))
            if ".stylelora" not in p.parts}


def test_find_replace_previews_then_writes_and_undo_puts_it_back(tmp_path: Path) -> None:
    folder = dataset(tmp_path / "d")
    before = texts(folder)
    changes = tools.find_replace(folder, "red boat", "green ship")
    assert [(c.image.relative_to(folder).as_posix(), c.after) for c in changes] == [
        ("a.png", "zxc style, a green ship, Blue_Sky"),
        ("sub/10_things/c.png", "a boat on the sea, green ship"),
    ]
    preview = tools.preview_text(changes, folder)
    assert "  - zxc style, a red boat, Blue_Sky\n  + zxc style, a green ship, Blue_Sky" in preview
    assert preview.endswith("2 caption(s) change")
    assert texts(folder) == before  # planning is the preview: nothing written yet
    tools.apply_changes(folder, changes, "replace red boat")
    assert (folder / "sub/10_things/c.txt").read_text() == "a boat on the sea, green ship\n"
    assert tools.undo_history(folder) == ["replace red boat"]
    assert tools.undo_last(folder) == ("replace red boat", 2)
    assert texts(folder) == before
    with pytest.raises(DataError, match="no caption edit to undo"):
        tools.undo_last(folder)


def test_captions_saved_on_windows_are_edited_and_undo_gives_back_their_exact_bytes(tmp_path: Path) -> None:
    """Captions from Windows tools: cp1252 (not UTF-8), UTF-16 with a byte-order mark, CRLF endings."""
    folder = dataset(tmp_path / "d")
    (folder / "a.txt").write_bytes("zxc style, a red boat, café\r\n".encode("cp1252"))
    (folder / "b.txt").write_bytes("zxc style, a red boat\r\n".encode("utf-16"))
    before = texts(folder)
    changes = tools.find_replace(folder, "red boat", "green ship")
    assert {c.image.name: c.after for c in changes if c.image.name != "c.png"} == {
        "a.png": "zxc style, a green ship, café", "b.png": "zxc style, a green ship"}
    tools.apply_changes(folder, changes, "replace red boat")  # crashed: the undo record could not hold cp1252
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zxc style, a green ship, café\n"
    assert tools.undo_last(folder) == ("replace red boat", 3)
    assert texts(folder) == before


def test_regex_replace_and_a_bad_pattern(tmp_path: Path) -> None:
    folder = dataset(tmp_path / "d")
    changes = tools.find_replace(folder, r"^zxc style, (\w+) ", r"\1 ", regex=True)
    assert [c.after for c in changes] == ["a red boat, Blue_Sky", "a cat, blue sky, grass"]
    assert tools.find_replace(folder, "a.c", "x") == []  # plain text: the dot is a dot
    with pytest.raises(DataError, match=r"not a valid regular expression .*untick"):
        tools.find_replace(folder, "(unclosed", "x", regex=True)


def test_tag_edits_and_frequency(tmp_path: Path) -> None:
    folder = dataset(tmp_path / "d")
    assert tools.tag_frequency(folder) == [("Blue_Sky", 2), ("zxc style", 2), ("a boat on the sea", 1),
                                           ("a cat", 1), ("a red boat", 1), ("grass", 1), ("red boat", 1)]
    removed = tools.remove_tag(folder, "blue sky")  # case and underscores do not matter
    assert [c.after for c in removed] == ["zxc style, a red boat", "zxc style, a cat, grass"]
    merged = tools.replace_tag(folder, "a red boat", "red boat")
    assert [c.after for c in merged] == ["zxc style, red boat, Blue_Sky"]
    tools.apply_changes(folder, tools.replace_tag(folder, "zxc style", "grass"), "tag")
    assert (folder / "b.txt").read_text() == "grass, a cat, blue sky\n"  # no tag twice


def test_edits_on_a_metadata_jsonl_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    for name in ("a.png", "b.png"):
        draw_image(folder / name, (24, 24))
    rows = [{"file_name": "a.png", "text": "a red boat", "extra": 1}, {"file_name": "b.png", "text": "a cat"}]
    meta = folder / "metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    before = meta.read_bytes()
    tools.apply_changes(folder, tools.find_replace(folder, "red", "blue"), "jsonl")
    written = [json.loads(line) for line in meta.read_text().splitlines()]
    assert written == [{"file_name": "a.png", "text": "a blue boat", "extra": 1},
                       {"file_name": "b.png", "text": "a cat"}]
    assert not list(folder.glob("*.txt"))
    tools.undo_last(folder)
    assert meta.read_bytes() == before


def test_a_bulk_edit_failing_half_way_keeps_every_file_whole_and_undoable(tmp_path: Path, monkeypatch) -> None:
    from test_atomic import FailingWrites

    folder = dataset(tmp_path / "d")
    before = texts(folder)
    changes = tools.find_replace(folder, "boat", "ship")
    failing = FailingWrites(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), fail_at=3)  # record, a, c
    with pytest.raises(Exception, match="disk is full"):
        tools.apply_changes(folder, changes, "boats")
    assert failing.failed_on is not None
    monkeypatch.undo()
    now = texts(folder)
    assert now["a.txt"] == b"zxc style, a red ship, Blue_Sky\n"  # written before the failure
    assert now["sub/10_things/c.txt"] == before["sub/10_things/c.txt"]  # not half-written
    assert not [p for p in folder.rglob("*.tmp")]
    tools.undo_last(folder)
    assert texts(folder) == before


def test_captions_cli(tmp_path: Path) -> None:
    folder = dataset(tmp_path / "d")
    before = texts(folder)
    dry = run_cli("captions", "replace", str(folder), "boat", "ship", "--dry-run")
    assert dry.returncode == 0 and "+ a ship on the sea, red ship" in dry.stdout and texts(folder) == before
    assert run_cli("captions", "remove-tag", str(folder), "BLUE SKY").returncode == 0
    assert (folder / "b.txt").read_text() == "zxc style, a cat, grass\n"
    tags = run_cli("captions", "tags", str(folder), "--top", "1")
    assert tags.stdout.split() == ["2", "zxc", "style"]
    undo = run_cli("captions", "undo", str(folder))
    assert undo.returncode == 0 and "remove tag 'BLUE SKY'" in undo.stdout and texts(folder) == before
    nothing = run_cli("captions", "undo", str(folder))
    assert nothing.returncode == 1 and "no caption edit to undo" in nothing.stderr
    bad = run_cli("captions", "replace", str(folder), "(", "x", "--regex")
    assert bad.returncode == 1 and "not a valid regular expression" in bad.stderr
