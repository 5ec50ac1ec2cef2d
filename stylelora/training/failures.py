"""What a user is told when a run cannot go on: out of memory, a full disk, a diverged loss, a lost process.

Each message says what happened, that the last complete checkpoint and adapter are intact (and
where), how to continue, and what to change.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..adapters import checkpoint_files as ckpt
from ..core import events
from ..core.config import Config, all_fields, choices
from ..core.errors import continue_run, setting
from .processes import Processes


class RunTracker:
    """Passes events through and remembers where the run is (its folder, step and processes).

    ``mute()`` keeps the remembering but passes nothing on: processes other than the main one report
    nothing (the main one speaks for the run)."""

    def __init__(self, on_event: Callable[[events.Event], None] | None) -> None:
        self.on_event = on_event
        self.output_dir: Path | None = None
        self.step = 0
        self.processes = Processes()

    def mute(self) -> None:
        self.on_event = None

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.Started):
            self.output_dir, self.step = Path(event.output_dir), event.start_step
        elif isinstance(event, events.Progress):
            self.step = event.step
        if self.on_event is not None:
            self.on_event(event)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError other backends raise for an allocation failure."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def where_to_resume(tracker: RunTracker) -> str:
    """The last complete checkpoint and adapter of the run, and the command that continues it."""
    out = tracker.output_dir
    if out is None:
        return "The run had not started; nothing of it was changed."
    found = ckpt.list_checkpoints(out)
    adapters = sorted(p.name for p in out.glob("*.safetensors"))
    kept = f"the last complete checkpoint, {found[-1]}, is intact" if found else "no checkpoint was saved yet"
    if adapters:
        kept += f", and so is the adapter {', '.join(adapters)}"
    resume = f" Continue with: {continue_run(out / 'config.toml', tracker.processes.count)}" if found else ""
    return f"Stopped at step {tracker.step}; {kept}.{resume}"


def lost_contact_advice(tracker: RunTracker) -> str:
    """A process of a multi-process run died or hung: which one, what is intact, how to continue."""
    return f"{tracker.processes.lost_contact_text()}.\n{where_to_resume(tracker)}"


def out_of_memory_advice(config: Config, tracker: RunTracker) -> str:
    """What to change so the run fits; only options this version's config actually has are named."""
    fields = all_fields()
    tips = []
    if config.train.batch_size > 1:
        tips.append(f"a smaller batch ({setting('train.batch_size', max(1, config.train.batch_size // 2))}, with "
                    f"{setting('train.gradient_accumulation_steps', 2 * config.train.gradient_accumulation_steps)} "
                    "to keep the effective batch)")
    if "train.gradient_checkpointing" in fields and not config.get("train.gradient_checkpointing"):
        tips.append(f"gradient checkpointing ({setting('train.gradient_checkpointing', True)})")
    eight_bit = [c for c in choices("train.optimizer") or [] if "8bit" in str(c).lower()]
    if eight_bit and config.train.optimizer not in eight_bit:
        tips.append(f"an 8-bit optimizer ({setting('train.optimizer', eight_bit[0])})")
    if config.train.mixed_precision == "no":
        tips.append(f"mixed precision ({setting('train.mixed_precision', 'bf16')})")
    if config.lora.train_text_encoder:
        tips.append(f"training the UNet only ({setting('lora.train_text_encoder', False)})")
    if config.data.resolution >= 256:
        tips.append(f"a lower resolution ({setting('data.resolution', config.data.resolution * 3 // 4 // 8 * 8)})")
    return (f"out of GPU memory at step {tracker.step + 1} (batch size {config.train.batch_size}, resolution "
            f"{config.data.resolution}).\n{where_to_resume(tracker)}\nTo fit in memory, try: " + "; ".join(tips) + ".")


def disk_full_advice(message: str, tracker: RunTracker) -> str:
    return f"{message}\n{where_to_resume(tracker)} Free some disk space first."
