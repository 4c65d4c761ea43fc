"""The latency of a full pipeline call, as the bench reports it: batch 1 and a large batch (per image), the share
spent in the UNet, and the spread of the timed repeats. Configurations are evaluated by the suite runner
(:mod:`stepdistill.eval.runner`, behind ``stepdistill eval``, ``bench`` and ``demo``)."""

from __future__ import annotations

import time
from typing import Any

import torch

from stepdistill.eval.generate import (
    quiet_custom_timesteps,
    step_kwargs,
)
from stepdistill.eval.latency import measure_latency


class _UnetTimer:
    """Accumulates wall time spent inside ``pipe.unet`` forward calls (forward pre/post hooks)."""

    def __init__(self, unet: torch.nn.Module):
        self.total = 0.0
        self._start = 0.0
        self._handles = [
            unet.register_forward_pre_hook(lambda *_: self._begin()),
            unet.register_forward_hook(lambda *_: self._end()),
        ]

    def _begin(self) -> None:
        self._start = time.perf_counter()

    def _end(self) -> None:
        self.total += time.perf_counter() - self._start

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def measure_pipeline_latency(pipe: Any, prompt: str, steps: int, guidance: float, batch: int = 64,
                             warmup: int = 2, repeats: int = 5) -> dict:
    """Median wall time of a full pipeline call (text encoder + UNet + VAE decode) at batch 1 and at ``batch``
    (reported per image), in milliseconds, plus the share of the batch-N time spent in the UNet (an SD3 / FLUX
    pipeline's transformer)."""
    steps_kw = step_kwargs(pipe, steps)

    def call(n: int):
        with quiet_custom_timesteps():
            return pipe([prompt] * n, **steps_kw, guidance_scale=guidance, output_type="pt",
                        generator=torch.Generator().manual_seed(0))

    b1 = measure_latency(lambda: call(1), warmup=warmup, repeats=repeats)
    call(batch)  # warm-up at the large batch, outside the UNet timer
    timer = _UnetTimer(pipe.unet if "unet" in pipe.components else pipe.transformer)  # SD3 / FLUX: the transformer
    try:
        bn = measure_latency(lambda: call(batch), warmup=0, repeats=max(2, repeats // 2), batch_size=batch)
    finally:
        timer.close()
    return {
        "batch1": 1000 * b1["median_s"],
        "batchN": 1000 * bn["median_s"] / batch,
        "n": batch,
        "unet_share": timer.total / sum(bn["times_s"]),
        "repeats": repeats,
        # every timed repeat, and its spread (max − min) / median: how far one measurement can be trusted
        "batch1_times": [1000 * t for t in b1["times_s"]],
        "batchN_times": [1000 * t / batch for t in bn["times_s"]],
        "batch1_spread": latency_spread(b1["times_s"]),
        "batchN_spread": latency_spread(bn["times_s"]),
    }


def latency_spread(times: list[float]) -> float:
    """(max − min) / median of the timed repeats (0 for a single repeat)."""
    import statistics

    if len(times) < 2:
        return 0.0
    med = statistics.median(times)
    return (max(times) - min(times)) / med if med > 0 else 0.0
