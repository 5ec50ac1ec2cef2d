"""Errors a user can act on. The CLI and the app show their message alone, with no traceback."""


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


def offline_hint(what: str, name: str, local: str) -> str:
    """The one message for a hub id that cannot be had (offline, or a wrong id), for models and captioners."""
    return (
        f"{what} '{name}': could not be downloaded from the Hugging Face hub (this machine looks "
        f"offline, or the id is wrong). Download it where you have internet and pass the local copy: {local}."
    )
