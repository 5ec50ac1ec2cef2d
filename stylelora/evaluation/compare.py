"""Runs side by side: each run's best checkpoint and its scores, with the settings that differ between the runs
(``stylelora compare``, the end of ``stylelora sweep``, the app's Runs panel). A folder that is not a run but
holds runs (a sweep's) stands for those runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import Config
from ..core.errors import ConfigError
from .runner import RunScores
from .scores import COLUMNS

IGNORED = ("train.output_dir", "train.resume")  # where a run went, not how it trained


@dataclass
class RunRow:
    path: Path
    config: Config
    scores: RunScores | None  # None: the run was not evaluated (yet)

    @property
    def name(self) -> str:
        return self.path.name


def expand_runs(paths: Sequence[str | Path]) -> list[Path]:
    """The run folders ``paths`` name: a run folder itself, or each run in a folder of runs (a sweep's)."""
    runs: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if (path / "config.toml").is_file():
            runs.append(path)
            continue
        if not path.exists():
            raise ConfigError(f"{path}: no such folder; give a run folder stylelora train wrote (outputs/NAME)")
        inside = sorted(p.parent for p in path.glob("*/config.toml")) if path.is_dir() else []
        if not inside:
            raise ConfigError(f"{path}: not a run folder (no config.toml) and no run folders inside it")
        runs.extend(inside)
    return runs


def compare_runs(paths: Sequence[str | Path]) -> list[RunRow]:
    return [RunRow(run, Config.load(run / "config.toml"), RunScores.load(run)) for run in expand_runs(paths)]


def _flat(config: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, fields in config.to_dict().items() for k, v in fields.items()}


def differing(rows: Sequence[RunRow]) -> list[str]:
    """The settings whose values differ between the runs (what a sweep varied), in config order."""
    flats = [_flat(r.config) for r in rows]
    keys = list(flats[0]) if flats else []
    return [k for k in keys if k not in IGNORED and len({repr(f.get(k)) for f in flats}) > 1]


def comparison(rows: Sequence[RunRow]) -> list[dict[str, Any]]:
    """One object per run: its settings that differ, its best checkpoint and that checkpoint's scores."""
    keys = differing(rows)
    out = []
    for row in rows:
        best = row.scores.best if row.scores is not None else None
        flat = _flat(row.config)
        out.append({"run": str(row.path), "settings": {k: flat.get(k) for k in keys},
                    "best": best.label if best else None, "step": best.step if best else None,
                    "scores": {c: getattr(best, c) for c in COLUMNS} if best else None,
                    "copied": best.copied if best else None})
    return out


def format_comparison(rows: Sequence[RunRow]) -> str:
    """The comparison as an aligned text table; a run without scores says "not evaluated"."""
    keys = differing(rows)
    data = comparison(rows)
    shown = [c for c in COLUMNS if any(d["scores"] and d["scores"][c] is not None for d in data)]
    header = ["run", *keys, "best", *shown]
    lines = [header]
    for d in data:
        settings = [str(d["settings"][k]) for k in keys]
        if d["scores"] is None:
            lines.append([Path(d["run"]).name, *settings, "not evaluated", *["-"] * len(shown)])
            continue
        cells = []
        for c in shown:
            value = d["scores"][c]
            cells.append("-" if value is None else (f"{value:.4f}" if c == "val_loss" else f"{value:.2f}")
                         + ("!" if c == "copying" and d["copied"] else ""))
        lines.append([Path(d["run"]).name, *settings, d["best"], *cells])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join("  ".join(cell.ljust(w) if i <= len(keys) + 1 else cell.rjust(w)
                                for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip()
                      for line in lines)
    return table
