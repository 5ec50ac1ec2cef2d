"""The Train form fits the chosen model's family, in Debian's Chromium (Playwright): picking builtin:tiny-flux hides
what FLUX.1 does not use (clip skip, SD's min-SNR and zero-terminal-SNR, LoCon's convs) and shows the flow-matching
options, names the model and offers its preset; picking an SD model again turns it back."""

from __future__ import annotations

from pathlib import Path

import pytest
from gui_server import launch, make_root

pytestmark = pytest.mark.usefixtures("chromium")  # skips with one line (fails in CI) when there is none
QUICK = 60_000  # a reply that loads a built-in model's configs
SD_ONLY = ["cfg-model-clip-skip", "cfg-train-min-snr-gamma", "cfg-train-zero-terminal-snr", "cfg-lora-conv-rank",
           "cfg-model-prediction-type"]
FLOW_ONLY = ["cfg-train-timestep-sampling", "cfg-train-flow-shift", "cfg-train-loss-weighting"]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory):
    root = make_root(tmp_path_factory.mktemp("families") / "root")
    demo, ctx, url = launch(root)
    yield url
    demo.close()


def pick_model(page, name: str) -> None:
    """Pick ``name`` from the model picker's list (the families' suggestions)."""
    box = page.locator("#cfg-model-name input").first
    box.click()
    box.fill(name)
    page.get_by_role("option", name=name, exact=True).click()
    box.press("Tab")


def shown(page, elem: str) -> bool:
    return page.locator(f"#{elem}").is_visible()


def test_picking_flux_shows_only_the_fields_flux_uses(app_url: str, tmp_path: Path, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app_url)
    page.get_by_role("tab", name="Train").click()
    page.locator("#advanced").get_by_text("Advanced").first.click()
    for _ in range(20):  # every group of Advanced open: hidden means hidden, not folded away
        closed = page.locator("#advanced button.label-wrap:not(.open)")
        if not closed.count():
            break
        closed.first.click()
        page.wait_for_timeout(200)
    assert all(shown(page, e) for e in SD_ONLY) and not any(shown(page, e) for e in FLOW_ONLY)  # SD1 first

    pick_model(page, "builtin:tiny-flux")
    page.locator("#model-facts").get_by_text("FLUX.1 [dev]").wait_for(timeout=QUICK)
    page.wait_for_function("ids => ids.every(id => { const e = document.getElementById(id); "
                           "return !e || e.offsetParent === null; })", arg=SD_ONLY, timeout=QUICK)
    page.screenshot(path=str(tmp_path / "flux-form.png"), full_page=True)
    assert not any(shown(page, e) for e in SD_ONLY)
    assert all(shown(page, e) for e in FLOW_ONLY)
    assert shown(page, "cfg-lora-rank") and shown(page, "cfg-model-quantize")
    assert page.locator("#kind-preset").inner_text() == "Use the FLUX.1 [dev] preset (flux-style)"

    pick_model(page, "builtin:tiny")
    page.locator("#model-facts").get_by_text("SD1.x").wait_for(timeout=QUICK)
    page.locator("#cfg-train-min-snr-gamma").wait_for(state="visible", timeout=QUICK)
    assert all(shown(page, e) for e in SD_ONLY) and not any(shown(page, e) for e in FLOW_ONLY)
    assert errors == []
