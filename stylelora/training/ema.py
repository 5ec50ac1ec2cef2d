"""An exponential moving average of the LoRA weights (diffusers' EMAModel over the trainable params).

The average is what samples and the exported adapter use when it is on; training keeps updating the
raw weights. ``applied()`` swaps the average in for a moment and puts the raw weights back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class LoraEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.params = params
        # diffusers' warm-up: the decay grows as (1 + n) / (10 + n) up to ``decay``, so a short run
        # still gets an average of its recent weights rather than of its random start.
        self.average = EMAModel(params, decay=decay)

    def update(self) -> None:
        """Fold the current weights into the average (once per optimizer step)."""
        self.average.step(self.params)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model's LoRA weights are the average; afterwards the raw ones again."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)

    @property
    def steps(self) -> int:
        return int(self.average.optimization_step)

    def reset_from_params(self, steps: int) -> None:
        """Make the current weights the average (used on resume, after loading the saved average)."""
        with torch.no_grad():
            for shadow, p in zip(self.average.shadow_params, self.params, strict=True):
                shadow.copy_(p.detach().to(shadow.dtype))
        self.average.optimization_step = steps
