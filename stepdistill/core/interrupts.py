"""Signals on long commands. :func:`catch_sigterm`: SIGTERM handled like Ctrl-C, so that ``kill PID`` unwinds a
command through its ``except``/``finally`` blocks (a run records itself as interrupted, a league stops its worker
processes) instead of ending it where it stands. :class:`StopRequest`: the first Ctrl-C or SIGTERM only asks a loop
to stop after its current step (a training loop then saves a checkpoint), a second one stops it at once."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["StopRequest", "catch_sigterm", "restore_sigterm"]


def catch_sigterm() -> Any:
    """Make SIGTERM raise ``KeyboardInterrupt("signal 15")`` in the main thread; returns the previous handler, for
    :func:`restore_sigterm`, or None when not called from the main thread (signals can only be set there: nothing
    changes)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def restore_sigterm(previous: Any) -> None:
    """Put back the SIGTERM handler :func:`catch_sigterm` replaced (nothing when it replaced none)."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """Within its ``with`` block, the first SIGINT (Ctrl-C) or SIGTERM only records itself (:attr:`signum`,
    :attr:`requested`) for the loop to act on at the end of its current step; a second one raises
    ``KeyboardInterrupt("signal N")`` at once, as without it. On leaving the block the previous handlers come back.
    It changes nothing (and never requests) outside the main thread, where signals cannot be set, or with
    ``enabled=False`` (as where several processes must stop at the same step)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {signum}")
        self.signum = signum  # nothing printed here: a write inside a handler can meet a write it interrupted

    def install(self) -> "StopRequest":
        """Take over SIGINT and SIGTERM (when enabled); returns itself."""
        if self.enabled and not self._previous:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()
