"""Value checks shared by every config reader (recipes, objective configs, suites, the command line): each returns
the problem as text ("must be ≥ 1, got 0") or None, and the caller raises its own error naming the file and key."""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    """An int or a float, never a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """An int or a finite float (NaN and ±inf are not: no setting here means anything at infinity)."""
    return is_number(value) and math.isfinite(value)


def range_text(low: float | None, high: float | None) -> str:
    """"must be ≥ 1", "must be ≤ 5" or "must lie in [0, 1]"."""
    if low is not None and high is not None:
        return f"must lie in [{low}, {high}]"
    if low is not None:
        return f"must be ≥ {low}"
    return f"must be ≤ {high}"


def number_problem(value: Any, low: float | None = None, high: float | None = None) -> str | None:
    """What is wrong with ``value`` as a finite number in [``low``, ``high``] (where given), or None."""
    if not is_number(value):
        return f"must be a number, got {value!r}"
    if not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"{range_text(low, high)}, got {value!r}"
    return None


def int_problem(value: Any, low: int | None = None, high: int | None = None, optional: bool = False) -> str | None:
    """What is wrong with ``value`` as an integer in [``low``, ``high``] (None allowed when ``optional``), or None."""
    if optional and value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        return f"must be an integer{' or null' if optional else ''}, got {value!r}"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"{range_text(low, high)}, got {value!r}"
    return None


def bool_problem(value: Any) -> str | None:
    """What is wrong with ``value`` as true/false, or None."""
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
