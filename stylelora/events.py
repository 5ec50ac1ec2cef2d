"""Events the trainer reports, and the requests it takes. Shells (CLI, GUI) render the events; the library
never prints. Stop comes in as a signal; "sample now" and "save a checkpoint now" as ``Requests``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Started:
    total_steps: int
    start_step: int
    num_images: int
    device: str
    output_dir: Path


@dataclass
class Progress:
    step: int
    total_steps: int
    loss: float
    lr: float
    images_per_s: float
    elapsed_s: float
    eta_s: float


@dataclass
class Message:
    """A plain line worth showing the user (skipped files, advice, resume info)."""

    text: str
    level: str = "info"


@dataclass
class Validation:
    """Loss on the held-out images (fixed noise and timesteps, so steps compare)."""

    step: int
    loss: float


@dataclass
class SampleSaved:
    step: int
    paths: list[Path]
    prompts: list[str]


@dataclass
class CheckpointSaved:
    step: int
    path: Path


@dataclass
class AdapterSaved:
    step: int
    paths: list[Path]


@dataclass
class Finished:
    step: int
    stopped_early: bool
    output_dir: Path
    adapter_paths: list[Path] = field(default_factory=list)


class Requests:
    """What a shell asks of a running loop besides stopping: ``sample`` (render the samples now) and
    ``checkpoint`` (save a resumable checkpoint now). The loop takes each at the end of its current step;
    asking twice before then is one request."""

    KINDS = ("sample", "checkpoint")

    def __init__(self) -> None:
        self._asked: set[str] = set()
        self._lock = threading.Lock()

    def ask(self, kind: str) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown request {kind!r}; one of {', '.join(self.KINDS)}")
        with self._lock:
            self._asked.add(kind)

    def take(self, kind: str) -> bool:
        """Whether ``kind`` was asked for since it was last taken (taking it clears it)."""
        with self._lock:
            asked = kind in self._asked
            self._asked.discard(kind)
            return asked


Event = Started | Progress | Message | Validation | SampleSaved | CheckpointSaved | AdapterSaved | Finished
EventHandler = Callable[[Event], None]
