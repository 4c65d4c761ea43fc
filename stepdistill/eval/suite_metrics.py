"""The metrics of a suite, built once per run, and their streaming scorers for one configuration.

``toy`` (FID_toy, adherence, diversity, coverage via :class:`~stepdistill.eval.toy_metrics.ToyJudge`), ``fid``
(Inception-v3 FID against reference statistics, :class:`~stepdistill.eval.fid_reference.InceptionFid`), ``clip``
(CLIP score; also the adherence and, with ≥ 2 samples per prompt, the diversity of a non-toy suite), ``hpsv2``.
Scorers read the stored 8-bit samples (what a saved image holds).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from stepdistill.eval.clip_score import ClipScorer, OpenClipScorer
from stepdistill.eval.diversity import pairwise_diversity
from stepdistill.eval.fid import StreamingStats
from stepdistill.eval.fid_reference import InceptionFid
from stepdistill.eval.hps import HPSv2Scorer
from stepdistill.eval.run_files import FORMAT_VERSION, folder_digest, uint8_to_float
from stepdistill.eval.suite import Suite
from stepdistill.eval.toy_metrics import ToyJudge
from stepdistill.toy.assets import toy_evaluator_path

__all__ = ["SuiteMetrics", "Accumulators"]


class SuiteMetrics:
    """The scorers a suite needs, built (and reference statistics computed or loaded) before any generation, so a
    missing weight file or reference fails the run at once; :meth:`accumulators` gives fresh streaming scorers for
    one configuration. ``fingerprint`` is what an entry's scores depend on besides its samples."""

    def __init__(self, suite: Suite, out: Path, device: str, log: Callable[[str], None]):
        self.suite, self.log, self.device = suite, log, device
        self.fingerprint: dict = {"metrics": list(suite.metrics), "version": FORMAT_VERSION}
        self.judge: ToyJudge | None = None
        self.fid: InceptionFid | None = None
        self.clip = self.hps = None
        if "toy" in suite.metrics:
            evaluator = suite.toy_evaluator or str(toy_evaluator_path())
            t0 = time.time()
            self.judge = ToyJudge(evaluator, reference_size=suite.toy_reference_size)
            self.judge.reference_stats()
            self.toy_resolution = int(self.judge.model.config.resolution)
            log(f"toy evaluator {evaluator}: reference statistics of {suite.toy_reference_size} real images "
                f"({time.time() - t0:.1f} s)")
            self.fingerprint["toy"] = {"evaluator": folder_digest(evaluator), "reference": suite.toy_reference_size}
        if "fid" in suite.metrics:
            self.fid = InceptionFid(suite, out, device, log)  # MetricUnavailable with instructions
            self.fingerprint["fid"] = self.fid.fingerprint
        if "clip" in suite.metrics:
            if suite.clip_backend == "open_clip":
                self.clip = OpenClipScorer(suite.clip_model, model_name=suite.clip_arch, device=device)
            else:
                self.clip = ClipScorer(suite.clip_model, device=device)
            self.fingerprint["clip"] = {"backend": suite.clip_backend, "model": folder_digest(suite.clip_model),
                                        "arch": suite.clip_arch, "name": self.clip.name}
        if "hpsv2" in suite.metrics:
            self.hps = HPSv2Scorer(suite.hps_checkpoint, version=suite.hps_version, device=device)
            self.fingerprint["hpsv2"] = {"checkpoint": folder_digest(self.hps.checkpoint), "version": self.hps.version}

    def check_images(self, u8: np.ndarray, pipeline: str) -> None:
        """Refuse images the toy evaluator cannot read (another resolution), naming the pipeline that made them."""
        if self.judge is not None and u8.shape[-2:] != (self.toy_resolution, self.toy_resolution):
            raise ValueError(
                f"the toy metrics need {self.toy_resolution}x{self.toy_resolution} images, but {pipeline} "
                f"made {u8.shape[-2]}x{u8.shape[-1]} ones; set the suite's resolution: {self.toy_resolution} or use a "
                "toy-world pipeline"
            )

    def accumulators(self) -> "Accumulators":
        return Accumulators(self)


class Accumulators:
    """Streaming scorers for one configuration: ``update(uint8 batch, index of its first sample)`` then
    ``results()``."""

    def __init__(self, m: SuiteMetrics):
        self.m = m
        suite = m.suite
        self.spp = suite.samples_per_prompt
        self.toy_images: list[np.ndarray] = []
        self.fid_stats = StreamingStats() if m.fid is not None else None
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
            self.fid_stats.update(m.fid.features(images))
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
            toy = m.judge.score(uint8_to_float(u8), prompts)
            out.update(toy)
            out["fid_toy"] = toy["fid"]
            out["adherence_metric"] = "toy attribute accuracy (mean over shape, colour, size, background)"
        if self.fid_stats is not None:
            if m.judge is not None:
                out["fid_toy_reference_size"] = out.pop("fid_reference_size", None)
            out.update(m.fid.result(self.fid_stats))
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
