"""Library messages in the app's terms: a config field is called by its form label, continuing a run by
the button that does it (the library names fields, stylelora.core.errors; the CLI words them as flags)."""

from __future__ import annotations

import re
from pathlib import Path

from stylelora.core.config import all_fields
from stylelora.core.errors import ADD_FOLDER, CHECK_DATA, CONTINUE, SETTING

from .labels import BASIC_GROUP, group, label

CONTINUE_BUTTON = "Continue this run"
AGAIN_BUTTON = "Train again into a new folder"
CHECK_BUTTON = "Check the dataset"
USE_FOLDER_BUTTON = "Use a folder on this computer"
LEADING_FIELD = re.compile(r"^(?P<field>[a-z_]+\.[a-z0-9_]+): ", re.MULTILINE)


def where(dotted: str) -> str:
    """Where the form shows a field: "Advanced › Saving", or "" for the Basic ones."""
    return "" if group(dotted) == BASIC_GROUP else f"Advanced › {group(dotted)}"


def _set(dotted: str, value: str) -> str:
    """An instruction to give a field a value, as the form reads."""
    place = f" (Train tab, {where(dotted)})" if where(dotted) else " (Train tab)"
    if value in ("true", "false"):
        return f"“{label(dotted)}” {'ticked' if value == 'true' else 'unticked'}{place}"
    return f"“{label(dotted)}” = {value}{place}"


def gui_words(text: str) -> str:
    """``text`` (a library message) with its config fields named by their labels, and the fix worded
    as the app does it: "press “Continue this run”" instead of ``train.resume=auto``."""
    fields = all_fields()
    text = CONTINUE.sub(lambda m: f"“{CONTINUE_BUTTON}” on run '{Path(m['config']).parent.name}' (Train tab, Runs)",
                        text)
    text = CHECK_DATA.sub(lambda m: f"“{CHECK_BUTTON}” on the Dataset tab", text)
    text = ADD_FOLDER.sub(lambda m: f"add {m['folder']} with “{USE_FOLDER_BUTTON}” on the Dataset tab", text)

    def named(m: re.Match[str]) -> str:
        dotted, value = m["field"], m["value"]
        if dotted not in fields:
            return m.group(0)
        if dotted == "train.resume" and value == "auto":
            return f"“{CONTINUE_BUTTON}” (Train tab, Runs)"
        return f"“{label(dotted)}”" if value is None else _set(dotted, value)

    text = SETTING.sub(named, text)
    return LEADING_FIELD.sub(
        lambda m: f"{label(m['field'])} ({m['field']}): " if m["field"] in fields else m.group(0), text)
