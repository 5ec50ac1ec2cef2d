"""What the tabs share: the workspace folders, the one training job, presets and the previewer."""

from __future__ import annotations

import functools
import html
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr

from stylelora.core.errors import StyleloraError
from stylelora.data.autocaption import Captioner, load_captioner
from stylelora.preview.previewer import Previewer
from stylelora.services.board import TensorBoard
from stylelora.services.jobs import TrainingJob
from stylelora.services.launch import visible_gpus
from stylelora.services.workspace import Workspace

from .words import gui_words

PRESETS = Path(__file__).resolve().parent.parent / "presets"
Handler = TypeVar("Handler", bound=Callable[..., Any])


QUEUE_FILE = "queue.json"  # under outputs/: the training queue, kept across restarts


@dataclass
class Context:
    workspace: Workspace
    job: TrainingJob | None = None  # made in __post_init__: runs in the workspace, its queue under outputs/
    presets: Path = PRESETS
    preview_lock: threading.Lock = field(default_factory=threading.Lock)  # one render at a time, one model
    gpus: int = field(default_factory=visible_gpus)  # CUDA devices: with more than one, Train offers "GPUs"
    tensorboard: TensorBoard = field(default_factory=TensorBoard)
    # The folders Gradio may serve files from: the list given to launch(allowed_paths=...), which Gradio reads
    # on every request, so a dataset folder added while the app runs is served from then on.
    served: list[str] = field(default_factory=list)
    _previewer: Previewer | None = None
    _captioner: Captioner | None = None

    def __post_init__(self) -> None:
        if self.job is None:
            self.job = TrainingJob(prepare=self.workspace.run_config,
                                   queue_file=self.workspace.outputs / QUEUE_FILE)
        self.served[:] = [str(p) for p in self.workspace.folders]

    def add_folder(self, path: str) -> Path:
        """Add a dataset folder from elsewhere on this machine (``Workspace.add_folder``) and serve its images."""
        folder = self.workspace.add_folder(path)
        if not any(folder.is_relative_to(p) for p in self.served):
            self.served.append(str(folder))
        return folder

    def dataset_choices(self) -> list[str]:
        """The Train form's datasets: datasets/<name>, then the added folders' paths."""
        ws = self.workspace
        return [ws.display(ws.datasets / n) if not Path(n).is_absolute() else n for n in ws.dataset_names()]

    def preset_names(self) -> list[str]:
        return sorted(p.stem for p in self.presets.glob("*.toml"))

    def adapter_choices(self) -> list[str]:
        return [self.workspace.display(a) for a in self.workspace.adapter_files()]

    def run_choices(self) -> list[str]:
        return [self.workspace.display(r.path) for r in self.workspace.runs()]

    def captioner(self, name: str) -> Captioner:
        """The captioner ``name``, loaded once and kept while the same one is asked for."""
        if self._captioner is None or self._captioner.name != name.strip():
            self._captioner = None  # let the old model go before loading the next
            self._captioner = load_captioner(name)
        return self._captioner

    def previewer(self, model: str) -> Previewer:
        """The Previewer of ``model``, loaded once and kept while the same model is asked for."""
        if self._previewer is None or self._previewer.model_name != model:
            self._previewer = None  # let the old pipeline go before loading the next
            self._previewer = Previewer(model)
        return self._previewer


def user_error(e: Exception) -> gr.Error:
    """A message for the browser (and gradio_client) from a library error."""
    if isinstance(e, StyleloraError):
        return gr.Error(_no_markup(gui_words(str(e))), print_exception=False)
    return gr.Error(_no_markup(f"{type(e).__name__}: {e}"))


def user_errors(handler: Handler) -> Handler:
    """An event handler whose library errors (StyleloraError) reach the page as one plain message.

    Works for plain and generator handlers (Gradio streams the latter); the signature is kept, so
    Gradio still sees special parameters such as ``gr.SelectData``.
    """
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def stream(*args: Any, **kwargs: Any) -> Any:
            try:
                return (yield from handler(*args, **kwargs))
            except StyleloraError as e:
                raise user_error(e) from None

        return stream  # type: ignore[return-value]

    @functools.wraps(handler)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except StyleloraError as e:
            raise user_error(e) from None

    return call  # type: ignore[return-value]


class Failed:
    """In ``errors_on_page``: the output that shows the error's message, worded by ``template``; ``markdown``
    for a Markdown output (the message stays escaped), else plain text."""

    def __init__(self, template: str = "{}", markdown: bool = False) -> None:
        self.template, self.markdown = template, markdown

    def text(self, message: str) -> str:
        return self.template.format(message if self.markdown else html.unescape(message))


def errors_on_page(*failed: Any) -> Callable[[Handler], Handler]:
    """A handler whose errors stay on the page: on a library error (or gr.Error) its outputs first become
    ``failed`` (a ``Failed()`` among them shows the message; ``None`` empties a download), then the error is
    raised as ``user_errors`` does (a toast in the browser, the error of the API call). Without this the
    outputs would keep what the previous call showed, and the message would go with the toast."""
    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def stream(*args: Any, **kwargs: Any) -> Any:
            try:
                result = handler(*args, **kwargs)
                if inspect.isgenerator(result):
                    yield from result
                else:
                    yield result
            except (StyleloraError, gr.Error) as e:
                error = user_error(e) if isinstance(e, StyleloraError) else e
                shown = [v.text(error.message) if isinstance(v, Failed) else v for v in failed]
                yield shown[0] if len(shown) == 1 else tuple(shown)
                raise error from None

        return stream  # type: ignore[return-value]

    return wrap


def _no_markup(text: str) -> str:
    """Gradio shows error messages as HTML, and they can quote names the user chose: no tags may get
    through. Only ``&`` and ``<`` are escaped, so ``must be >= 1`` reads the same in the browser and API."""
    return text.replace("&", "&amp;").replace("<", "&lt;")
