"""Counts in messages: "1 warning", "2 warnings" (never "1 warnings")."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in the number that fits it; ``plural`` when adding an "s" is not the plural."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
