"""Shared fixtures: tiny datasets drawn in code, a runner for the real CLI in a subprocess, and adapters
made and checked as the loaders apply them."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def draw_image(path: Path, size: tuple[int, int] = (96, 80), seed: int = 0, mode: str = "RGB") -> Path:
    """A small seeded picture: a coloured background with a rectangle, saved as ``path``."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:] = rng.integers(0, 255, 3)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 255, 3)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def make_dataset(folder: Path, n: int = 4, size: tuple[int, int] = (96, 80)) -> Path:
    for i in range(n):
        draw_image(folder / f"img{i}.png", size, seed=i)
        (folder / f"img{i}.txt").write_text(f"a picture number {i}, flat style\n", encoding="utf-8")
    return folder


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m stylelora ARGS`` as a user would; returns the finished process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "stylelora", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# --- the browser tests' Chromium -------------------------------------------------------------------------

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
NO_CHROMIUM = ("browser tests skipped: no Chromium that runs here ({tried}); install Debian's with "
               "'apt-get install chromium' (or name one in STYLELORA_CHROMIUM) to run them")


@functools.cache
def chromium_path() -> tuple[str | None, str]:
    """(the Chromium the browser tests drive, or None; what was tried): $STYLELORA_CHROMIUM, else chromium or
    chromium-browser on the PATH, else /usr/bin/chromium, each only if ``--version`` runs (Ubuntu's
    chromium-browser can be a stub that asks for a snap)."""
    named = os.environ.get("STYLELORA_CHROMIUM")
    candidates = [named] if named else [shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"]
    tried = [c for c in dict.fromkeys(candidates) if c]
    for path in tried:
        try:
            if subprocess.run([path, "--version"], capture_output=True, timeout=60).returncode == 0:
                return path, ", ".join(tried)
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None, ", ".join(tried) or "nothing"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a Chromium the browser tests (those using the ``chromium`` fixture) are left out and the summary
    says so in one line; with STYLELORA_REQUIRE_BROWSER=1 they stay, and the fixture fails them."""
    browser = [item for item in items if "chromium" in getattr(item, "fixturenames", ())]
    if not browser or os.environ.get("STYLELORA_REQUIRE_BROWSER") == "1" or chromium_path()[0] is not None:
        return
    config.hook.pytest_deselected(items=browser)
    items[:] = [item for item in items if item not in browser]
    config.stash[_BROWSER_NOTE] = f"{len(browser)} " + NO_CHROMIUM.format(tried=chromium_path()[1])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if _BROWSER_NOTE in config.stash:
        terminalreporter.write_line(config.stash[_BROWSER_NOTE])


_BROWSER_NOTE = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium executable for Playwright. Without one the browser tests skip with one line saying how to
    install it; with STYLELORA_REQUIRE_BROWSER=1 (.ci/run sets it) they fail instead, so CI never passes by
    skipping them."""
    path, tried = chromium_path()
    if path is None:
        message = NO_CHROMIUM.format(tried=tried)
        if os.environ.get("STYLELORA_REQUIRE_BROWSER") == "1":
            pytest.fail(message.replace("skipped", "required (STYLELORA_REQUIRE_BROWSER=1)"), pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture
def browser(chromium: str):
    """A Chromium launched through Playwright for one test, closed after it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def tiny_config(data: Path, out: Path, **overrides: object):
    from stylelora.core.config import Config

    base = {
        "model.name": "builtin:tiny",
        "data.path": str(data),
        "data.resolution": 64,
        "train.output_dir": str(out),
        "train.steps": 3,
        "lora.rank": 4,
        "lora.alpha": 4.0,
    }
    base.update(overrides)
    return Config().with_overrides(base)


# --- adapters: made by peft as training makes them, and checked as loaders apply them ---------------


def make_adapter(kind: str = "tiny", rank: int = 4, alpha: float = 2.0, conv_rank: int = 0, conv_alpha: float = 1.0,
                 te: bool = True, dora: bool = False, seed: int = 0, with_model: bool = False):
    """A LoRA (optionally LoCon over what kohya's conv_dim covers, optionally DoRA) with random non-zero
    weights, injected by peft exactly as training does, read back through lora_state/lora_alphas."""
    from peft import LoraConfig, inject_adapter_in_model

    from stylelora.adapters.adapter import Adapter
    from stylelora.core.config import TEXT_ENCODER_TARGETS
    from stylelora.families import load_base_model
    from stylelora.model.blocks import LOCON_KXK_TARGETS, LOCON_TARGETS, UNET_TARGETS
    from stylelora.model.lora import lora_alphas, lora_state

    model = load_base_model(f"builtin:{kind}")
    unet_targets = list(UNET_TARGETS) + (LOCON_TARGETS if conv_rank else [])
    pattern = dict.fromkeys(LOCON_KXK_TARGETS, conv_rank) if conv_rank else {}
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=unet_targets, rank_pattern=pattern,
                     alpha_pattern={k: conv_alpha for k in pattern}, use_dora=dora)
    inject_adapter_in_model(cfg, model.unet, adapter_name="default")
    if te:
        for part, module in model.parts():
            if part.startswith("text_encoder"):
                te_cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_ENCODER_TARGETS, use_dora=dora)
                inject_adapter_in_model(te_cfg, module, adapter_name="default")
    gen = torch.Generator().manual_seed(seed)
    for _, module in model.parts():
        for name, p in module.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.2
    adapter = Adapter.from_module_alphas(lora_state(model), lora_alphas(model))
    return (adapter, model) if with_model else adapter


@contextmanager
def captured_logs():
    """Every log record and Python warning the libraries emit while loading."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records
    records += [str(w.message) for w in caught]
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def assert_loaded_cleanly(records: list[str]) -> None:
    bad = [r for r in records if any(s in r.lower() for s in ("unexpected", "missing", "no lora keys", "not loaded"))]
    assert bad == []


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_diffusers_fuses_exactly(path: Path, adapter, model) -> None:
    """diffusers' own load_lora_weights takes the file with no missing or unexpected key, every part gets the
    adapter, and fuse_lora at 1 moves each weight by exactly its delta (``assert_fused_delta``)."""
    before = {part: weights(module) for part, module in model.parts()}
    with captured_logs() as records:
        model.pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="style")
    assert_loaded_cleanly(records)
    assert set(model.pipeline.get_list_adapters()) == {part for part, _ in model.parts()}
    # every part named: FLUX.1's loader fuses only the transformer unless told
    model.pipeline.fuse_lora(components=[part for part, _ in model.parts()], lora_scale=1.0)
    model.pipeline.unload_lora_weights()
    assert_fused_delta(adapter, model, before)


def assert_fused_delta(adapter, model, before: dict, scale: float = 1.0) -> None:
    """After fuse_lora + unload, each adapted weight moved by exactly scale*alpha/rank*up@down, the rest not at all."""
    for part, module in model.parts():
        after = weights(module)
        changed = set()
        for path in adapter.modules(part):
            down = adapter.state[part][f"{path}.lora_A.weight"]
            up = adapter.state[part][f"{path}.lora_B.weight"]
            expected = (up.flatten(1) @ down.flatten(1)).reshape(before[part][f"{path}.weight"].shape)
            expected = expected * scale * adapter.alpha_of(part, path) / down.shape[0]
            delta = after[f"{path}.weight"] - before[part][f"{path}.weight"]
            torch.testing.assert_close(delta, expected, atol=2e-6, rtol=1e-4, msg=f"{part} {path}")
            changed.add(f"{path}.weight")
        assert changed, part
        for name, value in after.items():
            if name not in changed:
                assert torch.equal(value, before[part][name]), f"{part} {name} changed"
