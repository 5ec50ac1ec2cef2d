"""A sweep: one config and a grid of settings (``train.lr=1e-4,3e-4``, ``lora.rank=8,16``) make one run per
combination, each in its own folder under the sweep's folder and scored as it saves (``eval.every_save``), so
``evaluation.compare`` can line their best checkpoints up."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from ..core.config import Config, next_free_run_dir, parse_override
from ..core.errors import ConfigError


def parse_grid(texts: list[str]) -> dict[str, list[Any]]:
    """``["train.lr=1e-4,3e-4", "lora.rank=8,16"]`` -> {"train.lr": [0.0001, 0.0003], "lora.rank": [8, 16]};
    values are read as ``--set`` reads them. ConfigError names a malformed entry."""
    grid: dict[str, list[Any]] = {}
    for text in texts:
        key, sep, values = text.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not items:
            raise ConfigError(f"--grid {text!r}: expected section.field=VALUE,VALUE,..., e.g. train.lr=1e-4,3e-4")
        key = key.strip()
        if key in grid:  # a second --grid for one setting would replace the first
            shown = ",".join(_shown(v) for v in grid[key]) + "," + ",".join(items)
            raise ConfigError(f"--grid: {key} is given twice; put its values in one --grid {key}={shown}")
        parsed = [parse_override(f"{key}={item}")[1] for item in items]
        twice = next((item for n, item in enumerate(items) if parsed[n] in parsed[:n]), None)
        if twice is not None:  # two runs of the same settings would share one folder name
            raise ConfigError(f"--grid {text!r}: {twice} is given twice; each value makes one run")
        grid[key] = parsed
    if not grid:
        raise ConfigError("--grid: give at least one, e.g. --grid train.lr=1e-4,3e-4,1e-3")
    return grid


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep_folder(base: Path) -> Path:
    """A new folder for a sweep: ``base`` (``outputs/<dataset>-sweep``), or ``base-2``, ``-3``, ... when that
    holds something already."""
    folder, n = base, 2
    while folder.exists() and any(folder.iterdir()):
        folder, n = base.with_name(f"{base.name}-{n}"), n + 1
    return folder


def sweep_configs(config: Config, grid: dict[str, list[Any]], folder: Path) -> list[tuple[str, Config]]:
    """One (label, config) per combination of ``grid``, in order: the label names the values
    (``lr0.0001-rank8``) and is the run's folder under ``folder``; every run is scored as it saves. Each
    config is checked now (ConfigError names the setting)."""
    runs = []
    for values in itertools.product(*grid.values()):
        changes = dict(zip(grid, values, strict=True))
        label = "-".join(f"{key.rsplit('.', 1)[-1]}{_shown(v)}" for key, v in changes.items())
        label = "".join(c if c.isalnum() or c in ".-_" else "_" for c in label)
        out = next_free_run_dir(folder / label)
        runs.append((label, config.with_overrides({**changes, "train.output_dir": str(out), "train.resume": "",
                                                   "eval.every_save": True})))
    return runs
