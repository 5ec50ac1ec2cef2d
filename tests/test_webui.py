"""The app's shell helpers, without a server: library errors become one plain message, and the Preview
tab's widget values become checked GenerateSettings."""

from __future__ import annotations

import inspect

import gradio as gr
import pytest

from stylelora.config import GenerateSettings
from stylelora.errors import ConfigError, DataError
from webui.context import user_errors
from webui.form import settings_from_widgets


def test_user_errors_turns_library_errors_into_one_message_for_plain_and_streaming_handlers() -> None:
    @user_errors
    def handler(name: str, evt: gr.SelectData) -> str:
        """Docs stay."""
        if name == "bad":
            raise DataError("datasets/<b>bad</b>: no images & no captions")
        return name.upper()

    @user_errors
    def stream(n: int):
        yield from range(n)
        raise ConfigError("train.steps: must be >= 1, got 0")

    assert handler("ok", None) == "OK"
    with pytest.raises(gr.Error) as caught:
        handler("bad", None)
    assert caught.value.message == "datasets/&lt;b>bad&lt;/b>: no images &amp; no captions"
    # Gradio reads the signature (special parameters such as gr.SelectData) and whether a handler streams
    assert list(inspect.signature(handler).parameters) == ["name", "evt"] and handler.__doc__ == "Docs stay."
    assert inspect.isgeneratorfunction(stream)
    got = []
    with pytest.raises(gr.Error, match="train.steps: must be >= 1, got 0"):
        for value in stream(2):
            got.append(value)
    assert got == [0, 1]
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: it keeps its traceback
        user_errors(lambda: 1 / 0)()


def test_preview_widget_values_become_checked_settings() -> None:
    names = ["negative_prompt", "seed", "steps"]
    assert settings_from_widgets(names, ["blurry", 7.0, 4.0]) == GenerateSettings(negative_prompt="blurry", seed=7,
                                                                                  steps=4)
    assert settings_from_widgets(names, [None, None, 3]) == GenerateSettings(steps=3)  # emptied boxes: defaults
    with pytest.raises(ConfigError, match="steps: must be >= 1, got 0"):
        settings_from_widgets(names, ["", 0, 0])
