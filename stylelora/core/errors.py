"""Errors a user can act on. The CLI and the app show their message alone, with no traceback."""

from __future__ import annotations

import re


class StyleloraError(Exception):
    """Base of every error caused by the user's input, config, data or files."""


class ConfigError(StyleloraError):
    """A config field, TOML file or override is invalid; the message names the dotted field."""


class DataError(StyleloraError):
    """The dataset cannot be used; the message names the folder or file and the fix."""


class ModelError(StyleloraError):
    """A base model cannot be loaded; the message names it and says what to do."""


class FormatError(StyleloraError):
    """An adapter file cannot be read, written or verified; the message names the file."""


class TrainingError(StyleloraError):
    """Training cannot go on (NaN loss, out of memory, disk full); the message gives advice."""


class DiskFullError(StyleloraError):
    """A save ran out of disk space; nothing partial was left under the file's name."""


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """A count with its noun in the right number: ``1 warning``, ``2 warnings``."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def offline_hint(what: str, name: str, local: str) -> str:
    """The one message for a hub id that cannot be had (offline, or a wrong id), for models and captioners."""
    return (
        f"{what} '{name}': could not be downloaded from the Hugging Face hub (this machine looks "
        f"offline, or the id is wrong). Download it where you have internet and pass the local copy: {local}."
    )


# --- how a message names the fix ----------------------------------------------------------------------
# The library names what to change by config field, never by a shell's flag or button: `train.resume=auto`
# (give a field a value) or `data.path` (a field), in backticks. Each shell words these its own way (the CLI
# as flags, the app as form labels and buttons), so one message serves both.

SETTING = re.compile(r"`(?P<field>[a-z_]+\.[a-z0-9_]+)(?:=(?P<value>[^`]*))?`")
CONTINUE = re.compile(
    r"`train\.resume=auto` on the run's config `(?P<config>[^`]+)`(?: in (?P<processes>\d+) processes)?")
CHECK_DATA = re.compile(r"the dataset check of `(?P<folder>[^`]+)`")
ADD_FOLDER = re.compile(r"add `(?P<folder>[^`]+)` to the workspace's dataset folders")


def setting(field: str, value: object = None) -> str:
    """A config field, or a value to give it, as messages name it: `train.resume=auto`."""
    if value is None:
        return f"`{field}`"
    shown = str(value).lower() if isinstance(value, bool) else str(value)
    return f"`{field}={shown}`"


def check_data(folder: object) -> str:
    """The advice to run the dataset check, which explains every finding, on ``folder``."""
    return f"the dataset check of `{folder}`"


def add_folder(folder: object) -> str:
    """The advice to add ``folder`` (a dataset elsewhere on this machine) to an app's workspace
    (``services.workspace.Workspace.add_folder``), so the app may train from it."""
    return f"add `{folder}` to the workspace's dataset folders"


def continue_run(config_toml: object, processes: int = 1) -> str:
    """The advice that continues a run from its newest checkpoint (``config_toml`` is the run's own), launched
    as it was (``processes``: how many trained it)."""
    launched = f" in {processes} processes" if processes > 1 else ""
    return f"`train.resume=auto` on the run's config `{config_toml}`{launched}"


def output_exists(path: object) -> str:
    """The one refusal of a tool asked to write a file or folder that is already there (``--force`` replaces it)."""
    return f"--out: {path} exists; choose another name or pass --force to replace it"
