"""One configuration of a suite (pipeline × steps × guidance [× scheduler]): generate its samples (only the
batches not yet stored), score them, time the pipeline, and cache the entry.

Sample j of prompt i is drawn from seed ``seed + i·samples_per_prompt + j``
(:func:`~stepdistill.eval.generate.sample_seeds`), so every configuration sees the same prompts and the same initial
noise, whatever the batching. An entry's results are cached in ``<out>/entries/<slug>.json`` with a fingerprint of
the samples, the metric set-up and the latency settings; they are reused only when no sample was generated now and
the fingerprint matches.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stepdistill.eval import generate as _gen
from stepdistill.eval.bench import measure_pipeline_latency
from stepdistill.eval.fid import quantize_images
from stepdistill.eval.pipeline_cache import PipelineCache
from stepdistill.eval.report import measurement_warnings, nfe
from stepdistill.eval.run_files import (
    FORMAT_VERSION,
    SampleStore,
    folder_digest,
    write_json,
)
from stepdistill.eval.suite import Configuration, Suite
from stepdistill.eval.suite_metrics import SuiteMetrics
from stepdistill.export.loading import export_info
from stepdistill.toy.assets import toy_teacher_path

__all__ = ["RunStats", "run_configuration", "sample_fingerprint"]


@dataclass
class RunStats:
    """What a run did: images generated now vs. found on disk, pipeline calls made for generation, and
    configurations whose results came from the entry cache."""

    generated_images: int = 0
    reused_images: int = 0
    generation_calls: int = 0
    cached_entries: int = 0
    wall_seconds: float = 0.0
    per_entry: dict = field(default_factory=dict)


def sample_fingerprint(suite: Suite, config: Configuration, device: str) -> dict:
    """What the samples of ``config`` depend on (stored as the sample folder's ``fingerprint.json``)."""
    pipeline = config.pipeline
    if pipeline == "toy":
        pipeline = str(toy_teacher_path())
    return {
        "version": FORMAT_VERSION, "pipeline": pipeline, "pipeline_files": folder_digest(pipeline),
        "steps": config.steps, "guidance": config.guidance, "scheduler": config.scheduler,
        "negative_prompt": config.negative_prompt, "resolution": suite.resolution, "dtype": suite.dtype,
        "device": torch.device(device).type, "seed": suite.seed, "samples_per_prompt": suite.samples_per_prompt,
        "prompts": suite.prompts_digest(), "num_prompts": len(suite.prompts), "batch_size": suite.batch_size,
        "format": suite.sample_format,
    }


def run_configuration(suite: Suite, config: Configuration, out: Path, device: str, metrics: SuiteMetrics,
                      pipes: PipelineCache, stats: RunStats, grid_idx: list[int], log,
                      reuse_entry: bool = True) -> tuple[dict, np.ndarray]:
    """The entry of ``config`` (generated, scored and timed now, or from the cache unless ``reuse_entry`` is
    False) and its grid images: the samples at ``grid_idx`` (uint8, (len(grid_idx), 3, H, W))."""
    sample_fp = sample_fingerprint(suite, config, device)
    store = SampleStore(out / "samples" / config.slug, suite.sample_format, sample_fp, log)
    all_prompts = [p for p in suite.prompts for _ in range(suite.samples_per_prompt)]
    seeds = _gen.sample_seeds(len(suite.prompts), suite.samples_per_prompt, suite.seed)
    total = len(all_prompts)
    batches = [(s, min(s + suite.batch_size, total)) for s in range(0, total, suite.batch_size)]

    # 1. samples (only the missing batches)
    gen_seconds, generated_now, t0 = 0.0, 0, time.time()
    for b, (start, end) in enumerate(batches):
        seconds = store.seconds(start, end)
        if seconds is None:
            pipe = pipes.get(config)
            t1 = time.time()
            images = _gen.generate(pipe, all_prompts[start:end], seeds[start:end], config.steps, config.guidance,
                                   batch_size=end - start, negative_prompt=config.negative_prompt, progress=False)
            seconds = time.time() - t1
            u8 = quantize_images(images)
            metrics.check_images(u8, config.pipeline)
            store.save(start, end, u8, seeds[start:end], seconds)
            generated_now += end - start
            stats.generation_calls += 1
            done = sum(e - s for s, e in batches[: b + 1])
            log(f"  generated batch {b + 1}/{len(batches)} ({done}/{total} samples, {seconds:.1f} s; "
                f"{time.time() - t0:.0f} s for this configuration)")
        gen_seconds += seconds
    stats.generated_images += generated_now
    stats.reused_images += total - generated_now
    if generated_now < total:
        log(f"  {total - generated_now}/{total} samples found in {store.folder} (resumed)")

    # 2. metrics and latency, unless cached for exactly these samples and settings
    cache_file = out / "entries" / f"{config.slug}.json"
    result_fp = {"samples": sample_fp, "metrics": metrics.fingerprint,
                 "latency": None if suite.latency is None else vars(suite.latency)}
    entry = None
    if reuse_entry and generated_now == 0 and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("fingerprint") == json.loads(json.dumps(result_fp, default=str)):
                entry = cached["entry"]
                stats.cached_entries += 1
                log(f"  metrics and latency from {cache_file} (cached)")
        except (OSError, ValueError, KeyError):
            entry = None
    if entry is None:
        entry = score_configuration(suite, config, store, batches, metrics, pipes, log)
        entry["generation_seconds"] = round(gen_seconds, 1)
        write_json(cache_file, {"fingerprint": result_fp, "entry": entry})
    entry = dict(entry, samples_generated_this_run=generated_now, samples_dir=str(store.folder))

    # 3. grid images: the same sample indices (prompts and seeds) for every configuration
    grid, loaded = [], {}
    for i in grid_idx:
        start, end = batches[i // suite.batch_size]
        if start not in loaded:
            loaded[start] = store.load(start, end)
        grid.append(loaded[start][i - start])
    return entry, np.stack(grid)


def score_configuration(suite: Suite, config: Configuration, store: SampleStore, batches, metrics: SuiteMetrics,
                        pipes: PipelineCache, log) -> dict:
    """Score the stored samples of ``config`` batch by batch and time its pipeline: the report entry."""
    t0 = time.time()
    acc = metrics.accumulators()
    for start, end in batches:
        images = store.load(start, end)
        metrics.check_images(images, config.pipeline)
        acc.update(images, start)
    scores = acc.results()
    log(f"  metrics ({time.time() - t0:.1f} s)")
    latency = None
    if suite.latency is not None:
        t1 = time.time()
        lat = suite.latency
        latency = measure_pipeline_latency(pipes.get(config), suite.prompts[0], config.steps, config.guidance,
                                           batch=lat.batch, warmup=lat.warmup, repeats=lat.repeats)
        log(f"  latency ({time.time() - t1:.1f} s)")
    entry = {
        "name": config.name, "role": config.role, "steps": config.steps, "guidance": config.guidance,
        "nfe": nfe(config.steps, config.guidance, bool(export_info(config.pipeline).get("guidance_embedded"))),
        "scheduler": config.scheduler,
        "negative_prompt": config.negative_prompt, "pipeline": config.pipeline,
        "fid": None, "fid_features": None, "adherence": None, "adherence_metric": None,
        "diversity": None, "diversity_features": None,
    }
    entry.update(scores)
    entry["latency_ms"] = latency
    entry["num_samples"] = suite.num_samples
    entry["warnings"] = measurement_warnings(entry)
    for warning in entry["warnings"]:
        log(f"  warning: {warning}")
    return entry
