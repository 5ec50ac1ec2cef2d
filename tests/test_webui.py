"""The app's shell helpers, without a server: library errors become one plain message, and the Preview
tab's widget values become checked GenerateSettings."""

from __future__ import annotations

import inspect

import gradio as gr
import pytest

from stylelora.core.config import GenerateSettings
from stylelora.core.errors import ConfigError, DataError
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
    with pytest.raises(gr.Error, match=r"Steps \(train.steps\): must be >= 1, got 0"):  # in the form's words
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


def test_every_config_field_has_a_label_and_a_group_and_the_form_shows_it_there() -> None:
    from stylelora.core.config import all_fields
    from webui.form import BASIC
    from webui.labels import ADVANCED_GROUPS, BASIC_GROUP, FIELDS

    missing = [d for d in all_fields() if d not in FIELDS]
    assert missing == [], f"give these config fields a line in webui/labels.py (label, group): {missing}"
    assert [d for d in FIELDS if d not in all_fields()] == []  # no label for a field that is gone
    labels = [label for label, _ in FIELDS.values()]
    assert len(set(labels)) == len(labels) and all(label[0].isupper() for label in labels)
    assert {g for _, g in FIELDS.values()} <= {BASIC_GROUP, *ADVANCED_GROUPS}
    assert [d for d, (_, g) in FIELDS.items() if g == BASIC_GROUP] == BASIC  # Basic is laid out as labelled
    assert FIELDS["train.text_encoder_lr"] == ("Text encoder learning rate", "Optimizer & schedule")


def test_an_unset_field_round_trips_through_the_form_as_not_set() -> None:
    from stylelora.core.config import Config
    from webui.form import from_widget_value, to_widget_value

    assert to_widget_value("train.text_encoder_lr", None) == ""  # an empty box, not a 0 a number box would send
    assert from_widget_value("train.text_encoder_lr", "") is None
    assert from_widget_value("train.text_encoder_lr", " 5e-05 ") == 5e-05
    assert to_widget_value("train.text_encoder_lr", 5e-05) == "5e-05"
    with pytest.raises(ConfigError, match=r"train.text_encoder_lr: must be a number, got 'fast'"):
        from_widget_value("train.text_encoder_lr", "fast")
    assert Config().train.text_encoder_lr is None


def test_library_messages_are_worded_as_the_app_shows_them() -> None:
    from stylelora.core.errors import check_data, continue_run, setting
    from webui.words import gui_words

    taken = (f"train.output_dir: 'outputs/x' already holds a run; continue it with "
             f"{continue_run('/data/outputs/x/config.toml')}, or give {setting('train.output_dir')} a new folder")
    assert gui_words(taken) == ("Run folder (train.output_dir): 'outputs/x' already holds a run; continue it with "
                                "“Continue this run” on run 'x' (Train tab, Runs), or give “Run folder” a new folder")
    assert gui_words(f"try {setting('train.gradient_checkpointing', True)}, {setting('train.batch_size', 1)}") == (
        "try “Gradient checkpointing” ticked (Train tab, Advanced › Precision & memory), "
        "“Batch size” = 1 (Train tab, Advanced › Optimizer & schedule)")
    assert gui_words(f"{check_data('datasets/x')} lists them") == "“Check the dataset” on the Dataset tab lists them"
    assert gui_words("train.steps: must be >= 1, got 0") == "Steps (train.steps): must be >= 1, got 0"
    assert "--" not in gui_words(taken)  # no command-line flags in the app
