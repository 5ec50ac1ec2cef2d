"""The Train tab's Runs and Evaluation panels and the Export tab's merge in Debian's Chromium (Playwright), as an
impolite user walks them: a page reopened while a run trains, a run deleted after the page loaded, a merge strength
no one means.

Each test is a fault found by walking the app on the built-in models and failed on the code before its fix.
"""

from __future__ import annotations

import shutil

import pytest
from gui_server import make_root, served
from test_app_panels import make_run
from test_browser_second_click import QUICK, open_page

from stylelora.core.config import Config

TRAINING = 60_000  # a page answers slower while a run trains on the same cores
pytestmark = pytest.mark.usefixtures("chromium")  # skips with one line (fails in CI) when there is none


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    root = make_root(tmp_path_factory.mktemp("browser-panels") / "root")
    make_run(root, "earlier")  # the only run when the app starts: the runs list's first pick
    with served(root) as (url, ctx):
        yield url, ctx, root


def run_pick(page) -> str:
    return page.locator("#run-pick input").input_value()


def test_a_page_opened_while_a_run_trains_picks_that_run_for_its_evaluation(app, browser) -> None:
    """The status showed "Running late" while Runs (and so Evaluation) kept the run picked when the app started:
    "Evaluate this run" scored that older run, not the one training."""
    url, ctx, root = app
    config = Config().with_overrides({"model.name": "builtin:tiny", "data.path": str(root / "datasets" / "example"),
                                      "data.resolution": 64, "lora.rank": 2, "train.steps": 400, "sample.every": 0,
                                      "train.output_dir": str(root / "outputs" / "late"), "train.log_with": "none"})
    ctx.job.start(ctx.workspace.run_config(config))
    try:
        for _ in range(2):  # opened, then reopened
            page, errors = open_page(browser, url, "Train")
            page.locator('#train-progress[data-status="running"]').wait_for(timeout=TRAINING)
            page.wait_for_function("() => document.querySelector('#run-pick input').value === 'outputs/late'",
                                   timeout=TRAINING)
            page.locator("#eval-best").get_by_text("Nothing saved in this run yet").wait_for(timeout=TRAINING)
            page.get_by_role("tab", name="Preview").click()  # and back: the pick stays
            page.get_by_role("tab", name="Train").click()
            page.wait_for_timeout(1000)
            assert run_pick(page) == "outputs/late" and errors == []
            page.close()
    finally:
        ctx.job.stop()
        ctx.job.join_all(120)


def test_runs_picked_quickly_for_a_comparison_stay_picked_and_a_deleted_one_is_named(app, browser) -> None:
    """Runs picked as soon as the Compare list opened were unpicked again: the list's refresh on focus sent back the
    value it saw then (none), so the table compared one run. A run deleted after it was picked: Compare, "Show its
    scores" and "Evaluate this run" name it as gone ("Show its scores" said "Nothing saved in this run yet")."""
    url, ctx, root = app
    for name in ("first", "second"):
        make_run(root, name)
    page, errors = open_page(browser, url, "Train")
    page.locator("#train-progress").wait_for(timeout=QUICK)
    for name in ("outputs/first", "outputs/second", "outputs/earlier"):
        page.locator("#compare-runs input").first.click()
        page.get_by_role("option", name=name, exact=True).click()
    page.keyboard.press("Escape")
    page.locator("#compare").click()
    page.wait_for_function("() => document.querySelector('#compare-table').innerText.includes('outputs/earlier')",
                           timeout=QUICK)
    table = page.locator("#compare-table").inner_text()
    assert "outputs/first" in table and "outputs/second" in table

    page.locator("#run-pick input").first.click()
    page.get_by_role("option", name="outputs/second", exact=True).click()
    page.locator("#eval-best").get_by_text("Not evaluated yet").wait_for(timeout=QUICK)
    shutil.rmtree(root / "outputs" / "second")
    gone = "outputs/second: no such run folder (deleted or moved since the list was made); pick another run"
    page.locator("#compare").click()
    page.locator(".toast-body").get_by_text(gone).wait_for(timeout=QUICK)
    page.locator("#eval-refresh").click()
    page.locator("#eval-best").get_by_text(gone).wait_for(timeout=QUICK)
    assert "Nothing saved" not in page.locator("#eval-best").inner_text()
    page.locator("#evaluate-run").click()
    page.locator("#eval-best").get_by_text(gone).wait_for(timeout=QUICK)
    assert str(root) not in " ".join(page.locator(".toast-body").all_inner_texts())
    page.locator("#run-pick input").first.click()  # the list opened with a deleted run picked
    page.get_by_role("option", name="outputs/first", exact=True).click()
    page.locator("#eval-best").get_by_text("Not evaluated yet").wait_for(timeout=QUICK)
    assert errors == []
    page.close()
