"""What the Train tab shows of a training job: the progress line, the loss curve, the samples, the run log
and the queue table, each made from a ``jobs.Snapshot`` (no widgets here, and no state)."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import pandas as pd

from stylelora.core import events
from stylelora.services.jobs import QueuedRun, Snapshot

from .words import gui_words

LOG_LINES = 300
QUEUE_HEADERS = ["#", "run", "status"]


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _log_line(e: events.Event, shown: Callable[[Any], str] = str) -> str | None:
    """One line of the run log; ``shown`` writes a path as the page shows it (relative to the workspace)."""
    if isinstance(e, events.Started):
        where = e.device if e.processes == 1 else f"{e.device} with {e.processes} processes"
        return (f"started: {e.num_images} images on {where} (effective batch {e.effective_batch}), "
                f"steps {e.start_step}->{e.total_steps}, run folder {shown(e.output_dir)}")
    if isinstance(e, events.Message):
        return f"{e.level}: {gui_words(e.text)}"
    if isinstance(e, events.Estimated):
        return ("" if e.fits else "warning: ") + e.summary
    if isinstance(e, events.SampleSaved):
        return f"step {e.step}: {len(e.paths)} sample(s) saved"
    if isinstance(e, events.CheckpointSaved):
        return f"step {e.step}: checkpoint {shown(e.path)}"
    if isinstance(e, events.AdapterSaved):
        return f"step {e.step}: adapter " + ", ".join(shown(p) for p in e.paths)
    if isinstance(e, events.Finished):
        return f"{'stopped' if e.stopped_early else 'finished'} at step {e.step}: {shown(e.output_dir)}"
    return None


E = TypeVar("E", bound=events.Event)


def first_event(snap: Snapshot, kind: type[E]) -> E | None:
    return next((e for e in snap.events if isinstance(e, kind)), None)


def _last(snap: Snapshot, kind: type[E]) -> E | None:
    return next((e for e in reversed(snap.events) if isinstance(e, kind)), None)


def _position(snap: Snapshot) -> tuple[int, int]:
    """(step, total steps) of the job: from its last progress, else from its start, else (0, 0)."""
    last, started = _last(snap, events.Progress), first_event(snap, events.Started)
    if last:
        return last.step, last.total_steps
    return (started.start_step, started.total_steps) if started else (0, 0)


def _status_text(snap: Snapshot) -> str:
    last, started = _last(snap, events.Progress), first_event(snap, events.Started)
    if snap.status == "idle":
        text = "no training yet: pick a preset or fill the form, then Start"
    elif last:
        eta = _clock(last.eta_s) if snap.status == "running" else "0:00"
        text = (f"step {last.step}/{last.total_steps} · loss {last.loss:.4f} · {last.images_per_s:.2f} images/s · "
                f"elapsed {_clock(last.elapsed_s)} · ETA {eta}")
    else:
        text = "loading the model and data…" if snap.status == "running" else ""
    if started:
        text = f"{Path(started.output_dir).name}: {text}"
    if snap.queue:
        text += f" · {len(snap.queue)} queued"
    return text + (f" — {gui_words(snap.error)}" if snap.error else "")


def _log(snap: Snapshot, shown: Callable[[Any], str] = str) -> list[str]:
    """The last LOG_LINES lines of the run log."""
    return [line for e in snap.events if (line := _log_line(e, shown))][-LOG_LINES:]


def render(snap: Snapshot, shown: Callable[[Any], str] = str) -> tuple[str, pd.DataFrame, list[tuple[str, str]], str]:
    """(progress HTML, loss table, samples, log) of a job snapshot; ``shown`` writes paths in the log."""
    step, total = _position(snap)
    pct = 100.0 * step / total if total else 0.0
    progress_html = (
        f'<div id="train-progress" data-status="{snap.status}" data-step="{step}" data-run="{snap.run_id}">'
        f'<div style="display:flex;justify-content:space-between"><b>{snap.status}</b>'
        f'<span>{html.escape(_status_text(snap))}</span></div>'
        f'<div style="background:var(--neutral-200,#ddd);border-radius:4px;height:12px;margin-top:4px">'
        f'<div style="width:{pct:.1f}%;height:12px;border-radius:4px;background:var(--color-accent,#f97316)">'
        f"</div></div></div>"
    )
    progress = [e for e in snap.events if isinstance(e, events.Progress)]
    curve = snap.earlier + [(p.step, p.loss) for p in progress]  # a continued run's loss so far comes first
    losses = pd.DataFrame({"step": [step for step, _ in curve], "loss": [loss for _, loss in curve]})
    samples = [(str(path), f"step {e.step}: {prompt}") for e in snap.events if isinstance(e, events.SampleSaved)
               for path, prompt in zip(e.paths, e.prompts, strict=False)]
    return progress_html, losses, samples[::-1], "\n".join(_log(snap, shown))


def summary(snap: Snapshot) -> dict[str, Any]:
    """The job as plain JSON (what the ``train_toml`` API streams)."""
    last, started = _last(snap, events.Progress), first_event(snap, events.Started)
    finished = first_event(snap, events.Finished)
    return {
        "status": snap.status,
        "step": last.step if last else 0,
        "total_steps": _position(snap)[1],
        "loss": last.loss if last else None,
        "output_dir": str(started.output_dir) if started else "",
        "adapters": [str(p) for p in finished.adapter_paths] if finished else [],
        "error": gui_words(snap.error),
        "log": _log(snap),
    }


def queue_rows(queue: list[QueuedRun], snap: Snapshot | None = None) -> pd.DataFrame:
    """The queue as the Train tab's table: the running run first, then what waits, in order."""
    rows = []
    started = first_event(snap, events.Started) if snap is not None and snap.status == "running" else None
    if started is not None:
        step, total = _position(snap)
        rows.append(["▶", Path(started.output_dir).name, f"running, step {step}/{total}"])
    rows += [[item.id, item.describe(), "waiting" if i else "next"] for i, item in enumerate(queue)]
    return pd.DataFrame(rows, columns=QUEUE_HEADERS)


def queue_choices(queue: list[QueuedRun], current: Any = None) -> Any:
    choices = [(f"#{item.id} · {item.describe()}", item.id) for item in queue]
    ids = [item.id for item in queue]
    return gr.update(choices=choices, value=current if current in ids else (ids[0] if ids else None))
