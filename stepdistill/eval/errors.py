"""Errors shared by the metric library."""

from __future__ import annotations

from stepdistill.core.errors import InputError


class MetricUnavailable(InputError, RuntimeError):
    """A metric cannot be computed on this machine: its weights, data or optional package are missing.

    The message always says what is missing and how to provide it (a path argument, an environment variable or
    ``pip install 'stepdistill[eval]'``). Callers report the metric as unavailable; they never substitute a zero.
    """


EVAL_EXTRA_HINT = "pip install 'stepdistill[eval]'"
