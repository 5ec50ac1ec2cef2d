"""What a run looks like on a terminal: a progress bar with loss, speed and ETA, or JSON lines for a launcher."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..core.errors import counted
from .flags import cli_words


class TerminalProgress:
    """Renders trainer events on a terminal: a tqdm bar with loss, speed and ETA."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, event: Any) -> None:
        from tqdm import tqdm

        from ..core import events

        if isinstance(event, events.Started):
            where = event.device if event.processes == 1 else f"{event.device} with {event.processes} processes"
            images = counted(event.num_images, "image")
            print(f"training on {where} (effective batch {event.effective_batch}): {images} -> {event.output_dir}",
                  file=sys.stderr)
            self.bar = tqdm(total=event.total_steps, initial=event.start_step, unit="step", dynamic_ncols=True)
        elif isinstance(event, events.Progress) and self.bar is not None:
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", img_s=f"{event.images_per_s:.2f}")
            self.bar.update(event.step - self.bar.n)
        elif isinstance(event, events.Estimated):
            self._write(event.summary if event.fits else f"warning: {event.summary}")
        elif isinstance(event, events.Message):
            self._write(cli_words(event.text))
        elif isinstance(event, events.Validation):
            self._write(f"step {event.step}: validation loss {event.loss:.5f}")
        elif isinstance(event, events.CheckpointSaved):
            self._write(f"checkpoint: {event.path}")
        elif isinstance(event, events.SampleSaved):
            self._write(f"samples at step {event.step}: {', '.join(str(p) for p in event.paths)}")
        elif isinstance(event, events.Finished):
            self.close()
            print(f"done: {counted(event.step, 'step')}; adapter files:", file=sys.stderr)
            for path in event.adapter_paths:
                print(f"  {path}")

    def close(self) -> None:
        """End the progress bar's line, so that a message printed after it starts on its own line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)


class EventStream:
    """Writes each event as one JSON line on stdout (``--json-events``), for a program following the run."""

    def __call__(self, event: Any) -> None:
        from ..core import events

        print(json.dumps(events.to_record(event)), flush=True)

    def close(self) -> None:
        pass
