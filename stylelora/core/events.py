"""Events the trainer reports, and the requests it takes. Shells (CLI, GUI) render the events; the library
never prints. Stop comes in as a signal; "sample now" and "save a checkpoint now" as ``Requests``.

``to_record``/``from_record`` turn an event into a JSON-ready dict and back, so a run in another process
(several GPUs through ``accelerate launch``) reports the same events through a line-per-event stream.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Started:
    total_steps: int
    start_step: int
    num_images: int
    device: str
    output_dir: Path
    processes: int = 1  # how many processes train together (accelerate launch, torchrun)
    effective_batch: int = 1  # images per optimizer step: batch size x processes x accumulation


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
class Estimated:
    """The memory and time a run will take, said before it starts (``stylelora.estimate``)."""

    summary: str
    fits: bool
    peak_bytes: int  # the peak that decides whether it fits: the GPU's on a GPU, else the host's
    step_seconds: float
    total_seconds: float
    method: str  # "measured" or "formula"
    advice: list[str] = field(default_factory=list)
    host_bytes: int = 0  # peak host RAM (resident memory)
    device_bytes: int | None = None  # peak GPU memory; None on a CPU


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
class Evaluated:
    """A checkpoint scored (``stylelora.evaluation``): its scores as metrics (``eval/style``, ...), the best
    checkpoint so far and the run's scores file."""

    step: int
    label: str
    scores: dict[str, float]
    best: str
    path: Path


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

    def waiting(self) -> bool:
        """Whether anything was asked for and not yet taken."""
        with self._lock:
            return bool(self._asked)

    def take(self, kind: str) -> bool:
        """Whether ``kind`` was asked for since it was last taken (taking it clears it)."""
        with self._lock:
            asked = kind in self._asked
            self._asked.discard(kind)
            return asked


Event = (Started | Progress | Message | Estimated | Validation | SampleSaved | CheckpointSaved | AdapterSaved
         | Evaluated | Finished)
EventHandler = Callable[[Event], None]
KINDS: dict[str, type] = {kind.__name__: kind for kind in Event.__args__}  # type: ignore[attr-defined]


def to_record(event: Event) -> dict[str, Any]:
    """``event`` as a JSON-ready dict: its fields (paths as strings) and ``"event"``, its kind's name."""
    record: dict[str, Any] = {"event": type(event).__name__}
    for f in dataclasses.fields(event):  # type: ignore[arg-type]
        value = getattr(event, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, list) and "Path" in str(f.type):
            value = [str(v) for v in value]
        record[f.name] = value
    return record


def from_record(record: dict[str, Any]) -> Event:
    """The event ``to_record`` made ``record`` of; raises ValueError for anything else."""
    kind = KINDS.get(str(record.get("event")))
    if kind is None:
        raise ValueError(f"not a stylelora event: {record!r}")
    values = {}
    for f in dataclasses.fields(kind):
        if f.name in record:
            value = record[f.name]
            if "Path" in str(f.type):
                value = [Path(v) for v in value] if isinstance(value, list) else Path(value)
            values[f.name] = value
    try:
        return kind(**values)  # type: ignore[no-any-return]
    except TypeError as e:
        raise ValueError(f"not a stylelora event: {record!r} ({e})") from None
