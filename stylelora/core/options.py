"""Typed options: a config field made with ``option()`` carries its help text and numeric bounds (choices come
from ``Literal`` types), and ``check_fields`` and ``coerce`` hold any dataclass of such fields to them, naming
the dotted field in every message (``train.lr: must be > 0, got -1``)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal

from .errors import ConfigError


def option(
    default: Any,
    help: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field with a help text and numeric bounds (choices come from ``Literal`` types)."""
    meta = {"help": help, "gt": gt, "ge": ge, "le": le, "lt": lt}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def option_like(source: type, name: str, help: str | None = None, **bounds: float | None) -> Any:
    """A field with the default, help text and bounds of ``source``'s field ``name``, some of them changed."""
    original = {f.name: f for f in dataclasses.fields(source)}[name]
    meta = {**original.metadata, **bounds, **({"help": help} if help else {})}
    return field(default=original.default, metadata=meta)


def validate(section: Any, prefix: str = "") -> None:
    """Raise ConfigError naming every field of a settings dataclass (made with ``option()``) that is out of
    its type or bounds; for settings kept outside Config, such as the captioning ones."""
    errors = check_fields(section, prefix)
    if errors:
        raise ConfigError("\n".join(errors))


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unknown_setting(dotted: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(dotted, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown setting{hint}"


def unknown_choice(value: str, known: list[str]) -> str:
    lower = {k.lower(): k for k in known}
    close = [lower[c] for c in difflib.get_close_matches(value.lower(), list(lower), n=1, cutoff=0.5)]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"must be one of {', '.join(repr(k) for k in known)}, got {value!r}{hint}"


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def coerce(value: Any, tp: Any, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return coerce(value, args[0], dotted)
    ok = True
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value not in choices:  # AdamW8bit, as kohya spells it, is adamw8bit
            value = next((c for c in choices if isinstance(c, str) and c.lower() == value.lower()), value)
        if value not in choices and isinstance(value, str) and all(isinstance(c, str) for c in choices):
            raise ConfigError(f"{dotted}: {unknown_choice(value, list(choices))}")
        ok = value in choices
    elif origin is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):  # TOML's inf and nan parse as floats; no setting means them
            raise ConfigError(f"{dotted}: must be a finite number, got {value}")
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{dotted}: must be {type_name(tp)}, got {value!r}")
    return value


def check_fields(obj: Any, prefix: str) -> list[str]:
    """Type and range errors of one section (or, for Config, of every section)."""
    errors: list[str] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            errors += check_fields(value, f"{dotted}.")
            continue
        try:
            coerce(value, hints[f.name], dotted)
        except ConfigError as e:
            errors.append(str(e))
            continue
        if value is None or isinstance(value, (bool, str, list)):
            continue
        m = f.metadata
        for bound, ok, word in (
            ("gt", lambda v, b: v > b, ">"),
            ("ge", lambda v, b: v >= b, ">="),
            ("lt", lambda v, b: v < b, "<"),
            ("le", lambda v, b: v <= b, "<="),
        ):
            b = m.get(bound)
            if b is not None and not ok(value, b):
                errors.append(f"{dotted}: must be {word} {shown_number(b)}, got {shown_number(value)}")
    if type(obj).__name__ == "DataConfig" and obj.resolution % 8:
        errors.append(f"{prefix}resolution: must be a multiple of 8, got {obj.resolution}")
    if type(obj).__name__ == "DataConfig" and obj.bucket_step % 8:
        errors.append(f"{prefix}bucket_step: must be a multiple of 8, got {obj.bucket_step}")
    return errors


def shown_number(x: float) -> str:
    """A number as messages show it: integers in full (a seed's bound), other numbers short (1e-08)."""
    return str(x) if isinstance(x, int) else f"{x:g}"
