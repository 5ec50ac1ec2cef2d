"""The app's panels for people coming from kohya_ss, scripted with gradio_client on builtin:tiny: caption
images (preview first, then write), bulk caption edits with undo, a kohya config through "Load a TOML…",
and the memory/time estimate."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gui_server import launch, make_root

from conftest import draw_image
from stylelora.data.autocaption import STYLE_WORDS

KOHYA = Path(__file__).parent / "kohya"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    root = make_root(tmp_path_factory.mktemp("gui") / "root")
    data = root / "datasets" / "raw"
    for i in range(5):
        draw_image(data / f"p{i}.png", (48, 48), seed=i)
    (data / "p0.txt").write_text("zxc style, a red boat, Blue_Sky\n")
    (data / "p1.txt").write_text("zxc style, a cat\n")
    demo, _, url = launch(root)
    yield Client(url, verbose=False), root
    demo.close()


def texts(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.glob("*.txt"))}


def test_caption_images_previews_then_writes_and_undo_restores(app) -> None:
    client, root = app
    data = root / "datasets" / "raw"
    before = texts(data)
    panel = ["builtin:tiny-blip", "missing", "", 2, True, ", ".join(STYLE_WORDS), 0.35]
    status, table = client.predict("raw", *panel, api_name="/caption_preview")
    rows = table["data"] if isinstance(table, dict) else table
    assert "nothing was written" in status and "2 image(s) keep their caption" in status
    assert [r[0] for r in rows] == ["p2.png", "p3.png", "p4.png"] and all(r[1] == "(none)" for r in rows)
    assert texts(data) == before
    status, table, gallery = client.predict("raw", *panel, api_name="/caption_images")
    assert status.startswith("3 caption(s) written, 2 left as they were")
    after = texts(data)
    assert {k: after[k] for k in before} == before and len(after) == 5  # the two captions untouched
    written = table["data"] if isinstance(table, dict) else table
    assert [r[2] for r in written] == [r[2] for r in rows]  # what the preview showed is what was written
    status, _, _ = client.predict("raw", api_name="/captions_undo")
    assert "caption (missing)" in status and texts(data) == before
    with pytest.raises(AppError, match="captioner 'someone/some-captioner': could not be downloaded"):
        client.predict("raw", "someone/some-captioner", *panel[1:], api_name="/caption_preview")


def test_bulk_edits_preview_apply_tags_and_undo(app) -> None:
    client, root = app
    data = root / "datasets" / "raw"
    before = texts(data)
    edit = ["raw", "red boat", "green ship", False, "", "", "text"]
    status, table = client.predict(*edit, api_name="/captions_preview")
    assert status.startswith("1 caption(s) would change") and texts(data) == before
    rows = table["data"] if isinstance(table, dict) else table
    assert rows == [["p0.png", "zxc style, a red boat, Blue_Sky", "zxc style, a green ship, Blue_Sky"]]
    client.predict(*edit, api_name="/captions_apply")
    assert texts(data)["p0.txt"] == "zxc style, a green ship, Blue_Sky\n"
    client.predict("raw", "", "", False, "blue sky", "", "tag", api_name="/captions_apply")
    assert texts(data)["p0.txt"] == "zxc style, a green ship\n"
    tags = client.predict("raw", api_name="/tag_frequency")
    assert (tags["data"] if isinstance(tags, dict) else tags)[0] == ["zxc style", 2]
    client.predict("raw", api_name="/captions_undo")
    client.predict("raw", api_name="/captions_undo")
    assert texts(data) == before


def test_load_a_toml_takes_a_kohya_config_and_says_what_it_left_out(app) -> None:
    client, _ = app
    values = client.predict(handle_file(KOHYA / "loha.json"), api_name="/load_toml")
    order = [p["parameter_name"] for p in client.view_api(return_format="dict", print_info=False)  # form order
             ["named_endpoints"]["/save_toml"]["parameters"]]
    shown = dict(zip(order, values, strict=True))
    assert (shown["lora_type"], shown["lora_rank"], shown["lora_conv_rank"], shown["train_optimizer"]) == (
        "loha", 4, 4, "lion")
    notes = client.predict(handle_file(KOHYA / "loha.json"), api_name="/import_report")
    assert "Imported a kohya config" in notes and "`rank_dropout` (rank dropout is not implemented" in notes
    assert client.predict(handle_file(KOHYA / "sd-scripts-dataset.toml"), api_name="/import_report").startswith(
        "**Imported a kohya config**")


def test_estimate_button(app) -> None:
    client, _ = app
    values = client.predict("cpu-demo", api_name="/load_preset")
    text = client.predict(*values, api_name="/estimate")
    assert text.startswith("estimate (formula, cpu): memory (peak RSS)") and "per step" in text
