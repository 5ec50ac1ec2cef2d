"""A run on several GPUs from a program (the app): ``accelerate launch`` in a subprocess, followed by its events.

``ProcessRunner(processes)`` has the shape of ``train.train`` (config, on_event, stop) -> result, so a
``TrainingJob`` runs it in its thread like a run in the app's own process. It writes the config as TOML
and starts ``accelerate launch --multi_gpu --num_processes N -m stylelora train CONFIG --json-events
--stop-file F``: the main process writes the run folder exactly as ``stylelora train`` does and prints
one JSON line per event, which the runner turns back into events. A stop request creates the stop
file; every process then ends after the same step and the main one saves, as on Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..core import events
from ..core.config import Config
from ..core.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding this stylelora package
STDERR_LINES = 40  # kept to explain a failed launch


@dataclass
class LaunchResult:
    """What ``train.train`` returns, as far as the events of the launched run tell it."""

    output_dir: Path | None
    steps: int
    stopped_early: bool
    adapter_paths: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def launch_command(processes: int, config_file: Path, stop_file: Path, python: str = sys.executable) -> list[str]:
    """The command line that trains ``config_file`` in ``processes`` processes, one per GPU."""
    return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",  # the config decides these
            "-m", "stylelora", "train", str(config_file), "--json-events", "--stop-file", str(stop_file)]


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def runner_for(gpus: int, visible: int | None = None) -> ProcessRunner | None:
    """The runner of a run on ``gpus`` GPUs: None (the caller's own, in-process) for one, else a
    ``ProcessRunner`` with one process per GPU; more GPUs than are visible is refused."""
    if gpus <= 1:
        return None
    visible = visible_gpus() if visible is None else visible
    if gpus > visible:
        raise ConfigError(f"GPUs: {gpus} were asked for, but {visible} CUDA device(s) are visible; pick 1 to {visible}")
    return ProcessRunner(gpus)


class ProcessRunner:
    """Trains in ``processes`` processes through ``accelerate launch``; see the module's docstring."""

    def __init__(self, processes: int, python: str = sys.executable) -> None:
        self.processes, self.python = processes, python

    def __call__(self, config: Config, on_event: events.EventHandler | None = None,
                 stop: threading.Event | Callable[[], bool] | None = None) -> LaunchResult:
        emit = on_event or (lambda _e: None)
        with tempfile.TemporaryDirectory(prefix="stylelora-launch-") as tmp:
            config_file, stop_file = Path(tmp) / "config.toml", Path(tmp) / "stop"
            config.save(config_file)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p))
            proc = subprocess.Popen(launch_command(self.processes, config_file, stop_file, self.python), env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, bufsize=1)
            assert proc.stdout is not None and proc.stderr is not None
            stderr: deque[str] = deque(maxlen=STDERR_LINES)
            readers = [threading.Thread(target=_collect, args=(proc.stderr, stderr), daemon=True),
                       threading.Thread(target=_stop_when_asked, args=(proc, stop, stop_file), daemon=True)]
            for reader in readers:
                reader.start()
            result = LaunchResult(None, 0, False)
            for line in proc.stdout:
                event = _event(line)
                if event is not None:
                    _note(result, event)
                    emit(event)
            proc.wait()
            readers[0].join(timeout=10)
        if proc.returncode != 0:
            errors = [line for line in stderr if line.startswith("error")]
            raise TrainingError("\n".join(errors) if errors else
                                f"the {self.processes}-process run failed (exit status {proc.returncode}):\n"
                                + "\n".join(stderr))
        return result


def _event(line: str) -> events.Event | None:
    """The event a line of the run's stdout stands for; None for any other output."""
    try:
        return events.from_record(json.loads(line))
    except ValueError:  # json.JSONDecodeError too
        if line.strip():
            log.info("launched run: %s", line.rstrip())
        return None


def _note(result: LaunchResult, event: events.Event) -> None:
    if isinstance(event, events.Started):
        result.output_dir = Path(event.output_dir)
    elif isinstance(event, events.Progress):
        result.steps = event.step
        result.losses.append(event.loss)
    elif isinstance(event, events.Finished):
        result.steps, result.stopped_early = event.step, event.stopped_early
        result.adapter_paths = list(event.adapter_paths)


def _collect(stream: IO[str], lines: deque[str]) -> None:
    for line in stream:
        lines.append(line.rstrip())


def _stop_when_asked(proc: subprocess.Popen[Any], stop: threading.Event | Callable[[], bool] | None,
                     stop_file: Path) -> None:
    """Create ``stop_file`` once ``stop`` is set (the run polls it after every step)."""
    if stop is None:
        return
    asked = stop.is_set if isinstance(stop, threading.Event) else stop
    while proc.poll() is None:
        if asked():
            stop_file.touch()
            return
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
