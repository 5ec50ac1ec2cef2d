"""A run's metrics log: ``metrics.jsonl`` (one JSON object per logged step) and the tracker beside it.

The tracker (accelerate's ``Accelerator.log``, which writes TensorBoard events under ``logs/``) gets the
curves worth plotting; the JSON lines keep every field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .fileio import write_text

TRACKED = ("loss", "lr", "val_loss")
METRICS_FILE = "metrics.jsonl"  # in a run folder
Tracker = Callable[..., Any]  # called as tracker(values, step=step)


class MetricsLog:
    """Appends records to ``path``; a resumed run first drops the lines past its checkpoint."""

    def __init__(self, path: Path, resume_step: int = 0, tracker: Tracker | None = None) -> None:
        self.path, self.tracker = path, tracker
        truncate_after(path, resume_step)

    def write(self, record: dict[str, float]) -> None:
        """Append ``record`` (it has a "step") as one line and hand the tracked curves to the tracker."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker({k: v for k, v in record.items() if k in TRACKED}, step=record["step"])


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log matches the resumed run.

    A kill can cut the last line short; such a line is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def losses(path: Path, up_to: int) -> list[tuple[int, float]]:
    """(step, loss) of each logged step up to ``up_to`` in a run's metrics log (what a resumed run had
    trained before); lines that do not read are skipped, a missing log gives []."""
    if not path.is_file():
        return []
    found: dict[int, float] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            step, loss = int(record["step"]), float(record["loss"])
        except (ValueError, KeyError, TypeError):
            continue
        if step <= up_to:
            found[step] = loss
    return sorted(found.items())
