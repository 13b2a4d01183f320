"""The one exception type the pack raises for problems a user can fix."""

from __future__ import annotations

from collections.abc import Iterable


class WanDistriFusionError(ValueError):
    """A problem with input, settings, files or workers, with a message that says what to change."""


def first_few(items: Iterable[str], count: int = 5) -> str:
    """The first ``count`` names of a list for an error message, with how many more there are."""
    items = list(items)
    shown = ", ".join(items[:count])
    return shown + (f", ... ({len(items) - count} more)" if len(items) > count else "")
