"""The Config form: one widget per config field, made by one mapping from field to widget.

Widgets are derived from the field's type, choices (``Literal``), bounds and help text, so a field a
helper adds to ``stylelora.config`` appears here with one line in ``labels.py`` (its label and group).
Values go back into a ``Config`` by dotted name, never by position. A field that may be unset (``None``)
is a text box that is empty when unset: a number box would send 0 once shown.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import gradio as gr

from stylelora import families
from stylelora.core.config import Config, GenerateSettings, all_fields, choices, field_type
from stylelora.core.errors import ConfigError

from .labels import ADVANCED_GROUPS, FIELDS, group, label

BASIC_ROWS = [["model.name", "data.path"], ["train.steps", "lora.rank", "train.lr", "data.resolution"],
              ["lora.train_text_encoder"]]
BASIC = [name for row in BASIC_ROWS for name in row]
PER_ROW = 3


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the type without Optional, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def elem_id(dotted: str) -> str:
    """The HTML id of a field's widget (``train.steps`` -> ``cfg-train-steps``), for tests and styling."""
    return "cfg-" + dotted.replace(".", "-").replace("_", "-")


def parameter_name(dotted: str) -> str:
    """The field's parameter name in the API (``train.text_encoder_lr`` -> ``train_text_encoder_lr``)."""
    return dotted.replace(".", "_")


def widget_for(dotted: str, value: Any, datasets: list[str]) -> gr.components.Component:
    """The widget of one config field showing ``value``: the type picks the widget, Literal choices make a
    dropdown; the label is the field's label, the info line its dotted key, help text and bounds."""
    meta = all_fields()[dotted].metadata
    tp, optional = _base_type(field_type(dotted))
    value = to_widget_value(dotted, value)
    info = f"{dotted} · {meta.get('help', '')}"
    common: dict[str, Any] = {"label": label(dotted), "elem_id": elem_id(dotted)}
    if dotted == "data.path":
        return gr.Dropdown(datasets, value=value, allow_custom_value=True, info=info, **common)
    if dotted == "model.name":
        return gr.Dropdown(families.suggestions(), value=value, allow_custom_value=True, info=info, **common)
    options = choices(dotted)  # a Literal's values, or those the model families registered (model.kind)
    if options is not None:
        return gr.Dropdown(options, value=value, info=info, **common)
    if tp is bool:
        return gr.Checkbox(value=value, info=info, **common)
    if tp in (int, float):
        # Bounds go in the help text, not the widget: Config checks them and names the field when wrong.
        bounds = [f"{word} {meta[key]:g}" for key, word in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))
                  if meta.get(key) is not None]
        if bounds:
            info += f" ({', '.join(bounds)})"
        if optional:  # empty means not set (None); a number box cannot be empty once it is shown
            return gr.Textbox(value=value, placeholder="not set", info=info + " Leave empty for not set.", **common)
        return gr.Number(value=value, precision=0 if tp is int else None, info=info, **common)
    if typing.get_origin(tp) is list:
        return gr.Textbox(value=value, lines=3, info=info + " One per line.", **common)
    return gr.Textbox(value=value, info=info, **common)


def to_widget_value(dotted: str, value: Any) -> Any:
    tp, optional = _base_type(field_type(dotted))
    if typing.get_origin(tp) is list:
        return "\n".join(value or [])
    if optional and tp in (int, float):
        return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
    return value


def from_widget_value(dotted: str, value: Any) -> Any:
    tp, optional = _base_type(field_type(dotted))
    if typing.get_origin(tp) is list:
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if isinstance(value, str) and tp in (int, float):
        value = value.strip()
        if value:
            try:
                value = float(value) if tp is float or not value.lstrip("+-").isdigit() else int(value)
            except ValueError:
                raise ConfigError(f"{dotted}: must be a number, got {value!r}") from None
    if value is None or value == "":
        if optional:
            return None
        if tp is str:
            return ""
        raise ConfigError(f"{dotted}: empty; give a value")
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class ConfigForm:
    """Every config field's widget, Basic first, then the Advanced groups, keyed by dotted name."""

    def __init__(self, initial: Config, datasets: list[str]) -> None:
        self.widgets: dict[str, gr.components.Component] = {}
        with gr.Group():
            for row in BASIC_ROWS:
                with gr.Row():
                    for dotted in row:
                        self.widgets[dotted] = widget_for(dotted, initial.get(dotted), datasets)
        advanced = [d for d in all_fields() if d not in BASIC]
        with gr.Accordion("Advanced", open=False, elem_id="advanced"):
            for name in ADVANCED_GROUPS:
                fields = sorted((d for d in advanced if group(d) == name), key=_position)
                if not fields:
                    continue
                with gr.Accordion(name, open=name == ADVANCED_GROUPS[0]):
                    for i in range(0, len(fields), PER_ROW):
                        with gr.Row():
                            for dotted in fields[i : i + PER_ROW]:
                                self.widgets[dotted] = widget_for(dotted, initial.get(dotted), datasets)

    @property
    def names(self) -> list[str]:
        return list(self.widgets)

    @property
    def components(self) -> list[gr.components.Component]:
        return list(self.widgets.values())

    @property
    def by_parameter(self) -> dict[str, gr.components.Component]:
        """The widgets by API parameter name (``train_steps``), in form order: an event given these as
        ``inputs_kwargs`` shows named parameters in the API instead of param_0..param_N."""
        return {parameter_name(d): w for d, w in self.widgets.items()}

    def to_config(self, values: list[Any] | dict[str, Any]) -> Config:
        """The Config the widgets describe (values in ``components`` order, or by parameter name);
        ConfigError names the field."""
        if isinstance(values, dict):
            values = [values[parameter_name(d)] for d in self.names]
        data: dict[str, dict[str, Any]] = {}
        for dotted, value in zip(self.names, values, strict=True):
            section, key = dotted.split(".", 1)
            converted = from_widget_value(dotted, value)
            if converted is not None:
                data.setdefault(section, {})[key] = converted
        return Config.from_dict(data)

    def values(self, config: Config) -> list[Any]:
        return [to_widget_value(d, config.get(d)) for d in self.names]

    def fit_to(self, family: Any | None) -> list[Any]:
        """Widget updates that show only the fields ``family``'s models use (``ModelFamily.applies``: no clip
        skip or min-SNR for FLUX.1, no flow-matching options for SD). A hidden field goes back to its default, so
        a value it kept cannot change or fail a run it means nothing to. None (a model not known before it
        loads): every field."""
        defaults = Config()
        return [gr.update(visible=True) if family is None or family.applies(d)
                else gr.update(visible=False, value=to_widget_value(d, defaults.get(d))) for d in self.names]

    def show_only(self, family: Any | None) -> None:
        """``fit_to`` for the form as first built (before the page is served)."""
        for dotted, widget in self.widgets.items():
            widget.visible = family is None or family.applies(dotted)


def _position(dotted: str) -> int:
    """Where labels.py lists a field (fields it does not list come last)."""
    order = list(FIELDS)
    return order.index(dotted) if dotted in order else len(order)


# --- generation settings (the Preview tab) ------------------------------------------------------


def _settings_type(name: str, cls: type = GenerateSettings) -> Any:
    return _base_type(typing.get_type_hints(cls)[name])[0]


def settings_widget(start: Any, name: str, *, slider_max: float | None = None,
                    **ui: Any) -> gr.components.Component:
    """The widget of one field of a settings dataclass (GenerateSettings, CaptionSettings) showing its value
    in ``start``, labelled with the field's name and its help text under it. A number is a box, or with
    ``slider_max`` a slider from the field's lower bound; choices a radio; a list a comma-separated text;
    ``ui`` goes to the widget (``scale=2``)."""
    cls = type(start)
    meta = cls.__dataclass_fields__[name].metadata
    tp = _settings_type(name, cls)
    common: dict[str, Any] = {"label": name.replace("_", " ").capitalize(), "info": meta["help"], **ui}
    value = getattr(start, name)
    if tp in (int, float) and slider_max is not None:
        low = meta.get("ge") if meta.get("ge") is not None else 0
        return gr.Slider(minimum=low, maximum=slider_max, value=value, step=1 if tp is int else 0.1, **common)
    if tp in (int, float):
        return gr.Number(value=value, precision=0 if tp is int else None, **common)
    if typing.get_origin(tp) is Literal:
        return gr.Radio(list(typing.get_args(tp)), value=value, **common)
    if tp is bool:
        return gr.Checkbox(value=value, **common)
    if typing.get_origin(tp) is list:
        return gr.Textbox(value=", ".join(value), lines=2, **common)
    return gr.Textbox(value=value or "", **common)


def settings_from_widgets(names: list[str], values: list[Any], cls: type = GenerateSettings) -> Any:
    """The settings (``cls``, GenerateSettings by default) that the widgets of ``names`` show (checked:
    ConfigError names the field); an emptied number box means the field's default."""
    changes: dict[str, Any] = {}
    for name, value in zip(names, values, strict=True):
        tp = _settings_type(name, cls)
        if value is None or (value == "" and tp is not str and typing.get_origin(tp) is not list):
            continue
        if tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if typing.get_origin(tp) is list:
            value = [w.strip() for w in str(value).split(",") if w.strip()]
        changes[name] = value
    return cls(**changes)
