"""What the tabs share: the workspace folders, the one training job, presets and the previewer."""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from stylelora.errors import StyleloraError
from stylelora.jobs import TrainingJob
from stylelora.workspace import Workspace

PRESETS = Path(__file__).resolve().parent.parent / "presets"


@dataclass
class Context:
    workspace: Workspace
    job: TrainingJob = field(default_factory=TrainingJob)
    presets: Path = PRESETS
    _preview_lock: threading.Lock = field(default_factory=threading.Lock)
    _previewer: Any = None
    _previewer_model: str = ""
    attached: dict[int, dict[tuple[str, int], str]] = field(default_factory=dict)  # previewer -> file -> name

    def dataset_choices(self) -> list[str]:
        from stylelora.collect import list_datasets

        return [self.workspace.display(self.workspace.datasets / n) for n in list_datasets(self.workspace.datasets)]

    def preset_names(self) -> list[str]:
        return sorted(p.stem for p in self.presets.glob("*.toml"))

    def adapter_choices(self) -> list[str]:
        return [self.workspace.display(a) for a in self.workspace.adapter_files()]

    def run_choices(self) -> list[str]:
        return [self.workspace.display(r.path) for r in self.workspace.runs()]

    def previewer(self, model: str) -> Any:
        """The Previewer of ``model``, loaded once and kept while the same model is asked for."""
        Previewer = library("stylelora.generate", "Previewer")  # noqa: N806

        if self._previewer is None or self._previewer_model != model:
            self._previewer = None  # let the old pipeline go before loading the next
            self.attached.clear()
            self._previewer = Previewer(model)
            self._previewer_model = model
        return self._previewer

    @property
    def preview_lock(self) -> threading.Lock:
        return self._preview_lock


def user_error(e: Exception) -> gr.Error:
    """A message for the browser (and gradio_client) from a library error."""
    if isinstance(e, StyleloraError):
        return gr.Error(_no_markup(str(e)), print_exception=False)
    return gr.Error(_no_markup(f"{type(e).__name__}: {e}"))


def _no_markup(text: str) -> str:
    """Gradio shows error messages as HTML, and they can quote names the user chose: no tags may get
    through. Only ``&`` and ``<`` are escaped, so ``must be >= 1`` reads the same in the browser and API."""
    return text.replace("&", "&amp;").replace("<", "&lt;")


def library(module: str, name: str) -> Any:
    """``module.name`` of the library, imported when first used; a clear message if this version lacks it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise gr.Error(f"this version of stylelora has no {module}.{name}; update stylelora to use it",
                       print_exception=False) from None
