"""The real app in Debian's Chromium (Playwright): tabs render, a training from the Train tab finishes,
the strength slider (and a strength typed into its box) regenerates the image. Screenshots go to the
test's tmp folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from gui_server import launch, make_root

from conftest import CHROMIUM_ARGS, chromium_path

ARGS = CHROMIUM_ARGS
CHROMIUM = chromium_path()[0] or "/usr/bin/chromium"  # for modules that import it; fixtures take `chromium`
pytestmark = pytest.mark.usefixtures("chromium")  # skips with one line (fails in CI) when there is none


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory):
    root = make_root(tmp_path_factory.mktemp("browser") / "root")
    demo, ctx, url = launch(root)
    yield url
    demo.close()


@pytest.fixture
def page(app_url, chromium: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(app_url)
        page.get_by_role("tab", name="Dataset").wait_for(timeout=30_000)
        yield page, errors
        browser.close()


def test_tabs_train_and_slider(page, tmp_path: Path) -> None:
    page, errors = page
    # --- the four tabs render ---
    for name in ["Dataset", "Train", "Preview", "Export"]:
        page.get_by_role("tab", name=name).click()
        page.wait_for_timeout(300)
        page.screenshot(path=str(tmp_path / f"tab-{name.lower()}.png"), full_page=True)
    assert errors == []
    page.get_by_role("tab", name="Dataset").click()
    page.get_by_text("apple").first.wait_for(timeout=30_000)  # the example dataset's captions in the gallery

    # --- a training started from the Train tab completes ---
    page.get_by_role("tab", name="Train").click()
    steps = page.locator("#cfg-train-steps input")
    steps.fill("4")
    steps.press("Tab")
    page.locator("#start-training").click()
    page.locator('#train-progress[data-status="finished"]').wait_for(timeout=180_000)
    assert "step 4/4" in page.locator("#train-progress").inner_text()
    page.screenshot(path=str(tmp_path / "trained.png"), full_page=True)

    # --- preview: generate, then move the strength slider; a new image appears on release ---
    page.get_by_role("tab", name="Preview").click()
    page.wait_for_function(  # the adapter list refreshes when the tab opens and picks the new run
        "() => (document.querySelector('#adapter input') || {}).value?.endsWith('.safetensors')", timeout=30_000)
    page.locator("#generate").click()
    lora_image = page.locator("#lora-image img")
    lora_image.wait_for(timeout=120_000)
    first = lora_image.get_attribute("src")
    track = page.locator("#strength input[type=range]")
    box = track.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.67, box["y"] + box["height"] / 2)  # strength 1
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    page.wait_for_function(
        "src => { const img = document.querySelector('#lora-image img'); return img && img.src !== src }",
        arg=first, timeout=120_000)
    strength = float(page.locator("#strength input[type=number]").input_value())
    assert strength < 0.5
    # a strength typed into the number box regenerates on Enter, as letting go of the slider does
    second = lora_image.get_attribute("src")
    number = page.locator("#strength input[type=number]")
    number.fill("1.5")
    number.press("Enter")
    page.wait_for_function(
        "src => { const img = document.querySelector('#lora-image img'); return img && img.src !== src }",
        arg=second, timeout=120_000)
    page.screenshot(path=str(tmp_path / "preview.png"), full_page=True)
    assert errors == []
    assert len(list(tmp_path.glob("*.png"))) == 6
