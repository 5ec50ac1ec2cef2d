"""Issue 21 in the app, in Debian's Chromium (Playwright): the Evaluation panel shows a run's scores as a plot,
names and marks the best checkpoint, shows the images (prompts x checkpoints, base first) and exports the
checkpoint; "Evaluate this run" scores a run that was not scored; the Runs panel compares runs; the queue takes
a sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
from gui_server import make_root, served
from test_browser_second_click import open_advanced, pick, set_number

from conftest import make_dataset
from stylelora.core.config import Config
from stylelora.training.loop import train

pytestmark = pytest.mark.usefixtures("chromium")  # skips with one line (fails in CI) when there is none
QUICK = 15_000
EVALUATION = {"data.trigger_word": "zq", "eval.steps": 2, "eval.style_prompts": 2, "eval.prompts": ["a lighthouse"],
              "eval.seeds": 2}


def _run(root: Path, name: str, every_save: bool) -> Path:
    data = make_dataset(root / "datasets" / f"{name}-data", n=3, size=(64, 64))
    out = root / "outputs" / name
    config = Config().with_overrides({"model.name": "builtin:tiny", "data.path": str(data), "data.resolution": 64,
                                      "lora.rank": 2, "lora.alpha": 2.0, "train.steps": 4, "train.save_every": 2,
                                      "train.output_dir": str(out), "train.log_with": "none",
                                      "eval.every_save": every_save, **EVALUATION})
    train(config)
    return out


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    root = make_root(tmp_path_factory.mktemp("eval-panel") / "root")
    scored, unscored = _run(root, "scored", True), _run(root, "unscored", False)
    with served(root) as (url, ctx):
        yield url, ctx, root, scored, unscored


def test_the_evaluation_panel_plots_scores_marks_the_best_and_exports_it(app, tmp_path: Path, browser) -> None:
    url, ctx, root, scored, unscored = app
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.get_by_role("tab", name="Train").click()

    pick(page, "run-pick", "outputs/scored")
    best = page.locator("#eval-best")
    best.get_by_text("Best checkpoint: step-").wait_for(timeout=QUICK)
    label = best.inner_text().split("Best checkpoint: ")[1].split()[0]
    page.locator("#eval-plot canvas, #eval-plot svg").first.wait_for(timeout=QUICK)  # the plot is drawn
    table = page.locator("#eval-table").inner_text()
    assert "base" in table and f"{label} ★ best" in table and "step-000002" in table
    # the image grid: one row per prompt (2 style, 1 transfer, 1 leak), base first, then the checkpoints
    grid = page.locator("#eval-grid")
    assert grid.locator("img").count() >= 4 * 3
    page.screenshot(path=str(tmp_path / "evaluation.png"), full_page=True)

    page.locator("#eval-export").click()  # the best checkpoint is the one picked
    page.locator("#eval-exported a, #eval-exported td").first.wait_for(timeout=60_000)
    exported = list((scored / "exports").glob("*.safetensors"))
    step = int(label.removeprefix("step-"))
    expected = f"scored-step{step:08d}-fp16.safetensors" if step != 4 else "scored-fp16.safetensors"
    assert [e.name for e in exported] == [expected]

    # a run that was not scored: the panel says so, and "Evaluate this run" scores it
    pick(page, "run-pick", "outputs/unscored")
    best.get_by_text("Not evaluated yet").wait_for(timeout=QUICK)
    page.locator("#evaluate-run").click()
    best.get_by_text("Best checkpoint: step-").wait_for(timeout=180_000)
    assert (unscored / "eval" / "scores.json").is_file()

    # the Runs panel compares two runs: each one's best checkpoint and its scores
    page.locator("#compare-runs input").first.click()
    page.get_by_role("option", name="outputs/scored", exact=True).click()
    page.locator("#compare-runs input").first.click()
    page.get_by_role("option", name="outputs/unscored", exact=True).click()
    page.keyboard.press("Escape")
    page.locator("#compare").click()
    page.wait_for_function("() => document.querySelector('#compare-table').innerText.includes('outputs/unscored')",
                           timeout=QUICK)
    compared = page.locator("#compare-table").inner_text()
    assert "outputs/scored" in compared and "step-00000" in compared
    page.screenshot(path=str(tmp_path / "compared.png"), full_page=True)

    # the queue takes a sweep: the form's config once per value, each scored as it saves
    open_advanced(page)
    for elem, value in (("cfg-train-steps", 2), ("cfg-eval-steps", 2), ("cfg-eval-seeds", 1)):
        set_number(page, elem, value)
    page.locator("#sweep-grid textarea").fill("train.lr=1e-3,2e-3")
    page.locator("#queue-sweep").click()
    page.locator("#train-notice").get_by_text("queued a sweep of 2 runs").wait_for(timeout=QUICK)
    ctx.job.join_all(600)
    sweep = root / "outputs" / "example-sweep"
    assert sorted(p.name for p in sweep.iterdir()) == ["lr0.001", "lr0.002"]
    assert all((sweep / name / "eval" / "scores.json").is_file() for name in ("lr0.001", "lr0.002"))
    assert errors == []
