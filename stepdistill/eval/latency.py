"""Wall-clock latency: warm-up calls, then the median of repeated timed calls, synchronising the GPU so that
asynchronous CUDA work is inside the measurement."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

__all__ = ["measure_latency"]


def _default_sync() -> Callable[[], None] | None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return None


def measure_latency(
    fn: Callable[[], Any],
    warmup: int = 2,
    repeats: int = 5,
    sync: bool | Callable[[], None] | None = None,
    batch_size: int | None = None,
) -> dict:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    ``sync``: None synchronises CUDA when CUDA is in use (``torch.cuda.synchronize`` before and after each timed
    call), True forces it, False disables it, or a callable to use instead (e.g. another device's synchronise).
    Returns seconds: ``{"median_s", "mean_s", "min_s", "max_s", "times_s", "warmup", "repeats"}`` and, with
    ``batch_size``, ``"median_s_per_item"`` and ``"batch_size"``."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    if warmup < 0:
        raise ValueError("warmup must be non-negative")
    if callable(sync):
        sync_fn = sync
    elif sync is True:
        import torch

        sync_fn = torch.cuda.synchronize if torch.cuda.is_available() else None
    elif sync is False:
        sync_fn = None
    else:
        sync_fn = None  # decided after warm-up, once fn has had the chance to initialise CUDA

    for _ in range(warmup):
        fn()
    if sync is None:
        sync_fn = _default_sync()

    times = []
    for _ in range(repeats):
        if sync_fn is not None:
            sync_fn()
        start = time.perf_counter()
        fn()
        if sync_fn is not None:
            sync_fn()
        times.append(time.perf_counter() - start)

    result = {
        "median_s": float(statistics.median(times)),
        "mean_s": float(statistics.fmean(times)),
        "min_s": float(min(times)),
        "max_s": float(max(times)),
        "times_s": [float(t) for t in times],
        "warmup": int(warmup),
        "repeats": int(repeats),
    }
    if batch_size:
        result["batch_size"] = int(batch_size)
        result["median_s_per_item"] = result["median_s"] / int(batch_size)
    return result
