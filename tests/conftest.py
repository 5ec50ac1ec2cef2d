"""Shared fixtures: tiny datasets drawn in code, and a runner for the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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


def tiny_config(data: Path, out: Path, **overrides: object):
    from stylelora.config import Config

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
