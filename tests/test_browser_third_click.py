"""The app as a kohya_ss user meets it the third time round, in Debian's Chromium (Playwright) (issue 23).

Each test is a fault: the Export tab offering the previous run's file after a failed export, a typed caption
lost when another image or dataset is clicked, a kohya config whose folders lie outside datasets/ and
outputs/, the Train form staying on datasets/example after another dataset was opened, a block strength set
while the first render was still going never showing, and the small ones (an error badge on the wrong line,
an old "undid …", a stale "stopping …", a continued run's loss plot).
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from gui_server import make_root, served
from PIL import Image
from test_browser_second_click import QUICK, open_page, pick, pick_image, set_number, settled, toasts, wait_for_run

from conftest import draw_image
from stylelora.core.config import Config

pytestmark = pytest.mark.usefixtures("chromium")  # skips with one line (fails in CI) when there is none
KOHYA = Path(__file__).parent / "kohya"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    root = make_root(tmp_path_factory.mktemp("third-click") / "root")
    with served(root) as (url, ctx):
        yield url, ctx, root


@pytest.fixture(scope="module")
def trained(app) -> Path:
    """A finished 4-step run on the example dataset, outputs/trained, with its adapter (a high learning rate:
    its per-block strengths change the image)."""
    from stylelora.training.loop import train

    _, _, root = app
    out = root / "outputs" / "trained"
    train(Config().with_overrides({"model.name": "builtin:tiny", "data.path": str(root / "datasets" / "example"),
                                   "data.resolution": 64, "lora.rank": 4, "lora.alpha": 4.0, "train.steps": 4,
                                   "train.lr": 0.01, "train.output_dir": str(out)}))
    return out


def field_value(page, elem: str) -> str:
    return page.locator(f"#{elem} input, #{elem} textarea").first.input_value()


def wait_value(page, elem: str, text: str, *, contains: bool = False) -> None:
    """Wait until the text box or dropdown ``#elem`` shows ``text`` (or contains it)."""
    page.wait_for_function(
        """([id, text, contains]) => {
            const box = document.querySelector(`#${id} input, #${id} textarea`);
            return box && (contains ? box.value.includes(text) : box.value === text);
        }""", arg=[elem, text, contains], timeout=QUICK)


def close_toasts(page) -> None:
    for button in page.locator(".toast-close").all():
        button.click()
    page.wait_for_function("() => !document.querySelector('.toast-body')", timeout=QUICK)


# --- 3: Export ------------------------------------------------------------------------------------


def test_a_failed_export_offers_no_file_and_its_error_stays(app, browser, trained: Path) -> None:
    url, _, root = app
    broken = root / "outputs" / "broken"  # a run whose adapter file is damaged
    broken.mkdir()
    shutil.copy(trained / "config.toml", broken / "config.toml")
    (broken / "broken.safetensors").write_bytes(b"not a safetensors file")
    page, errors = open_page(browser, url, "Export")
    pick(page, "export-source", "outputs/trained")
    page.locator("#export").click()
    page.get_by_text("verified: reloaded and compared every tensor").first.wait_for(timeout=60_000)
    offered = page.locator("#export-download td.filename")  # the file offered for download
    page.locator("#export-download td[aria-label='trained-fp16.safetensors']").wait_for(timeout=QUICK)

    pick(page, "export-source", "outputs/broken")  # another pick: the old result and file go at once
    page.wait_for_function("() => !document.querySelector('#export-download td.filename')", timeout=QUICK)
    assert "verified" not in page.locator("#export-report").inner_text()
    page.locator("#export").click()
    page.get_by_text("Export failed").first.wait_for(timeout=60_000)
    close_toasts(page)  # the toast goes; the error stays beside the selection, and no file is offered
    report = page.locator("#export-report").inner_text()
    assert "Export failed" in report and "broken" in report and "verified" not in report
    assert offered.count() == 0
    assert not (broken / "exports").exists()

    pick(page, "export-source", "outputs/trained")  # changing one's mind back: a fresh export, its own file
    assert "Export failed" not in page.locator("#export-report").inner_text()
    page.locator("#export").click()
    page.locator("#export-download td[aria-label='trained-fp16.safetensors']").wait_for(timeout=60_000)
    assert errors == []


# --- 5 and the small caption items ----------------------------------------------------------------


def _two_datasets(root: Path) -> None:
    for name in ("gamma", "delta"):
        folder = root / "datasets" / name
        for i, image in enumerate(("camera", "lamp")):
            draw_image(folder / f"{image}.png", (64, 64), seed=len(name) + i)
            (folder / f"{image}.txt").write_text(f"a {name} {image}\n")


def caption_of(root: Path, dataset: str, image: str) -> str:
    return (root / "datasets" / dataset / f"{image}.txt").read_text().strip()


def test_a_typed_caption_is_saved_when_another_image_or_dataset_is_clicked(app, browser) -> None:
    url, _, root = app
    _two_datasets(root)
    page, errors = open_page(browser, url, "Dataset")
    pick(page, "dataset-pick", "gamma")
    pick_image(page, 0)
    wait_value(page, "caption-text", "a gamma camera")
    page.locator("#caption-text textarea").fill("a gamma camera, edited")
    pick_image(page, 1)  # another image before Save: the edit is saved, and the caption line says so
    wait_value(page, "caption-text", "a gamma lamp")
    assert caption_of(root, "gamma", "camera") == "a gamma camera, edited"
    wait_value(page, "caption-result", "saved your edit of the caption of camera.png in dataset 'gamma'")

    page.locator("#caption-text textarea").fill("a gamma lamp, edited")
    pick(page, "dataset-pick", "delta")  # another dataset before Save
    wait_value(page, "caption-text", "")
    assert caption_of(root, "gamma", "lamp") == "a gamma lamp, edited"
    assert caption_of(root, "delta", "lamp") == "a delta lamp"
    wait_value(page, "caption-result", "saved your edit of the caption of lamp.png in dataset 'gamma'")

    pick_image(page, 0)  # the same image twice: the edit is saved and shown again
    wait_value(page, "caption-text", "a delta camera")
    page.locator("#caption-text textarea").fill("a delta camera, twice")
    pick_image(page, 0)
    wait_value(page, "caption-result", "saved your edit", contains=True)
    wait_value(page, "caption-text", "a delta camera, twice")
    settled(page, "caption-result")

    # the caption changed on disk meanwhile: nothing is overwritten, and the typed text stays in the editor
    (root / "datasets" / "delta" / "camera.txt").write_text("changed by someone else\n")
    page.locator("#caption-text textarea").fill("my stale edit")
    pick_image(page, 1)
    page.get_by_text("its caption changed since it was shown").first.wait_for(timeout=QUICK)
    assert caption_of(root, "delta", "camera") == "changed by someone else"
    assert field_value(page, "caption-text") == "my stale edit" and field_value(page, "caption-image") == "camera.png"
    close_toasts(page)

    page.reload()  # "Add to every caption" rewrites the captions and reloads the editor: an edit is saved first
    page.get_by_role("tab", name="Dataset").click()
    pick(page, "dataset-pick", "gamma")
    pick_image(page, 0)
    wait_value(page, "caption-text", "a gamma camera, edited")
    page.locator("#caption-text textarea").fill("a gamma camera, edited twice")
    page.get_by_label("Trigger word").fill("zzstyle")
    page.locator("#add-trigger").click()
    wait_value(page, "caption-text", "zzstyle, a gamma camera, edited twice")
    assert caption_of(root, "gamma", "camera") == "zzstyle, a gamma camera, edited twice"
    assert errors == []


def test_save_caption_without_an_image_says_so_beside_the_editor(app, browser) -> None:
    url, _, root = app
    page, errors = open_page(browser, url, "Dataset")
    page.locator("#caption-text textarea").fill("typed with no image")
    page.locator("#save-caption").click()
    wait_value(page, "caption-result", "not saved: click an image in the gallery first")
    close_toasts(page)
    assert "Error" not in page.locator("#upload-result").inner_text()  # no badge on the upload's result
    assert "Error" in page.locator("#caption-result").inner_text()
    assert errors == []


def test_undo_with_nothing_left_says_so(app, browser) -> None:
    url, _, root = app
    folder = root / "datasets" / "undo-me"
    draw_image(folder / "a.png", (64, 64), seed=1)
    (folder / "a.txt").write_text("a red boat\n")
    page, errors = open_page(browser, url, "Dataset")
    pick(page, "dataset-pick", "undo-me")
    page.locator("#caption-tools").get_by_text("Edit captions in bulk").first.click()
    page.get_by_label("Find").fill("red")
    page.get_by_label("Replace with", exact=True).fill("blue")
    page.get_by_role("button", name="Apply to every caption").click()
    wait_value(page, "caption-edit-result", "1 caption(s) changed")
    undo = page.get_by_role("button", name="Undo the last edit")
    undo.click()
    wait_value(page, "caption-edit-result", "undid 'replace 'red'': 1 file(s) restored")
    assert (folder / "a.txt").read_text().strip() == "a red boat"
    undo.click()  # nothing left: the result says so instead of keeping "undid …"
    wait_value(page, "caption-edit-result", "no caption edit to undo", contains=True)
    assert "undid" not in field_value(page, "caption-edit-result")
    assert errors == []


# --- 7 and 8: a kohya config with its own folders, the form following the dataset ---------------------


def _kohya_folders(base: Path) -> tuple[Path, Path]:
    """A kohya_ss user's folders outside the workspace (img/3_zqx style/) and their GUI config pointing at them."""
    base = base.resolve()
    img = base / "img"
    for i in range(4):
        draw_image(img / "3_zqx style" / f"{i}.png", (64, 64), seed=40 + i)
        (img / "3_zqx style" / f"{i}.txt").write_text(f"zqx style, thing {i}\n")
    settings = json.loads((KOHYA / "lora-standard.json").read_text())
    settings.update({"train_data_dir": str(img), "output_dir": str(base / "model"), "output_name": "zqx",
                     "sample_prompts": "", "save_every_n_epochs": 0, "epoch": 1})
    config = base / "zqx.json"
    config.write_text(json.dumps(settings, indent=1))
    return img, config


def test_a_kohya_config_trains_from_its_own_folders_after_adding_the_dataset(app, browser, tmp_path: Path) -> None:
    url, ctx, root = app
    img, kohya_json = _kohya_folders(tmp_path / "kohya")
    kohya = img.parent
    page, errors = open_page(browser, url, "Train")
    with page.expect_file_chooser() as chooser:
        page.locator("#load-toml").click()  # "Load a TOML…"
    chooser.value.set_files(str(kohya_json))
    notes = page.locator("#import-notes")
    notes.get_by_text("Imported a kohya config").wait_for(timeout=QUICK)
    wait_value(page, "cfg-data-path", str(img))
    text = notes.inner_text()
    assert f"“Run folder”: {kohya / 'model' / 'zqx'} is outside outputs/" in text and "goes to outputs/zqx" in text
    assert "Dataset (data.path)" in text and "Use a folder on this computer" in text  # labels, and the way out

    page.locator("#start-training").click()  # refused once, by the form's words, with the way out
    page.locator(".toast-body").first.wait_for(timeout=QUICK)
    refusal = " ".join(toasts(page))
    assert "Dataset (data.path)" in refusal and "Use a folder on this computer" in refusal
    assert "train.output_dir" not in refusal  # the run folder was moved under outputs/ at import
    close_toasts(page)

    page.get_by_role("tab", name="Dataset").click()
    page.locator("#outside-folder textarea, #outside-folder input").first.fill(str(kohya))
    page.locator("#use-folder").click()  # too wide? no: it holds no image, nor its folders one level down
    page.get_by_text("no images in it").first.wait_for(timeout=QUICK)
    close_toasts(page)
    page.locator("#outside-folder textarea, #outside-folder input").first.fill(str(img))
    page.locator("#use-folder").click()
    wait_value(page, "dataset-pick", str(img))
    wait_value(page, "upload-result", "the Train tab's dataset now", contains=True)
    settled(page, "dataset-images")
    page.wait_for_function(  # the images in kohya's 3_zqx style/ show, served from the added folder
        "() => [...document.querySelectorAll('#dataset-images img')].filter(i => i.naturalWidth > 0).length >= 4",
        timeout=QUICK)
    pick_image(page, 0)
    wait_value(page, "caption-image", "3_zqx style/0.png")
    wait_value(page, "caption-text", "zqx style, thing 0")

    page.get_by_role("tab", name="Train").click()
    assert field_value(page, "cfg-data-path") == str(img)
    before = ctx.job.snapshot().run_id
    page.locator("#start-training").click()
    text = wait_for_run(page, before + 1)
    assert "zqx: step" in text
    run = root / "outputs" / "zqx"
    assert (run / "zqx.safetensors").is_file() and not (kohya / "model").exists()
    assert Config.load(run / "config.toml").data.path == str(img)

    page.reload()  # the added folder stays in the app (outputs/folders.json), after a reload too
    page.get_by_role("tab", name="Dataset").click()
    page.locator("#dataset-pick input").first.click()
    page.get_by_role("option", name=str(img), exact=True).wait_for(timeout=QUICK)
    assert errors == []


def test_the_train_form_follows_the_dataset_created_or_opened(app, browser) -> None:
    url, ctx, root = app
    page, errors = open_page(browser, url, "Dataset")

    def train_form_shows(dataset: str) -> None:
        page.get_by_role("tab", name="Train").click()  # visibly: the Train form's Dataset field
        wait_value(page, "cfg-data-path", dataset)
        page.get_by_role("tab", name="Dataset").click()

    page.get_by_label("New dataset").fill("fresh")
    page.get_by_role("button", name="Create").click()
    wait_value(page, "upload-result", "the Train tab's dataset now", contains=True)
    train_form_shows("datasets/fresh")
    pick(page, "dataset-pick", "example")
    train_form_shows("datasets/example")
    pick(page, "dataset-pick", "fresh")  # the second pick too
    train_form_shows("datasets/fresh")
    page.reload()  # a reloaded page shows the last run's settings, and the Dataset tab shows their dataset
    ws, last = ctx.workspace, ctx.job.config  # the last run of this app (None when this test runs alone)
    page.get_by_role("tab", name="Train").click()
    if last is not None:  # the page's load events fill both tabs: wait for them, not for the first paint
        wait_value(page, "cfg-data-path", ws.display(ws.open_dataset(str(last.data.path))))
    form = field_value(page, "cfg-data-path")
    page.get_by_role("tab", name="Dataset").click()
    if last is not None:
        wait_value(page, "dataset-pick", ws.dataset_name(last.data.path) or "")
    page.wait_for_function("() => document.querySelector('#dataset-pick input')?.value", timeout=QUICK)
    shown = field_value(page, "dataset-pick")
    assert ws.display(ws.open_dataset(shown)) == form, (shown, form)
    other = "fresh" if shown != "fresh" else "example"
    pick(page, "dataset-pick", other)  # and a pick there moves the form, after a reload too
    train_form_shows(f"datasets/{other}")
    assert errors == []


# --- 11: the per-block strength sliders --------------------------------------------------------------


def _shown_image(page, elem: str) -> np.ndarray | None:
    src = page.locator(f"#{elem} img").first.get_attribute("src")
    if not src:
        return None
    return np.asarray(Image.open(io.BytesIO(httpx.get(src).content)).convert("RGB"), dtype=np.int16)


def test_a_block_strength_set_first_thing_after_load_shows(app, browser, trained: Path) -> None:
    from webui.preview_tab import DEFAULT_PROMPT, START

    url, ctx, root = app
    page, errors = open_page(browser, url, "Preview")
    pick(page, "adapter", "outputs/trained/trained.safetensors")
    page.get_by_text("Per-block strength (IN / MID / OUT)").click()
    track = page.locator("#strength-in input[type=range]").bounding_box()
    page.mouse.click(track["x"] + track["width"] * 0.5, track["y"] + track["height"] / 2)  # IN 0.5: a render
    box = page.locator("#strength-in input[type=number]")  # starts (the model loads), and meanwhile IN = 0
    box.fill("0")
    box.press("Enter")
    previewer = ctx.previewer("builtin:tiny")
    with ctx.preview_lock:
        name = previewer.attach(trained / "trained.safetensors")
        half, no_in = (np.asarray(previewer.compare(DEFAULT_PROMPT, START, adapter=name, blocks=blocks)[1],
                                  dtype=np.int16) for blocks in ({"IN": 0.5}, {"IN": 0.0}))
    assert np.abs(half - no_in).mean() > 0.5  # IN = 0 and IN = 0.5 give this adapter different images
    deadline = time.time() + 120
    while True:  # the image shown ends as IN = 0 renders it (before: as IN = 0.5, the second change dropped)
        shown = _shown_image(page, "lora-image")
        if shown is not None and shown.shape == no_in.shape and np.array_equal(shown, no_in):
            break
        assert time.time() < deadline, "the LoRA image never showed IN = 0"
        page.wait_for_timeout(500)
    assert field_value(page, "strength-in") == "0"
    page.wait_for_timeout(3000)  # and stays so: no render of an older value comes after it
    assert np.array_equal(_shown_image(page, "lora-image"), no_in)
    assert errors == []


# --- 12: the queue's end, and a continued run's loss plot ---------------------------------------------


def test_stopping_with_a_queue_leaves_no_stale_status_and_a_continued_run_plots_its_loss(app, browser) -> None:
    from gradio_client import Client
    from test_browser_second_click import _stopped_run

    url, ctx, root = app
    page, errors = open_page(browser, url, "Train")
    page.get_by_role("button", name="Load preset").click()
    page.wait_for_timeout(1000)
    pick(page, "cfg-data-path", "datasets/example")
    set_number(page, "cfg-train-steps", 300)
    page.locator("#start-training").click()
    page.wait_for_function("() => document.querySelector('#train-progress')?.dataset.status === 'running'",
                           timeout=QUICK)
    first = int(page.locator("#train-progress").get_attribute("data-run"))
    set_number(page, "cfg-train-steps", 2)
    page.locator("#add-to-queue").click()
    page.get_by_text("added run #").first.wait_for(timeout=QUICK)
    page.evaluate("""() => {  // the notice may show Stop's answer only for a moment: the run ends a step later
        const notice = document.querySelector('#train-notice');
        new MutationObserver(() => { if (notice.innerText.includes('the queue goes on with the next run'))
            window.sawQueueNote = true; }).observe(notice, {childList: true, subtree: true, characterData: true});
    }""")
    page.locator("#stop-training").click()
    page.wait_for_function("() => window.sawQueueNote === true", timeout=QUICK)
    wait_for_run(page, first + 1)
    page.wait_for_function("() => !document.querySelector('#train-notice').innerText.includes('stopping')",
                           timeout=QUICK)

    run = _stopped_run(root, "halfway", stop_at=2, steps=4)
    client = Client(url, verbose=False)
    assert "started run" in client.predict("outputs/halfway", api_name="/continue_run")
    status, plot, *_ = client.predict(api_name="/watch")  # the run's end, as the page shows it
    assert "halfway: step 4/4" in status
    rows = plot["value"]["data"] if "value" in plot else plot["data"]
    assert [row[0] for row in rows] == [1, 2, 3, 4]  # steps 1-2 from its metrics.jsonl, then this session's
    assert (run / "checkpoints" / "step-000004").is_dir()
    assert errors == []
