"""The app off the happy path, in Debian's Chromium (Playwright): the clicks after the first one.

Each test is one fault a new user hit (issue 14): opening Advanced must not make training impossible,
adding the same files twice must not lose captions, switching datasets must never save a caption into
the other one, a run must be continued or trained again from the runs list, and a queued run must
start when the one before it ends, after a page reload too.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from gui_server import make_root, served

from conftest import draw_image, make_dataset
from stylelora.core import events
from stylelora.core.config import Config
from stylelora.services import collect
from stylelora.training.loop import train

pytestmark = pytest.mark.usefixtures("chromium")  # skips with one line (fails in CI) when there is none
QUICK = 15_000  # an element or a reply that needs no training


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    root = make_root(tmp_path_factory.mktemp("second-click") / "root")
    with served(root) as (url, ctx):
        yield url, ctx, root


def open_page(browser, url: str, tab: str):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.get_by_role("tab", name=tab).click()
    return page, errors


def toasts(page) -> list[str]:
    return page.locator(".toast-body").all_inner_texts()


def set_number(page, elem: str, value: int) -> None:
    """Type ``value`` into a number field (a number box, or the text box of one that may be left unset)."""
    box = page.locator(f"#{elem}").locator("input, textarea").first
    box.fill(str(value))
    box.press("Tab")


def wait_for_run(page, run: int, status: str = "finished", timeout: int = 240_000) -> str:
    """Wait until the status line shows run ``run`` with ``status`` (or an error toast); returns its text."""
    page.wait_for_function(
        """([run, status]) => {
            const p = document.querySelector('#train-progress');
            const failed = document.querySelector('.toast-body');
            return failed || (p && p.dataset.run === String(run) && p.dataset.status === status);
        }""", arg=[run, status], timeout=timeout)
    assert toasts(page) == []
    return page.locator("#train-progress").inner_text()


def open_advanced(page) -> None:
    """Open Advanced and every group in it: every field, the optional ones too, is on the page."""
    page.locator("#advanced").get_by_text("Advanced").first.click()
    page.wait_for_timeout(500)
    closed = page.locator("#advanced button.label-wrap:not(.open)")
    for _ in range(20):
        if not closed.count():
            break
        closed.first.click()
        page.wait_for_timeout(200)
    page.locator("#cfg-train-text-encoder-lr").locator("input, textarea").first.wait_for(timeout=QUICK)


def test_advanced_then_start_trains_to_the_end(app, browser) -> None:
    url, ctx, root = app
    page, errors = open_page(browser, url, "Train")
    open_advanced(page)
    set_number(page, "cfg-train-steps", 2)
    before = ctx.job.snapshot().run_id
    page.locator("#start-training").click()
    text = wait_for_run(page, before + 1)  # no "must be > 0, got 0" for the unset text-encoder learning rate
    assert "step 2/2" in text
    assert "Error" not in page.locator("#train-status").inner_text()
    page.get_by_role("button", name="Save as TOML").click()  # Save as TOML too
    page.locator("#saved-config td[aria-label='example.toml']").wait_for(timeout=QUICK)  # offered for download
    assert toasts(page) == []
    saved = Config.load(root / "outputs" / "configs" / "example.toml")
    assert saved.train.text_encoder_lr is None and saved.train.steps == 2  # "not set" stayed not set
    assert errors == []


def _selection(folder: Path) -> list[str]:
    files = []
    for i, name in enumerate(["astronaut", "camera", "coffee"]):
        files.append(str(draw_image(folder / f"{name}.png", (64, 64), seed=20 + i)))
        (folder / f"{name}.txt").write_text(f"a {name}, flat style\n")
        files.append(str(folder / f"{name}.txt"))
    return files


def test_the_same_selection_added_twice_leaves_every_image_captioned(app, browser, tmp_path: Path) -> None:
    url, ctx, root = app
    page, errors = open_page(browser, url, "Dataset")
    page.get_by_label("New dataset").fill("twice")
    page.get_by_role("button", name="Create").click()
    page.wait_for_function("() => document.querySelector('#upload-result textarea').value.includes('datasets/twice')",
                           timeout=QUICK)
    selection = _selection(tmp_path / "pick")
    page.locator("#upload-files input[type=file]").set_input_files(selection)
    page.locator("#upload-files td[aria-label='coffee.txt']").wait_for(timeout=QUICK)  # the picker lists the files
    page.locator("#upload").click()
    result = page.locator("#upload-result textarea")
    page.wait_for_function("() => document.querySelector('#upload-result textarea').value.startsWith('added')",
                           timeout=QUICK)
    assert result.input_value().startswith("added 6 file(s)")
    page.locator("#upload").click()  # the second click, with whatever the picker still holds
    page.wait_for_timeout(1500)
    page.locator("#upload-files input[type=file]").set_input_files(selection)  # the same selection again
    page.locator("#upload-files td[aria-label='coffee.txt']").wait_for(timeout=QUICK)
    page.locator("#upload").click()
    page.wait_for_function("() => document.querySelector('#upload-result textarea').value.includes('already')",
                           timeout=QUICK)
    assert "already in the dataset, not added again: astronaut.png, camera.png, coffee.png" in result.input_value()
    folder = root / "datasets" / "twice"
    assert sorted(p.name for p in folder.iterdir()) == ["astronaut.png", "astronaut.txt", "camera.png", "camera.txt",
                                                        "coffee.png", "coffee.txt"]
    assert [c for _, c in collect.images(folder)] == ["a astronaut, flat style", "a camera, flat style",
                                                      "a coffee, flat style"]
    page.locator("#check-data").click()
    page.get_by_text("ready to train").first.wait_for(timeout=60_000)
    assert "no caption" not in page.locator("#findings").inner_text()
    assert errors == []


def _twin_datasets(root: Path) -> None:
    """Two datasets that both hold a camera.png, with different captions."""
    for name, caption in [("alpha", "an alpha camera"), ("beta", "a beta camera")]:
        folder = root / "datasets" / name
        draw_image(folder / "camera.png", (64, 64), seed=len(name))
        (folder / "camera.txt").write_text(caption + "\n")
        draw_image(folder / "lamp.png", (64, 64), seed=len(name) + 7)
        (folder / "lamp.txt").write_text(f"a {name} lamp\n")


def settled(page, elem: str) -> None:
    """Wait until ``#elem`` is not waiting for the server (its loading overlay is hidden)."""
    page.wait_for_function(
        "id => [...document.querySelectorAll(`#${id} [data-testid=status-tracker]`)].every("
        "t => t.classList.contains('hide'))", arg=elem, timeout=QUICK)


def pick(page, elem: str, option: str) -> None:
    """Choose ``option`` in the dropdown ``#elem``."""
    page.locator(f"#{elem} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()
    page.wait_for_timeout(500)


def pick_image(page, index: int) -> None:
    settled(page, "dataset-images")
    page.locator("#dataset-images .thumbnail-item").nth(index).click()


def test_switching_datasets_never_saves_into_the_wrong_one(app, browser) -> None:
    url, ctx, root = app
    _twin_datasets(root)
    page, errors = open_page(browser, url, "Dataset")  # loaded after the datasets were made
    pick(page, "dataset-pick", "alpha")
    pick_image(page, 0)  # camera.png of alpha
    page.wait_for_function("() => document.querySelector('#caption-text textarea').value === 'an alpha camera'",
                           timeout=QUICK)
    pick(page, "dataset-pick", "beta")
    page.wait_for_function("() => document.querySelector('#caption-text textarea').value === ''", timeout=QUICK)
    assert page.locator("#caption-image input, #caption-image textarea").first.input_value() == ""
    page.locator("#caption-text textarea").fill("typed after switching")
    page.locator("#save-caption").click()
    page.wait_for_timeout(1500)
    assert (root / "datasets" / "beta" / "camera.txt").read_text().strip() == "a beta camera"
    assert (root / "datasets" / "alpha" / "camera.txt").read_text().strip() == "an alpha camera"

    # after "Add to every caption" the editor shows the new caption, so a save keeps the trigger word
    pick_image(page, 0)  # camera.png of beta
    page.wait_for_function("() => document.querySelector('#caption-text textarea').value === 'a beta camera'",
                           timeout=QUICK)
    page.get_by_label("Trigger word").fill("zzstyle")
    page.locator("#add-trigger").click()
    page.wait_for_function(
        "() => document.querySelector('#caption-text textarea').value === 'zzstyle, a beta camera'", timeout=QUICK)
    page.locator("#caption-text textarea").fill("zzstyle, a beta camera, edited")
    page.locator("#save-caption").click()
    page.wait_for_function("() => document.querySelector('#caption-result textarea').value === "
                           "\"saved the caption of camera.png in dataset 'beta'\"", timeout=QUICK)
    assert (root / "datasets" / "beta" / "camera.txt").read_text().strip() == "zzstyle, a beta camera, edited"
    assert (root / "datasets" / "alpha" / "camera.txt").read_text().strip() == "an alpha camera"

    # a caption changed on disk since it was shown is not overwritten
    settled(page, "caption-text")  # the editor has reloaded the saved caption
    (root / "datasets" / "beta" / "camera.txt").write_text("changed by someone else\n")
    page.locator("#caption-text textarea").fill("my stale edit")
    page.locator("#save-caption").click()
    page.get_by_text("its caption changed since it was shown").first.wait_for(timeout=QUICK)
    assert (root / "datasets" / "beta" / "camera.txt").read_text().strip() == "changed by someone else"
    assert errors == []


def _stopped_run(root: Path, name: str, stop_at: int, steps: int) -> Path:
    """A run stopped at step ``stop_at`` of ``steps`` (with its checkpoint), as Stop or Ctrl-C leaves it."""
    data = make_dataset(root / "datasets" / f"{name}-data", n=2, size=(64, 64))
    out = root / "outputs" / name
    stop = threading.Event()
    config = Config().with_overrides({"model.name": "builtin:tiny", "data.path": str(data), "data.resolution": 64,
                                      "lora.rank": 2, "lora.alpha": 2.0, "train.steps": steps,
                                      "train.output_dir": str(out)})
    train(config, lambda e: stop.set() if isinstance(e, events.Progress) and e.step >= stop_at else None, stop)
    return out


def test_continue_and_train_again_from_the_runs_list(app, browser) -> None:
    url, ctx, root = app
    run = _stopped_run(root, "halfway", stop_at=2, steps=4)
    page, errors = open_page(browser, url, "Dataset")
    page.get_by_role("tab", name="Train").click()  # the runs list is read when the tab opens
    pick(page, "run-pick", "outputs/halfway")
    before = ctx.job.snapshot().run_id
    page.locator("#run-continue").click()
    text = wait_for_run(page, before + 1)
    assert "halfway: step 4/4" in text
    assert "resumed from" in page.locator("#run-log textarea").input_value()
    assert (run / "checkpoints" / "step-000004").is_dir()
    assert (run / "halfway.safetensors").is_file()

    pick(page, "run-pick", "outputs/halfway")
    page.locator("#run-again").click()
    text = wait_for_run(page, before + 2)
    assert "halfway-2: step 4/4" in text
    again = Config.load(root / "outputs" / "halfway-2" / "config.toml")
    assert again.train.steps == 4 and again.data.path == Config.load(run / "config.toml").data.path
    assert (root / "outputs" / "halfway-2" / "halfway-2.safetensors").is_file()
    assert errors == []


def test_a_queued_second_run_starts_when_the_first_ends_and_the_queue_survives_a_reload(app, browser) -> None:
    url, ctx, root = app
    page, errors = open_page(browser, url, "Train")
    page.get_by_role("button", name="Load preset").click()
    page.wait_for_timeout(1000)
    pick(page, "cfg-data-path", "datasets/example")
    set_number(page, "cfg-train-steps", 300)  # long enough to be running while the page reloads
    page.locator("#start-training").click()
    page.wait_for_function("() => document.querySelector('#train-progress')?.dataset.status === 'running'",
                           timeout=QUICK)
    first = int(page.locator("#train-progress").get_attribute("data-run"))
    set_number(page, "cfg-train-steps", 2)
    page.locator("#add-to-queue").click()
    page.get_by_text("added run #").first.wait_for(timeout=QUICK)

    page.reload()  # the queue and the running run's settings are still there
    page.get_by_role("tab", name="Train").click()
    page.wait_for_function("() => document.querySelector('#queue-table')?.innerText.includes('example · 2 steps')",
                           timeout=QUICK)
    assert "running" in page.locator("#queue-table").inner_text()
    assert page.locator("#cfg-train-steps input").first.input_value() == "300"  # the form shows what runs
    page.locator("#stop-training").click()  # the first run ends here; the queued one starts
    text = wait_for_run(page, first + 1)
    assert "example-" in text and "step 2/2" in text
    started = [e for e in ctx.job.snapshot().events if isinstance(e, events.Started)]  # the precision line comes first
    second = Path(started[0].output_dir)
    assert (second / f"{second.name}.safetensors").is_file() and second != root / "outputs" / "example"
    assert "example · 2 steps" not in page.locator("#queue-table").inner_text()

    # Stop with nothing running says so and leaves the run log as it was
    log = page.locator("#run-log textarea")
    before = log.input_value()
    assert "finished at step 2" in before
    page.locator("#stop-training").click()
    page.get_by_text("no training is running").first.wait_for(timeout=QUICK)
    assert log.input_value() == before
    assert errors == []
