"""The one exception type for user mistakes, and helpers that build its messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VizpipeError(Exception):
    """A user mistake (bad config value, missing file, unknown layer).

    The command-line entry points print its message as one line and exit with a
    non-zero status, without a traceback.
    """


def suggest(value: str, valid: Iterable[str], limit: int = 5) -> str:
    """Return a sentence naming the valid values closest to ``value``."""
    valid = list(valid)
    close = difflib.get_close_matches(value, valid, n=limit, cutoff=0.4)
    if close:
        return "Closest valid names: " + ", ".join(close) + "."
    if len(valid) <= 30:
        return "Valid names: " + ", ".join(valid) + "."
    return f"Valid names ({len(valid)}) start with: " + ", ".join(valid[:30]) + ", ..."
