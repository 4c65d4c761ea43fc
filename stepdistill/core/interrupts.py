"""SIGTERM handled like Ctrl-C: ``kill PID`` on a long command unwinds it through its ``except``/``finally`` blocks
(a run records itself as interrupted, a league stops its worker processes) instead of ending it where it stands."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["catch_sigterm", "restore_sigterm"]


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
