"""Events the trainer reports. Shells (CLI, GUI) render them; the library never prints."""

from __future__ import annotations

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
class Estimated:
    """The memory and time a run will take, said before it starts (``stylelora.estimate``)."""

    summary: str
    fits: bool
    peak_bytes: int
    step_seconds: float
    total_seconds: float
    method: str  # "measured" or "formula"
    advice: list[str] = field(default_factory=list)


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


Event = (Started | Progress | Message | Estimated | Validation | SampleSaved | CheckpointSaved | AdapterSaved
         | Finished)
EventHandler = Callable[[Event], None]
