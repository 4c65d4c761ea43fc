"""Run a benchmark suite (:mod:`stepdistill.eval.suite`): generate, score, time, report — resumably.

For every expanded configuration (pipeline × steps × guidance [× scheduler]):

1. **Samples.** ``samples_per_prompt`` images for every prompt; sample j of prompt i is drawn from seed
   ``seed + i·samples_per_prompt + j`` (:func:`~stepdistill.eval.generate.sample_seeds`), so every configuration
   sees the same prompts and the same initial noise. Samples are written per batch under
   ``<out>/samples/<slug>/`` — one compressed ``batch-<start>-<end>.npz`` of uint8 images (``sample_format: npz``)
   or a ``batch-<start>-<end>/`` folder of PNGs (``sample_format: png``). Each batch is written to a temporary
   name and renamed into place, so a batch that exists is complete; a restarted run regenerates only the missing
   batches. ``fingerprint.json`` records what the samples depend on (pipeline folder, steps, guidance, scheduler,
   prompts, seeds, resolution, dtype, device, batch size); samples of a different fingerprint are discarded.
2. **Metrics**, streamed over the stored 8-bit batches (what a saved image holds): ``toy`` (FID_toy, adherence,
   diversity, coverage via :class:`~stepdistill.eval.toy_metrics.ToyJudge`), ``fid`` (Inception-v3 FID against
   cached reference statistics), ``clip`` (CLIP score; also the adherence and, with ≥ 2 samples per prompt, the
   diversity of a non-toy suite), ``hpsv2``.
3. **NFE and latency** (:func:`~stepdistill.eval.bench.measure_pipeline_latency`).

An entry's results are cached in ``<out>/entries/<slug>.json`` with a fingerprint of the samples, metric set-up
and latency settings, so a restarted run also skips scoring and timing of finished configurations (delete that
folder to re-measure). ``<out>/run_status.json`` shows progress while running (state ``running`` / ``failed`` /
``interrupted`` / ``complete`` and the finished entries). The report — ``report.json``, ``report.md``,
``quality.png`` (:func:`~stepdistill.eval.report.write_report`), ``grid.png`` and ``metrics.png`` — is written
only at the very end, ``report.json`` last and atomically; a ``report.json`` left by an earlier run is first
renamed to ``report.previous.json``, so a ``report.json`` in ``<out>`` is always a complete report of the latest
finished run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from stepdistill.eval import generate as _gen
from stepdistill.eval.bench import measure_pipeline_latency
from stepdistill.eval.clip_score import ClipScorer, OpenClipScorer
from stepdistill.eval.diversity import pairwise_diversity
from stepdistill.eval.fid import (
    FeatureStats,
    StreamingStats,
    clean_resize,
    frechet_distance,
    load_or_compute,
    quantize_images,
)
from stepdistill.eval.hps import HPSv2Scorer
from stepdistill.eval.inception import InceptionV3Features, resolve_inception_path
from stepdistill.eval.report import (
    atomic_write_text,
    device_description,
    measurement_warnings,
    nfe,
    steps_axis,
    write_report,
)
from stepdistill.eval.suite import Configuration, Suite, _spread
from stepdistill.eval.toy_metrics import ToyJudge
from stepdistill.toy.assets import toy_evaluator_path, toy_teacher_path

__all__ = ["run_suite", "RunStats", "INCEPTION_FID_FEATURES", "REFERENCE_IMAGE_SUFFIXES"]

INCEPTION_FID_FEATURES = "inception-2015-12-05"
REFERENCE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_LOADED_PIPELINES = 2
_FORMAT_VERSION = 1


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


# ---------------------------------------------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------------------------------------------
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _folder_digest(path: str | os.PathLike) -> str:
    """Cheap identity of a file or folder: relative names, sizes and modification times (no content reads)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return _digest([p.name, st.st_size, st.st_mtime_ns])
    rows = []
    for f in sorted(p.rglob("*")):
        if f.is_file():
            st = f.stat()
            rows.append([str(f.relative_to(p)), st.st_size, st.st_mtime_ns])
    return _digest(rows)


def _to_float(u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float images in [-1, 1] (exactly the 8-bit levels)."""
    return torch.from_numpy(np.ascontiguousarray(u8)).float() / 127.5 - 1.0


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def _umask_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) files; give them the permissions a plain open() would."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


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


class _Pipelines:
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


# ---------------------------------------------------------------------------------------------------------------
# Sample store: atomic per-batch files
# ---------------------------------------------------------------------------------------------------------------
class _SampleStore:
    def __init__(self, folder: Path, fmt: str, fingerprint: dict, log: Callable[[str], None]):
        self.folder, self.fmt, self.log = folder, fmt, log
        fp_file = folder / "fingerprint.json"
        if folder.exists():
            try:
                old = json.loads(fp_file.read_text())
            except (OSError, ValueError):
                old = None
            if old != json.loads(json.dumps(fingerprint, default=str)):
                if any(folder.iterdir()):
                    log(f"  discarding samples in {folder}: they were generated with different settings")
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not fp_file.exists():
            _write_json(fp_file, fingerprint)

    def _name(self, start: int, end: int) -> Path:
        stem = f"batch-{start:07d}-{end:07d}"
        return self.folder / (stem + ".npz" if self.fmt == "npz" else stem)

    def seconds(self, start: int, end: int) -> float | None:
        """Generation time stored with a complete batch whose seeds match, else None (absent or not usable)."""
        path = self._name(start, end)
        try:
            if self.fmt == "npz":
                with np.load(path, allow_pickle=False) as data:
                    if data["seeds"].shape[0] != end - start:
                        return None
                    return float(data["seconds"])
            meta = json.loads((path / "meta.json").read_text())
            if len(meta["seeds"]) != end - start or len(list(path.glob("*.png"))) != end - start:
                return None
            return float(meta["seconds"])
        except Exception:
            return None

    def save(self, start: int, end: int, images: np.ndarray, seeds: list[int], seconds: float) -> None:
        path = self._name(start, end)
        if self.fmt == "npz":
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(self.folder))
            try:
                with os.fdopen(fd, "wb") as handle:
                    np.savez_compressed(handle, images=images, seeds=np.asarray(seeds, dtype=np.int64),
                                        seconds=np.asarray(seconds))
                _umask_mode(tmp)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            return
        from PIL import Image

        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=str(self.folder)))
        try:
            for k, img in enumerate(images):
                Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(tmp / f"{start + k:07d}.png")
            (tmp / "meta.json").write_text(json.dumps({"seeds": list(map(int, seeds)), "seconds": seconds}))
            if path.exists():
                shutil.rmtree(path)
            _umask_mode(tmp, directory=True)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load(self, start: int, end: int) -> np.ndarray:
        path = self._name(start, end)
        if self.fmt == "npz":
            with np.load(path, allow_pickle=False) as data:
                return data["images"]
        from PIL import Image

        return np.stack([np.asarray(Image.open(path / f"{i:07d}.png").convert("RGB")).transpose(2, 0, 1)
                         for i in range(start, end)])


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------
def _center_square(img: np.ndarray) -> np.ndarray:
    _, h, w = img.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return img[:, top:top + s, left:left + s]


class _Metrics:
    """The scorers a suite needs, built (and reference statistics computed or loaded) before any generation, so a
    missing weight file or reference fails the run at once; :meth:`accumulators` gives fresh streaming scorers for
    one configuration."""

    def __init__(self, suite: Suite, out: Path, device: str, log: Callable[[str], None]):
        self.suite, self.log, self.device = suite, log, device
        self.fingerprint: dict = {"metrics": list(suite.metrics), "version": _FORMAT_VERSION}
        self.judge = self.inception = self.fid_reference = self.clip = self.hps = None
        self.fid_reference_info: dict = {}
        if "toy" in suite.metrics:
            evaluator = suite.toy_evaluator or str(toy_evaluator_path())
            t0 = time.time()
            self.judge = ToyJudge(evaluator, reference_size=suite.toy_reference_size)
            self.judge.reference_stats()
            self.toy_resolution = int(self.judge.model.config.resolution)
            log(f"toy evaluator {evaluator}: reference statistics of {suite.toy_reference_size} real images "
                f"({time.time() - t0:.1f} s)")
            self.fingerprint["toy"] = {"evaluator": _folder_digest(evaluator), "reference": suite.toy_reference_size}
        if "fid" in suite.metrics:
            weights = resolve_inception_path(suite.inception)  # MetricUnavailable with instructions
            self.inception = InceptionV3Features.from_pretrained(weights, device=device)
            self.fid_reference = self._fid_reference(out)
            self.fingerprint["fid"] = {"inception": _folder_digest(weights), "backend": self.inception.backend,
                                       "reference": _digest(self.fid_reference.fingerprint) if self.fid_reference.fingerprint
                                       else _folder_digest(suite.reference_stats),
                                       "fid_resize": suite.fid_resize}
        if "clip" in suite.metrics:
            if suite.clip_backend == "open_clip":
                self.clip = OpenClipScorer(suite.clip_model, model_name=suite.clip_arch, device=device)
            else:
                self.clip = ClipScorer(suite.clip_model, device=device)
            self.fingerprint["clip"] = {"backend": suite.clip_backend, "model": _folder_digest(suite.clip_model),
                                        "arch": suite.clip_arch, "name": self.clip.name}
        if "hpsv2" in suite.metrics:
            self.hps = HPSv2Scorer(suite.hps_checkpoint, version=suite.hps_version, device=device)
            self.fingerprint["hpsv2"] = {"checkpoint": _folder_digest(self.hps.checkpoint), "version": self.hps.version}

    # -- FID reference ------------------------------------------------------------------------------------------
    def prepare_fid(self, images: list[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """uint8 (3, H, W) images -> what Inception sees before its own resize to 299: with ``fid_resize: S`` the
        centre square, resized to S×S the clean way (PIL bicubic on float) and rounded to 8 bits, as a saved S-px
        image would be; otherwise unchanged."""
        size = self.suite.fid_resize
        out = []
        for img in images:
            if size:
                img = _center_square(img)
                if img.shape[1:] != (size, size):
                    img = np.clip(np.round(clean_resize(img[None], size)[0]), 0, 255).astype(np.uint8)
            out.append(img)
        return out

    def fid_features(self, images: list[np.ndarray] | np.ndarray) -> np.ndarray:
        prepared = self.prepare_fid(images)
        if len({im.shape for im in prepared}) == 1:
            return self.inception.extract(np.stack(prepared))
        return np.concatenate([self.inception.extract(im[None]) for im in prepared])

    def _fid_reference(self, out: Path):
        suite = self.suite
        if suite.reference_images is None:
            stats = FeatureStats.load(suite.reference_stats)
            fp = stats.fingerprint
            if fp.get("features") not in (None, self.inception.name):
                raise ValueError(f"reference_stats {suite.reference_stats} were computed with {fp.get('features')!r} "
                                 f"features, not {self.inception.name!r}")
            if "fid_resize" in fp and fp["fid_resize"] != suite.fid_resize:
                raise ValueError(f"reference_stats {suite.reference_stats} were computed with fid_resize "
                                 f"{fp['fid_resize']}, the suite uses {suite.fid_resize}")
            if stats.dim != self.inception.feature_dim:
                raise ValueError(f"reference_stats {suite.reference_stats} hold {stats.dim}-d statistics, "
                                 f"Inception features are {self.inception.feature_dim}-d")
            self.fid_reference_info = {"stats": suite.reference_stats, "num": stats.num}
            self.log(f"FID reference statistics: {suite.reference_stats} ({stats.num if stats.num >= 0 else '?'} images)")
            return stats
        folder = Path(suite.reference_images)
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in REFERENCE_IMAGE_SUFFIXES)
        if suite.reference_limit:
            files = files[: suite.reference_limit]
        if len(files) < 2:
            raise ValueError(f"reference_images {folder}: found {len(files)} image(s) "
                             f"({', '.join(REFERENCE_IMAGE_SUFFIXES)}); FID needs at least 2")
        listing = _digest([[f.name, f.stat().st_size] for f in files])
        fingerprint = self.inception.fingerprint(
            reference=folder.name, listing=listing, num_images=len(files), fid_resize=suite.fid_resize,
            crop="center-square" if suite.fid_resize else "none", backend=self.inception.backend,
        )
        cache = Path(suite.reference_stats) if suite.reference_stats else \
            out / "cache" / f"fid-reference-{_digest(fingerprint)[:12]}.npz"

        def compute():
            from PIL import Image

            self.log(f"FID reference statistics: {len(files)} images from {folder} -> {cache}")
            acc, t0 = StreamingStats(), time.time()
            for s in range(0, len(files), 32):
                imgs = [np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files[s:s + 32]]
                acc.update(self.fid_features(imgs))
            self.log(f"  reference statistics done ({time.time() - t0:.1f} s)")
            return acc.to_stats()

        stats = load_or_compute(cache, fingerprint, compute)
        self.fid_reference_info = {"images": str(folder), "num": stats.num, "stats": str(cache)}
        return stats

    # -- per configuration --------------------------------------------------------------------------------------
    def accumulators(self) -> "_Accumulators":
        return _Accumulators(self)


class _Accumulators:
    """Streaming scorers for one configuration: ``update(uint8 batch, sample indices)`` then ``results()``."""

    def __init__(self, m: _Metrics):
        self.m = m
        suite = m.suite
        self.spp = suite.samples_per_prompt
        self.toy_images: list[np.ndarray] = []
        self.fid_stats = None
        if m.inception is not None:
            self.fid_stats = StreamingStats()
        self.clip_cos: list[np.ndarray] = []
        self.clip_emb: dict[int, list[np.ndarray]] = defaultdict(list)
        self.hps_cos: dict[str, list[np.ndarray]] = defaultdict(list)

    def update(self, images: np.ndarray, start: int) -> None:
        m, suite = self.m, self.m.suite
        prompt_idx = [(start + k) // self.spp for k in range(len(images))]
        prompts = [suite.prompts[i] for i in prompt_idx]
        if m.judge is not None:
            self.toy_images.append(images)
        if self.fid_stats is not None:
            self.fid_stats.update(m.fid_features(images))
        if m.clip is not None:
            img = m.clip.embed_images(images)
            unique = sorted(set(prompt_idx))
            txt = dict(zip(unique, m.clip.embed_texts([suite.prompts[i] for i in unique])))
            self.clip_cos.append(np.array([float(img[k] @ txt[i]) for k, i in enumerate(prompt_idx)]))
            if self.spp > 1:
                for k, i in enumerate(prompt_idx):
                    self.clip_emb[i].append(img[k].astype(np.float32))
        if m.hps is not None:
            cos = m.hps.cosines(images, prompts)
            styles = suite.prompt_styles
            for k, i in enumerate(prompt_idx):
                self.hps_cos[styles[i] if styles else "all"].append(cos[k:k + 1])

    def results(self) -> dict:
        m, suite = self.m, self.m.suite
        out: dict = {}
        if m.judge is not None:
            u8 = np.concatenate(self.toy_images)
            prompts = [p for p in suite.prompts for _ in range(self.spp)]
            toy = m.judge.score(_to_float(u8), prompts)
            out.update(toy)
            out["fid_toy"] = toy["fid"]
            out["adherence_metric"] = "toy attribute accuracy (mean over shape, colour, size, background)"
        if self.fid_stats is not None:
            ref = m.fid_reference
            if m.judge is not None:
                out["fid_toy_reference_size"] = out.pop("fid_reference_size", None)
            out["fid"] = float(frechet_distance(self.fid_stats.mean, self.fid_stats.cov, ref.mean, ref.cov))
            out["fid_features"] = INCEPTION_FID_FEATURES
            out["fid_extractor"] = f"{m.inception.name} ({m.inception.backend})"
            out["fid_preprocessing"] = (f"8-bit, centre square resized to {suite.fid_resize} px (PIL bicubic, float), "
                                        "then clean resize to 299" if suite.fid_resize else "8-bit, clean resize to 299")
            out["fid_reference_size"] = ref.num
            out["fid_reference"] = m.fid_reference_info
        if m.clip is not None:
            cos = np.concatenate(self.clip_cos)
            out["clip_score_cosine"] = float(cos.mean())
            out["clip_score_100"] = float(np.mean(100.0 * np.maximum(cos, 0.0)))
            out["clip_model"] = m.clip.name
            if "adherence" not in out:
                out["adherence"] = out["clip_score_cosine"]
                out["adherence_metric"] = f"CLIP score, mean cosine ({m.clip.name})"
            if self.spp > 1:
                clip_div = pairwise_diversity([np.stack(v) for v in self.clip_emb.values()])
                out["clip_diversity"] = clip_div
                if "diversity" not in out:
                    out["diversity"] = clip_div
                    out["diversity_features"] = f"clip ({m.clip.name})"
        if m.hps is not None:
            per_style = {s: float(100.0 * np.concatenate(v).mean()) for s, v in self.hps_cos.items()}
            out["hps"] = float(np.mean(list(per_style.values())))
            out["hps_per_style"] = per_style
            out["hps_version"] = m.hps.version
            out["hps_scale"] = "100*cos; overall = mean of the style means"
        return out


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def _resolve_device(suite: Suite) -> str:
    if suite.device:
        return suite.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sample_fingerprint(suite: Suite, config: Configuration, device: str) -> dict:
    pipeline = config.pipeline
    if pipeline == "toy":
        pipeline = str(toy_teacher_path())
    return {
        "version": _FORMAT_VERSION, "pipeline": pipeline, "pipeline_files": _folder_digest(pipeline),
        "steps": config.steps, "guidance": config.guidance, "scheduler": config.scheduler,
        "negative_prompt": config.negative_prompt, "resolution": suite.resolution, "dtype": suite.dtype,
        "device": torch.device(device).type, "seed": suite.seed, "samples_per_prompt": suite.samples_per_prompt,
        "prompts": suite.prompts_digest(), "num_prompts": len(suite.prompts), "batch_size": suite.batch_size,
        "format": suite.sample_format,
    }


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
        _write_json(self.path, self.data)

    def finished(self, entry: dict) -> None:
        self.data["finished"].append(entry)
        self.write()

    def end(self, state: str, **extra) -> None:
        self.data.update(state=state, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra)
        self.write()


def run_suite(suite: Suite, out_dir: str | os.PathLike, log: Callable[[str], None] | None = None,
              write_files: bool = True) -> dict:
    """Run every configuration of ``suite`` under ``out_dir`` (resuming what is there) and return the report
    object ``{"suite", "device", "entries", "run"}`` ("run": what this invocation did). With ``write_files``
    (default) also write report.json/report.md/quality.png, grid.png and metrics.png at the end; without, only the
    samples, the entry cache and run_status.json (``stepdistill eval`` writes its own JSON)."""
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
        metrics = _Metrics(suite, out, device, log)  # fails here, before any generation, if a metric is unavailable
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if write_files:
        _retire_report(out)
    status = _Status(out / "run_status.json", suite, len(configs))
    stats = RunStats()
    previous_handler = _catch_sigterm()
    pipes = _Pipelines(device, dtype, suite.resolution, log)
    grid_idx = _grid_indices(suite)
    entries: list[dict] = []
    grid_rows: list[np.ndarray] = []
    try:
        for n, config in enumerate(configs, start=1):
            log(f"[{n}/{len(configs)}] {config.label} ({config.role}, {config.pipeline})")
            entry, grid = _run_configuration(suite, config, out, device, metrics, pipes, stats, grid_idx, log)
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
        stats.wall_seconds = round(time.time() - t_start, 1)
        run_info = {"wall_seconds": stats.wall_seconds, "generated_images": stats.generated_images,
                    "reused_images": stats.reused_images, "generation_calls": stats.generation_calls,
                    "cached_entries": stats.cached_entries, "source": suite.source, "overrides": suite.overrides}
        report = {"suite": suite.name, "device": device_description(), "entries": entries, "run": run_info}
        if write_files:
            status.end("writing report", **run_info)
            report = _write_outputs(suite, out, entries, grid_rows, grid_idx, stats)
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
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _catch_sigterm():
    """Turn SIGTERM into KeyboardInterrupt while a run is going (main thread only), so that a killed run records
    itself as interrupted; returns the previous handler (None when not installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def _run_configuration(suite: Suite, config: Configuration, out: Path, device: str, metrics: _Metrics,
                       pipes: _Pipelines, stats: RunStats, grid_idx: list[int], log) -> tuple[dict, np.ndarray]:
    sample_fp = _sample_fingerprint(suite, config, device)
    store = _SampleStore(out / "samples" / config.slug, suite.sample_format, sample_fp, log)
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
            _check_images(u8, metrics, config)
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
    if generated_now == 0 and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("fingerprint") == json.loads(json.dumps(result_fp, default=str)):
                entry = cached["entry"]
                stats.cached_entries += 1
                log(f"  metrics and latency from {cache_file} (cached)")
        except (OSError, ValueError, KeyError):
            entry = None
    if entry is None:
        entry = _score_configuration(suite, config, store, batches, metrics, pipes, log)
        entry["generation_seconds"] = round(gen_seconds, 1)
        _write_json(cache_file, {"fingerprint": result_fp, "entry": entry})
    entry = dict(entry, samples_generated_this_run=generated_now, samples_dir=str(store.folder))

    # 3. grid images: the same sample indices (prompts and seeds) for every configuration
    grid, loaded = [], {}
    for i in grid_idx:
        start, end = batches[i // suite.batch_size]
        if start not in loaded:
            loaded[start] = store.load(start, end)
        grid.append(loaded[start][i - start])
    return entry, np.stack(grid)


def _check_images(u8: np.ndarray, metrics: _Metrics, config: Configuration) -> None:
    if metrics.judge is not None and u8.shape[-2:] != (metrics.toy_resolution, metrics.toy_resolution):
        raise ValueError(
            f"the toy metrics need {metrics.toy_resolution}x{metrics.toy_resolution} images, but {config.pipeline} "
            f"made {u8.shape[-2]}x{u8.shape[-1]} ones; set the suite's resolution: {metrics.toy_resolution} or use a "
            "toy-world pipeline"
        )


def _score_configuration(suite: Suite, config: Configuration, store: _SampleStore, batches, metrics: _Metrics,
                         pipes: _Pipelines, log) -> dict:
    t0 = time.time()
    acc = metrics.accumulators()
    for start, end in batches:
        images = store.load(start, end)
        _check_images(images, metrics, config)
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
        "nfe": nfe(config.steps, config.guidance), "scheduler": config.scheduler,
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


# ---------------------------------------------------------------------------------------------------------------
# Report files
# ---------------------------------------------------------------------------------------------------------------
def _atomic_savefig(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def plot_metrics(entries: list[dict], path: Path) -> bool:
    """One panel per metric other than FID (adherence, diversity, CLIP score, HPS) against steps, one series per
    (name, guidance). Returns False (and writes nothing) when no such metric has a value."""
    panels = [(key, label) for key, label in (
        ("adherence", "adherence ↑"), ("adherence_all", "all attributes right ↑"), ("diversity", "diversity"),
        ("clip_score_cosine", "CLIP score (cosine) ↑"), ("hps", "HPS ↑"),
    ) if any(e.get(key) is not None for e in entries)]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    series: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        series[f"{e['name']} (w={e['guidance']:g})"].append(e)
    for ax, (key, label) in zip(axes[0], panels):
        for name, es in series.items():
            es = sorted((e for e in es if e.get(key) is not None), key=lambda e: e["steps"])
            if es:
                marker = "o-" if es[0]["role"] == "teacher" else "*"
                ax.plot([e["steps"] for e in es], [e[key] for e in es], marker, label=name, markersize=8)
        if key == "diversity":
            real = [e.get("diversity_real") for e in entries if e.get("diversity_real") is not None]
            if real:
                ax.axhline(float(np.mean(real)), color="gray", ls="--", lw=1, label="real images")
            label += f" ({entries[0].get('diversity_features') or ''})"
        ax.set(xlabel="sampling steps", title=label)
        steps_axis(ax, [e["steps"] for e in entries])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_savefig(fig, path)
    plt.close(fig)
    return True


def _other_metrics_table(entries: list[dict]) -> str:
    cols = [(k, h, f) for k, h, f in (
        ("clip_score_cosine", "CLIP cos ↑", ".4f"), ("clip_score_100", "CLIP 100·max(cos,0) ↑", ".2f"),
        ("clip_diversity", "CLIP diversity", ".4f"), ("hps", "HPS ↑", ".2f"),
    ) if any(e.get(k) is not None for e in entries)]
    if not cols:
        return ""
    head = "| name | steps | guidance | " + " | ".join(h for _, h, _ in cols) + " |"
    lines = [head, "|" + "|".join(["---"] * (3 + len(cols))) + "|"]
    for e in entries:
        vals = ["—" if e.get(k) is None else format(e[k], f) for k, _, f in cols]
        lines.append(f"| {e['name']} | {e['steps']} | {e['guidance']:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _write_outputs(suite: Suite, out: Path, entries: list[dict], grid_rows: list[np.ndarray], grid_idx: list[int],
                   stats: RunStats) -> dict:
    grid_u8 = np.concatenate(grid_rows)
    side = grid_u8.shape[-1]
    scale = suite.grid_scale or max(1, min(8, 128 // side))
    grid = _gen.image_grid(_to_float(grid_u8), rows=len(grid_rows), cols=len(grid_idx), scale=scale)
    tmp = out / ".grid.tmp.png"
    grid.save(tmp)
    os.replace(tmp, out / "grid.png")
    images = {"Samples (rows: configurations; columns: the same prompts and seeds in every row)": "grid.png"}
    if plot_metrics(entries, out / "metrics.png"):
        images["Other metrics against steps"] = "metrics.png"

    spp = suite.samples_per_prompt
    notes = []
    other = _other_metrics_table(entries)
    if other:
        notes += ["## Other metrics", "", other, ""]
    features = sorted({str(e.get("fid_features")) for e in entries if e.get("fid") is not None})
    notes += ["## Notes", ""]
    if features:
        notes.append(f"- The FID column holds the Fréchet distance in the **{', '.join(features)}** feature space"
                     + (" (the toy evaluator's features: FID_toy)" if features == ["toy"] else "") + ".")
    adherence = sorted({str(e.get("adherence_metric")) for e in entries if e.get("adherence") is not None})
    if adherence:
        notes.append(f"- Adherence: {'; '.join(adherence)}.")
    notes.append(f"- Suite file: `{suite.source}`; prompts: `{suite.prompt_source}` ({len(suite.prompts)} prompts × "
                 f"{spp} samples = {suite.num_samples} per configuration); seed of sample j of prompt i = "
                 f"{suite.seed} + i·{spp} + j.")
    if suite.overrides:
        notes.append(f"- **Overridden on the command line: {suite.overrides}** — numbers are not comparable with "
                     "the suite's defaults.")
    notes.append("- NFE = UNet evaluations per image (one per step, two with classifier-free guidance, w > 1). "
                 "Latency: median of timed full pipeline calls after warm-up (text encoder + UNet + VAE decode).")
    notes.append(f"- This run: {stats.generated_images} samples generated, {stats.reused_images} reused from "
                 f"`{out / 'samples'}`, {stats.cached_entries} configuration(s) scored earlier; wall time "
                 f"{time.strftime('%H:%M:%S', time.gmtime(stats.wall_seconds))} ({stats.wall_seconds:.0f} s).")
    notes.append("- Grid columns (prompt, seed): " + "; ".join(
        f"{k + 1}. {suite.prompts[i // spp]!r} (seed {suite.seed + i})" for k, i in enumerate(grid_idx)))
    rows = "; ".join(f"{r + 1}. {e['name']} {e['steps']} steps w={e['guidance']:g}" for r, e in enumerate(entries))
    notes.append(f"- Grid rows: {rows}.")
    return write_report(out, suite.name, entries, extra_md="\n".join(notes), images=images, front=suite.front)
