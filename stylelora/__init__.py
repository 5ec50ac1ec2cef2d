"""stylelora: train, preview and export Stable Diffusion style LoRAs.

The public API is imported lazily so that ``import stylelora`` and ``stylelora --help`` stay fast.
"""

from __future__ import annotations

from typing import Any

from . import families  # noqa: F401  (registers the model families' kinds, the values model.kind takes)
from .core.config import Config
from .core.errors import ConfigError, DataError, FormatError, ModelError, StyleloraError, TrainingError

__version__ = "0.1.0"
__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "FormatError",
    "ModelError",
    "StyleloraError",
    "TrainingError",
    "train",
    "load_base_model",
]


def __getattr__(name: str) -> Any:
    if name == "train":
        from .training.loop import train

        return train
    if name == "load_base_model":
        from .families import load_base_model

        return load_base_model
    raise AttributeError(name)
