"""TrainingJob: one training at a time in a worker thread, with the history of its events.

A shell (the GUI) starts a run and then follows its events; following can stop and start again
(a closed and reopened browser) without touching the run, because the job keeps every event of
the current run. A second start while a run is going is refused with ``Busy``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import events
from .config import Config
from .errors import StyleloraError

log = logging.getLogger(__name__)

Runner = Callable[..., Any]  # train(config, on_event=..., stop=...)


class Busy(StyleloraError):
    """A training is already running."""


@dataclass
class Snapshot:
    """The job as a follower sees it: which run, its status, and every event so far."""

    run_id: int
    status: str  # "idle" | "running" | "finished" | "stopped" | "failed"
    events: list[events.Event]
    error: str = ""


class TrainingJob:
    def __init__(self, runner: Runner | None = None) -> None:
        if runner is None:
            from .train import train as runner
        self._runner = runner
        self._cond = threading.Condition()
        self._events: list[events.Event] = []
        self._status = "idle"
        self._error = ""
        self._run_id = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.config: Config | None = None

    @property
    def running(self) -> bool:
        with self._cond:
            return self._status == "running"

    def start(self, config: Config, runner: Runner | None = None) -> int:
        """Start training ``config`` in the background; returns the run id. Raises Busy if one runs.

        ``runner`` replaces the job's own for this run (e.g. ``launch.ProcessRunner`` for several GPUs)."""
        with self._cond:
            if self._status == "running":
                raise Busy(f"a training is already running ({self._where()}); wait for it to finish or press Stop")
            self._run_id += 1
            self._events, self._status, self._error = [], "running", ""
            self._stop = threading.Event()
            self.config = config
            self._thread = threading.Thread(
                target=self._work, args=(config, self._run_id, runner or self._runner),
                name=f"stylelora-train-{self._run_id}", daemon=True,
            )
            self._thread.start()
            self._cond.notify_all()
            return self._run_id

    def stop(self) -> bool:
        """Ask the run to stop after its current step (it still saves a checkpoint and the adapter)."""
        with self._cond:
            if self._status != "running":
                return False
            self._stop.set()
            self._events.append(events.Message("stop requested; finishing the current step and saving"))
            self._cond.notify_all()
            return True

    def snapshot(self) -> Snapshot:
        with self._cond:
            return Snapshot(self._run_id, self._status, list(self._events), self._error)

    def wait(self, seen: int, run_id: int, timeout: float) -> Snapshot:
        """Block until the run has more than ``seen`` events, ends, or is replaced, or ``timeout`` passes."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._run_id != run_id or len(self._events) > seen or self._status != "running",
                timeout=timeout,
            )
            return Snapshot(self._run_id, self._status, list(self._events), self._error)

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # --- worker -------------------------------------------------------------------------------
    def _where(self) -> str:
        last = next((e for e in reversed(self._events) if isinstance(e, events.Progress)), None)
        name = self.config.output_dir.name if self.config else "?"
        return f"{name}, step {last.step}/{last.total_steps}" if last else f"{name}, starting"

    def _record(self, event: events.Event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def _work(self, config: Config, run_id: int, runner: Runner) -> None:
        status, error = "finished", ""
        try:
            result = runner(config, on_event=self._record, stop=self._stop)
            if getattr(result, "stopped_early", False):
                status = "stopped"
        except StyleloraError as e:
            status, error = "failed", str(e)
        except Exception as e:  # a bug or a library failure: keep the app alive and say what happened
            log.exception("training run %d failed", run_id)
            status, error = "failed", f"training failed: {type(e).__name__}: {e}"
        with self._cond:
            if error:
                self._events.append(events.Message(error, level="error"))
            self._status, self._error = status, error
            self._cond.notify_all()
