"""stylelora: train, preview and export Stable Diffusion style LoRAs.

The public API is imported lazily so that ``import stylelora`` and ``stylelora --help`` stay fast.
"""

from __future__ import annotations

from typing import Any

from . import families  # noqa: F401  (registers the model families' kinds, the values model.kind takes)
from .core.config import Config, GenerateSettings
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
    "GenerateSettings",
    "train",
    "load_base_model",
    "Previewer",
    "save_png",
]
# the public names that import torch, diffusers and peft: loaded on first use (module, name)
_LAZY = {"train": ("training.loop", "train"), "load_base_model": ("families", "load_base_model"),
         "Previewer": ("preview.previewer", "Previewer"), "save_png": ("data.images", "save_png")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attribute)
    raise AttributeError(name)
