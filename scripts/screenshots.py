"""Refresh the screenshots of the app's tabs in docs/ (tab-dataset.png, tab-train.png, tab-preview.png,
tab-export.png): the app on a throwaway copy of the example dataset, in Debian's Chromium, after a short
run on builtin:tiny, a preview, a dataset check, an export and a merge.

    .venv/bin/python scripts/screenshots.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gui_server import launch, make_root  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
WIDTH = 1280


def settle(page, ms: int = 1200) -> None:
    page.wait_for_timeout(ms)


def main() -> int:
    root = make_root(Path(tempfile.mkdtemp(prefix="stylelora-shots-")) / "root")
    demo, ctx, url = launch(root)
    docs = ROOT / "docs"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            page.goto(url)
            page.get_by_role("tab", name="Train").click()
            steps = page.locator("#cfg-train-steps input").first
            steps.fill("10")
            steps.press("Tab")
            page.locator("#start-training").click()
            page.locator('#train-progress[data-status="finished"]').wait_for(timeout=600_000)
            page.locator("#advanced").get_by_text("Advanced").first.click()
            settle(page)
            page.screenshot(path=str(docs / "tab-train.png"), full_page=True)

            page.get_by_role("tab", name="Dataset").click()
            settle(page)
            page.locator("#dataset-images .thumbnail-item").nth(2).click()
            page.locator("#check-data").click()
            page.get_by_text("ready to train").first.wait_for(timeout=120_000)
            settle(page)
            page.screenshot(path=str(docs / "tab-dataset.png"), full_page=True)

            page.get_by_role("tab", name="Preview").click()
            page.wait_for_function(
                "() => (document.querySelector('#adapter input') || {}).value?.endsWith('.safetensors')",
                timeout=60_000)
            page.locator("#generate").click()
            page.locator("#lora-image img").wait_for(timeout=300_000)
            page.get_by_role("button", name="Strength sweep").click()
            page.locator("#sweep-image img").wait_for(timeout=300_000)
            settle(page)
            page.screenshot(path=str(docs / "tab-preview.png"), full_page=True)

            page.get_by_role("tab", name="Export").click()
            settle(page)
            page.locator("#export").click()
            page.get_by_text("verified: reloaded").first.wait_for(timeout=300_000)
            page.get_by_text("Merge into the base model").click()
            page.locator("#merge").click()
            page.get_by_text("merged model written to").first.wait_for(timeout=600_000)
            settle(page)
            page.screenshot(path=str(docs / "tab-export.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
    for name in ("dataset", "train", "preview", "export"):
        print(docs / f"tab-{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
