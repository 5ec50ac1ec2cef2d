"""The README's test command on a machine without Chromium: the browser tests skip with one line saying how to
install it, and under STYLELORA_REQUIRE_BROWSER=1 (which .ci/run sets) they fail instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BROWSER_TESTS = ["tests/test_browser.py", "tests/test_browser_second_click.py"]
OTHER = "tests/test_families.py::test_the_kind_test_finds_what_it_looks_for"  # the rest of the suite, in short


def pytest_without_chromium(**env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "STYLELORA_CHROMIUM": "/nonexistent/chromium", **env}
    if "STYLELORA_REQUIRE_BROWSER" not in env:  # as on a developer's machine
        environ.pop("STYLELORA_REQUIRE_BROWSER", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *BROWSER_TESTS, OTHER], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=600)


def test_browser_tests_skip_with_one_line_saying_how_to_install_chromium() -> None:
    r = pytest_without_chromium()
    assert r.returncode == 0, r.stdout[-3000:]
    said = [line for line in r.stdout.splitlines() if "chromium" in line.lower()]
    assert len(said) == 1, r.stdout[-3000:]
    assert said[0].startswith("6 browser tests skipped: no Chromium that runs here (/nonexistent/chromium)")
    assert "apt-get install chromium" in said[0]
    assert "playwright" not in r.stdout.lower() and "1 passed, 6 deselected" in r.stdout


def test_ci_fails_instead_of_skipping_them() -> None:
    r = pytest_without_chromium(STYLELORA_REQUIRE_BROWSER="1")
    assert r.returncode == 1 and " skipped" not in r.stdout.splitlines()[-1]
    assert "browser tests required (STYLELORA_REQUIRE_BROWSER=1)" in r.stdout
    assert "STYLELORA_REQUIRE_BROWSER=1" in (ROOT / ".ci" / "run").read_text()
