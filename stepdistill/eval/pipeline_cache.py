"""Pipelines for a suite run: each folder loaded once (the last :data:`MAX_LOADED_PIPELINES` kept), the
scheduler swapped per configuration, and the suite's ``resolution`` as the default image size."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable

import torch

from stepdistill.eval import generate as _gen
from stepdistill.eval.suite import Configuration

__all__ = ["MAX_LOADED_PIPELINES", "PipelineCache"]

MAX_LOADED_PIPELINES = 2


class _FixedSize:
    """A pipeline whose calls default to ``height = width = size`` (the suite's ``resolution``); every other
    attribute (``unet``, ``device``, ...) is the wrapped pipeline's."""

    def __init__(self, pipe: Any, size: int):
        self._pipe = pipe
        self._size = size

    def __call__(self, *args, **kwargs):
        kwargs.setdefault("height", self._size)
        kwargs.setdefault("width", self._size)
        return self._pipe(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


class PipelineCache:
    """Pipelines loaded once per path (the last ``MAX_LOADED_PIPELINES`` kept); the scheduler is swapped per
    configuration (``scheduler:`` = a diffusers class built ``from_config`` of the pipeline's own)."""

    def __init__(self, device: str, dtype: torch.dtype, resolution: int | None, log: Callable[[str], None]):
        self.device, self.dtype, self.resolution, self.log = device, dtype, resolution, log
        self._cache: OrderedDict[str, tuple[Any, Any]] = OrderedDict()

    def get(self, config: Configuration) -> Any:
        key = config.pipeline
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            t0 = time.time()
            pipe = _gen.load_pipeline(key, device=self.device, dtype=self.dtype)
            self._cache[key] = (pipe, pipe.scheduler)
            self.log(f"  loaded pipeline {key} ({type(pipe).__name__}, {time.time() - t0:.1f} s)")
            while len(self._cache) > MAX_LOADED_PIPELINES:
                self._cache.popitem(last=False)
        pipe, base_scheduler = self._cache[key]
        if config.scheduler:
            import diffusers

            pipe.scheduler = getattr(diffusers, config.scheduler).from_config(base_scheduler.config)
        else:
            pipe.scheduler = base_scheduler
        return _FixedSize(pipe, self.resolution) if self.resolution else pipe
