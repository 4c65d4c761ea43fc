"""Run a benchmark suite (:mod:`stepdistill.eval.suite`): generate, score, time, report — resumably.

For every expanded configuration (pipeline × steps × guidance [× scheduler]), in file order,
:func:`~stepdistill.eval.configuration_run.run_configuration`:

1. **Samples.** ``samples_per_prompt`` images for every prompt; sample j of prompt i is drawn from seed
   ``seed + i·samples_per_prompt + j`` (:func:`~stepdistill.eval.generate.sample_seeds`), so every configuration
   sees the same prompts and the same initial noise. Samples are written per batch under
   ``<out>/samples/<slug>/`` (:class:`~stepdistill.eval.run_files.SampleStore`): each batch is written to a
   temporary name and renamed into place, so a batch that exists is complete; a restarted run regenerates only the
   missing batches. ``fingerprint.json`` records what the samples depend on (pipeline folder, steps, guidance,
   scheduler, prompts, seeds, resolution, dtype, device, batch size); samples of a different fingerprint are
   discarded.
2. **Metrics**, streamed over the stored 8-bit batches (:mod:`stepdistill.eval.suite_metrics`: ``toy``, ``fid``
   with the reference statistics of :mod:`stepdistill.eval.fid_reference`, ``clip``, ``hpsv2``).
3. **NFE and latency** (:func:`~stepdistill.eval.bench.measure_pipeline_latency`).

An entry's results are cached in ``<out>/entries/<slug>.json`` with a fingerprint of the samples, metric set-up
and latency settings, so a restarted run also skips scoring and timing of finished configurations (delete that
folder to re-measure). ``<out>/run_status.json`` shows progress while running (state ``running`` / ``failed`` /
``interrupted`` / ``complete`` and the finished entries). The report — ``report.json``, ``report.md``,
``quality.png`` (:func:`~stepdistill.eval.report.write_report`), ``grid.png`` and ``metrics.png``
(:mod:`stepdistill.eval.suite_report`) — is written only at the very end, ``report.json`` last and atomically; a
``report.json`` left by an earlier run is first renamed to ``report.previous.json``, so a ``report.json`` in
``<out>`` is always a complete report of the latest finished run.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from stepdistill.core.interrupts import catch_sigterm, restore_sigterm
from stepdistill.eval.configuration_run import RunStats, run_configuration
from stepdistill.eval.fid_reference import (
    INCEPTION_FID_FEATURES,
    REFERENCE_IMAGE_SUFFIXES,
)
from stepdistill.eval.pipeline_cache import PipelineCache
from stepdistill.eval.report import device_description
from stepdistill.eval.run_files import write_json
from stepdistill.eval.suite import Suite, _spread
from stepdistill.eval.suite_metrics import SuiteMetrics
from stepdistill.eval.suite_report import write_suite_report

__all__ = ["run_suite", "RunStats", "INCEPTION_FID_FEATURES", "REFERENCE_IMAGE_SUFFIXES"]


def _resolve_device(suite: Suite) -> str:
    if suite.device:
        return suite.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _grid_indices(suite: Suite) -> list[int]:
    return [i * suite.samples_per_prompt for i in _spread(len(suite.prompts), suite.grid_prompts)]


def _retire_report(out: Path) -> None:
    for name in ("report.json", "report.md"):
        path = out / name
        if path.exists():
            os.replace(path, out / name.replace("report.", "report.previous."))


class _Status:
    def __init__(self, path: Path, suite: Suite, total: int):
        self.path = path
        self.data = {"state": "running", "suite": suite.name, "source": suite.source, "overrides": suite.overrides,
                     "configurations": total, "finished": [], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.write()

    def write(self) -> None:
        write_json(self.path, self.data)

    def finished(self, entry: dict) -> None:
        self.data["finished"].append(entry)
        self.write()

    def end(self, state: str, **extra) -> None:
        self.data.update(state=state, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra)
        self.write()


def run_suite(suite: Suite, out_dir: str | os.PathLike, log: Callable[[str], None] | None = None,
              write_files: bool = True, on_entry: Callable[[dict], None] | None = None,
              remeasure: bool = False) -> dict:
    """Run every configuration of ``suite`` under ``out_dir`` (resuming what is there) and return the report
    object ``{"suite", "device", "entries", "run"}`` ("run": what this invocation did). With ``write_files``
    (default) also write report.json/report.md/quality.png, grid.png and metrics.png at the end; without, only the
    samples, the entry cache and run_status.json (``stepdistill eval`` writes its own JSON, ``stepdistill demo``
    its own report). ``on_entry`` is called with each configuration's entry as soon as it is finished. With
    ``remeasure`` every configuration is scored and timed again, whatever the entry cache holds (stored samples are
    still reused)."""
    log = log or (lambda msg: print(msg, flush=True))
    out = Path(out_dir)
    t_start = time.time()
    configs = suite.configurations()
    device = _resolve_device(suite)
    dtype = getattr(torch, suite.dtype)
    created = not out.exists()  # a folder this call made is removed again if it fails before generating anything
    out.mkdir(parents=True, exist_ok=True)
    log(f"suite {suite.name!r}: {len(configs)} configuration(s) x {suite.num_samples} samples "
        f"({len(suite.prompts)} prompts x {suite.samples_per_prompt}), metrics {', '.join(suite.metrics)}, "
        f"device {device}, output {out}")
    try:
        metrics = SuiteMetrics(suite, out, device, log)  # fails here, before any generation, if a metric is unavailable
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if write_files:
        _retire_report(out)
    status = _Status(out / "run_status.json", suite, len(configs))
    stats = RunStats()
    previous_handler = catch_sigterm()  # a killed run records itself as interrupted
    pipes = PipelineCache(device, dtype, suite.resolution, log)
    grid_idx = _grid_indices(suite)
    entries: list[dict] = []
    grid_rows: list[np.ndarray] = []
    try:
        for n, config in enumerate(configs, start=1):
            log(f"[{n}/{len(configs)}] {config.label} ({config.role}, {config.pipeline})")
            entry, grid = run_configuration(suite, config, out, device, metrics, pipes, stats, grid_idx, log,
                                            reuse_entry=not remeasure)
            entries.append(entry)
            grid_rows.append(grid)
            status.finished(entry)
            lat = entry.get("latency_ms") or {}
            log("  " + "  ".join(f"{k} {v}" for k, v in (
                ("FID", None if entry["fid"] is None else f"{entry['fid']:.3f} ({entry['fid_features']})"),
                ("adherence", None if entry["adherence"] is None else f"{entry['adherence']:.3f}"),
                ("diversity", None if entry["diversity"] is None else f"{entry['diversity']:.4f}"),
                ("CLIP", None if entry.get("clip_score_cosine") is None else f"{entry['clip_score_cosine']:.4f}"),
                ("HPS", None if entry.get("hps") is None else f"{entry['hps']:.2f}"),
                ("latency/img", None if not lat else f"b1 {lat['batch1']:.1f} ms, b{lat['n']} {lat['batchN']:.2f} ms"),
            ) if v is not None))
            if on_entry is not None:
                on_entry(entry)
        stats.wall_seconds = round(time.time() - t_start, 1)
        run_info = {"wall_seconds": stats.wall_seconds, "generated_images": stats.generated_images,
                    "reused_images": stats.reused_images, "generation_calls": stats.generation_calls,
                    "cached_entries": stats.cached_entries, "source": suite.source, "overrides": suite.overrides}
        report = {"suite": suite.name, "device": device_description(), "entries": entries, "run": run_info}
        if write_files:
            status.end("writing report", **run_info)
            report = write_suite_report(suite, out, entries, grid_rows, grid_idx, stats)
            report["run"] = run_info
        status.end("complete", **run_info)
        return report
    except KeyboardInterrupt:
        status.end("interrupted", message="interrupted; run the same command again to resume")
        raise
    except BaseException as err:
        if created and stats.generated_images == 0 and not entries:  # nothing worth keeping for a resume
            shutil.rmtree(out, ignore_errors=True)
        else:
            status.end("failed", message=f"{type(err).__name__}: {err}")
        raise
    finally:
        restore_sigterm(previous_handler)

