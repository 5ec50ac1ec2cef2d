"""TrainingJob: one training at a time in a worker thread, the history of its events, and a queue.

A shell (the GUI) starts a run and then follows its events; following can stop and start again
(a closed and reopened browser) without touching the run, because the job keeps every event of
the current run. A second start while a run is going is refused with ``Busy``; runs added to the
queue start one after another, each in its own run folder (chosen when it starts), and the queue is
kept in a file, so it survives the app's restart. During a run, ``request("sample")`` and
``request("checkpoint")`` ask the loop for samples or a checkpoint at the end of the current step.

The runner is pluggable: any callable ``runner(config, on_event=..., stop=..., requests=...)`` that
reports events and returns when the run ends (``requests`` only if it takes that keyword), so a
runner that trains in other processes is followed the same way.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import events, fileio, metrics
from ..core.config import Config
from ..core.errors import ConfigError, StyleloraError

log = logging.getLogger(__name__)
HISTORY = 20  # finished runs whose events a follower can still read

Runner = Callable[..., Any]  # train(config, on_event=..., stop=..., requests=...)
Prepare = Callable[[Config], Config]  # the config as it will run (paths resolved, a free run folder)


class Busy(StyleloraError):
    """A training is already running."""


@dataclass(frozen=True)
class QueuedRun:
    """A run waiting its turn. ``config`` is as it was asked for; its run folder is chosen when it starts
    (two queued runs of one dataset get outputs/<name> and <name>-2)."""

    id: int
    config: Config

    def describe(self) -> str:
        cfg = self.config
        what = f"{Path(cfg.data.path).name or 'run'} · {cfg.train.steps} steps · {cfg.model.name}"
        if cfg.train.resume:
            return f"{what} · continues {Path(cfg.train.output_dir).name}"
        return f"{what} → {Path(cfg.train.output_dir).name}" if cfg.train.output_dir else what


@dataclass
class Snapshot:
    """The job as a follower sees it: which run, its status, every event so far, and what waits."""

    run_id: int
    status: str  # "idle" | "running" | "finished" | "stopped" | "failed"
    events: list[events.Event]
    error: str = ""
    queue: list[QueuedRun] = field(default_factory=list)
    earlier: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) a resumed run had before

    @property
    def busy(self) -> bool:
        """A run is going, or another is about to start from the queue."""
        return self.status == "running" or bool(self.queue)


class TrainingJob:
    def __init__(self, runner: Runner | None = None, *, prepare: Prepare | None = None,
                 queue_file: str | Path | None = None) -> None:
        if runner is None:
            from ..training.loop import train as runner
        self._runner = runner
        self._prepare = prepare or (lambda config: config)
        self._takes_requests = False  # whether the running run's runner takes "sample now" / "checkpoint now"
        self._cond = threading.Condition()
        self._events: list[events.Event] = []
        self._earlier: list[tuple[int, float]] = []  # the current run's losses before it was resumed
        self._status = "idle"
        self._error = ""
        self._run_id = 0
        self._stop = threading.Event()
        self._requests = events.Requests()
        self._thread: threading.Thread | None = None
        self._queue: list[QueuedRun] = []
        self._next_item = 1
        self._queue_file = Path(queue_file) if queue_file else None
        self._history: dict[int, Snapshot] = {}  # run id -> its last snapshot, for runs the queue replaced
        self._closing = False  # the app is stopping: no queued run starts
        self._interrupted = False  # the app's stop ended the run: it continues first when the app starts again
        self.config: Config | None = None  # the run's config as it runs (or ran)
        self._load_queue()

    @property
    def running(self) -> bool:
        with self._cond:
            return self._status == "running"

    def start(self, config: Config, runner: Runner | None = None) -> int:
        """Start training ``config`` in the background; returns the run id. Raises Busy if one runs,
        and the config's own errors (a missing dataset, a taken run folder) before anything starts.

        ``runner`` replaces the job's own for this run (e.g. ``launch.ProcessRunner`` for several GPUs)."""
        with self._cond:
            if self._status == "running":
                raise Busy(f"a training is already running ({self._where()}); wait for it to finish, press "
                           "Stop, or add this one to the queue")
            prepared = self._prepare(config)
            return self._launch(prepared, runner=runner)

    # --- the queue ----------------------------------------------------------------------------
    def enqueue(self, config: Config) -> int:
        """Add ``config`` to the queue (checked now, as a start would); returns its queue id. With nothing
        running it starts at once."""
        prepared = self._prepare(config)  # refuse a broken config now, not when its turn comes
        taken = self._taken_by(prepared.output_dir) if config.train.output_dir else None
        with self._cond:
            if taken is not None:  # the second would only fail ("already holds a run") when its turn came
                raise ConfigError(f"train.output_dir: '{prepared.output_dir}' is already the run folder of {taken}; "
                                  "give this run another folder, or leave it empty for a new one")
            item = QueuedRun(self._next_item, config)
            self._next_item += 1
            self._queue.append(item)
            if self._status != "running" and not self._closing:
                self._start_next()
            self._save_queue()
            self._cond.notify_all()
            return item.id

    def enqueue_sweep(self, configs: list[Config]) -> list[int]:
        """Queue one run per config of a sweep (``services.sweep.sweep_configs``), all checked before any is
        queued; returns their queue ids."""
        for config in configs:
            self._prepare(config)
        return [self.enqueue(config) for config in configs]

    def _taken_by(self, folder: Path) -> str | None:
        """What already trains into ``folder`` ("the running run", "queued run #3"), or None."""
        with self._cond:
            running = self.config if self._status == "running" else None
            waiting = [item for item in self._queue if item.config.train.output_dir]
        if running is not None and running.output_dir == folder:
            return "the running run"
        for item in waiting:
            try:
                if self._prepare(item.config).output_dir == folder:
                    return f"queued run #{item.id} ({item.describe()})"
            except StyleloraError:  # it cannot start anyway (its dataset went): it takes no folder
                continue
        return None

    def queued(self) -> list[QueuedRun]:
        with self._cond:
            return list(self._queue)

    def move(self, item_id: int, offset: int) -> list[QueuedRun]:
        """Move a queued run ``offset`` places (negative: sooner); returns the queue."""
        with self._cond:
            i = self._index(item_id)
            item = self._queue.pop(i)
            self._queue.insert(max(0, min(len(self._queue), i + offset)), item)
            self._save_queue()
            self._cond.notify_all()
            return list(self._queue)

    def cancel(self, item_id: int) -> QueuedRun:
        """Take a run off the queue (it never starts); returns it."""
        with self._cond:
            item = self._queue.pop(self._index(item_id))
            self._save_queue()
            self._cond.notify_all()
            return item

    def resume_queue(self) -> None:
        """Start the queue's first run if nothing runs (after the app restarts with a saved queue)."""
        with self._cond:
            if self._status != "running" and self._queue and not self._closing:
                self._start_next()
                self._save_queue()

    # --- during a run -------------------------------------------------------------------------
    def stop(self) -> bool:
        """Ask the run to stop after its current step (it still saves a checkpoint and the adapter);
        queued runs still start after it."""
        with self._cond:
            if self._status != "running":
                return False
            self._stop.set()
            self._events.append(events.Message("stop requested; finishing the current step and saving"))
            self._cond.notify_all()
            return True

    def shutdown(self) -> bool:
        """The app is stopping: stop the running run as ``stop`` does (it saves a checkpoint and the adapter;
        ``join`` waits for that), and start nothing more. The queue file keeps the queue, and the interrupted
        run first, so that the next app continues it. Returns whether a run was going."""
        with self._cond:
            self._closing = True
            if self._status != "running":
                return False
            self._interrupted = not self._stop.is_set()  # a run Stop was already ending stays stopped
            self._stop.set()
            self._events.append(events.Message("the app is stopping: finishing the current step and saving; the "
                                               "run continues when the app starts again"))
            self._cond.notify_all()
            return True

    def request(self, kind: str) -> bool:
        """Ask the running loop for ``kind`` ("sample" or "checkpoint") at the end of its current step;
        False when nothing runs, or the run cannot take requests (several processes: only stop reaches them)."""
        with self._cond:
            if self._status != "running" or not self._takes_requests:
                return False
            self._requests.ask(kind)
            what = "samples" if kind == "sample" else "a checkpoint"
            self._events.append(events.Message(f"{what} requested; saved after the current step"))
            self._cond.notify_all()
            return True

    def snapshot(self, run_id: int | None = None) -> Snapshot:
        """The current run (or the finished run ``run_id``, while it is among the last few) as it is now."""
        with self._cond:
            return self._snapshot(run_id)

    def wait(self, seen: int, run_id: int, timeout: float) -> Snapshot:
        """Block until run ``run_id`` has more than ``seen`` events or ends, or ``timeout`` passes; returns
        that run's snapshot (the queue may have started another run since)."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._run_id != run_id or len(self._events) > seen or self._status != "running",
                timeout=timeout,
            )
            return self._snapshot(run_id)

    def follow(self, run_id: int | None = None, *, across_queue: bool = False,
               interval: float = 0.5) -> Iterator[Snapshot]:
        """Snapshots of run ``run_id`` (default: the current one) as it goes, until it ends; with
        ``across_queue``, then of each queued run that starts after it. At most one per ``interval`` seconds
        while a run goes, so the events of fast steps arrive together."""
        snap = self.snapshot(run_id)
        yield snap
        while True:
            if snap.status != "running":
                now = self.snapshot()
                if not across_queue or now.run_id == snap.run_id:
                    return
                snap = now  # the queue started the next run; it may have ended already (failed at once), and
                yield snap  # the queue gone on after it: followed until the last one
                continue
            time.sleep(interval)
            new = self.wait(len(snap.events), snap.run_id, timeout=10.0)
            if len(new.events) != len(snap.events) or new.status != snap.status:
                yield new
            snap = new

    def join(self, timeout: float | None = None) -> None:
        """Wait for the current run's thread to end (not for queued runs)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def join_all(self, timeout: float) -> None:
        """Wait until nothing runs and nothing is queued, or ``timeout`` passes."""
        with self._cond:
            self._cond.wait_for(lambda: self._status != "running" and not self._queue, timeout=timeout)

    # --- worker -------------------------------------------------------------------------------
    def _snapshot(self, run_id: int | None = None) -> Snapshot:
        if run_id is not None and run_id != self._run_id and run_id in self._history:
            return self._history[run_id]
        return Snapshot(self._run_id, self._status, list(self._events), self._error, list(self._queue),
                        self._earlier)

    def _index(self, item_id: int) -> int:
        for i, item in enumerate(self._queue):
            if item.id == item_id:
                return i
        raise StyleloraError(f"queued run #{item_id}: not in the queue (it has started, or was cancelled)")

    def _where(self) -> str:
        last = next((e for e in reversed(self._events) if isinstance(e, events.Progress)), None)
        name = self.config.output_dir.name if self.config else "?"
        return f"{name}, step {last.step}/{last.total_steps}" if last else f"{name}, starting"

    def _launch(self, config: Config, notes: list[events.Event] | None = None, runner: Runner | None = None) -> int:
        """Start the thread of a prepared run (the lock is held); ``runner`` as in ``start``."""
        self._run_id += 1
        self._events, self._status, self._error, self._earlier = list(notes or []), "running", "", []
        self._stop, self._requests = threading.Event(), events.Requests()
        self.config = config
        runner = runner or self._runner
        self._takes_requests = _accepts(runner, "requests")
        self._thread = threading.Thread(
            target=self._work, args=(config, self._run_id, runner),
            name=f"stylelora-train-{self._run_id}", daemon=True,
        )
        self._thread.start()
        self._save_queue()
        self._cond.notify_all()
        return self._run_id

    def _start_next(self) -> None:
        """Start the first queued run that can start (the lock is held); one that cannot is reported in
        the log of the next."""
        notes: list[events.Event] = []
        while self._queue:
            item = self._queue.pop(0)
            try:
                prepared = self._prepare(item.config)
            except StyleloraError as e:
                notes.append(events.Message(f"queued run #{item.id} ({item.describe()}) could not start: {e}",
                                            level="error"))
                continue
            self._launch(prepared, notes)
            return
        if notes:  # nothing could start: the last run's log says why
            self._events.extend(notes)

    def _record(self, event: events.Event) -> None:
        earlier = None
        if isinstance(event, events.Started) and event.start_step > 0:  # a resumed run: its loss so far
            earlier = metrics.losses(Path(event.output_dir) / metrics.METRICS_FILE, event.start_step)
        with self._cond:
            if earlier is not None:
                self._earlier = earlier
            self._events.append(event)
            self._cond.notify_all()

    def _work(self, config: Config, run_id: int, runner: Runner) -> None:
        status, error = "finished", ""
        extra = {"requests": self._requests} if self._takes_requests else {}
        try:
            result = runner(config, on_event=self._record, stop=self._stop, **extra)
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
            self._history[run_id] = self._snapshot()
            for old in sorted(self._history)[:-HISTORY]:
                del self._history[old]
            if not self._closing:
                self._start_next()  # the queue goes on, whatever became of this run
            self._save_queue()
            self._cond.notify_all()

    # --- the queue on disk --------------------------------------------------------------------
    def _save_queue(self) -> None:
        """The queue, and the run that is going, in the queue file (the lock is held)."""
        if self._queue_file is None:
            return
        going = self._status == "running" or (self._interrupted and self._status == "stopped")
        running = self.config.to_toml() if going and self.config is not None else None
        state = {"next_id": self._next_item, "running": running,
                 "queue": [{"id": item.id, "config": item.config.to_toml()} for item in self._queue]}
        try:
            fileio.write_text(self._queue_file, json.dumps(state, indent=1))
        except (OSError, StyleloraError) as e:  # the queue still runs; it just would not survive a restart
            log.warning("could not save the training queue to %s: %s", self._queue_file, e)

    def _load_queue(self) -> None:
        """The saved queue; a run that was going when the app stopped comes first, continuing its folder."""
        path = self._queue_file
        if path is None or not path.is_file():
            return
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            self._next_item = int(state.get("next_id", 1))
            items = [QueuedRun(int(i["id"]), Config.from_toml(i["config"], f"{path} #{i['id']}"))
                     for i in state.get("queue", [])]
            if state.get("running"):
                interrupted = Config.from_toml(state["running"], f"{path} (running)")
                items.insert(0, QueuedRun(self._next_item, interrupted.with_overrides({"train.resume": "auto"})))
                self._next_item += 1
        except (OSError, ValueError, KeyError, TypeError, StyleloraError) as e:
            log.warning("ignoring the saved training queue %s: %s", path, e)
            return
        self._queue = items


def _accepts(fn: Callable[..., Any], keyword: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
