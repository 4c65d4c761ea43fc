"""Metrics on the toy world, computed with the toy evaluator (eval/README.md).

- FID_toy: Fréchet distance between evaluator features of generated images and of real world images.
- Prompt adherence: per discrete attribute, the fraction of images whose predicted attribute equals the prompt's;
  ``adherence`` is the mean over the four attribute kinds, ``adherence_all`` the fraction with all four right.
- Diversity: mean pairwise (1 − cosine) of evaluator features among the samples of one prompt (Cideron et al.
  2024), averaged over prompts; and coverage: the within-prompt spread (std) of the predicted continuous attributes
  (x, y, radius) relative to that of real images of the same prompts — mode collapse shows as a ratio well below 1.
Images are quantised to 8 bits first, as saved images would be.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from stepdistill.eval.diversity import pairwise_diversity
from stepdistill.eval.fid import FeatureStats, frechet_distance, load_or_compute
from stepdistill.eval.generate import quantize
from stepdistill.toy import world
from stepdistill.toy.assets import toy_evaluator_path
from stepdistill.toy.evaluator import ToyEvaluator

REFERENCE_SEED = 2_024_1125
REFERENCE_SIZE = 10_000


def cache_folder() -> Path:
    """Where computed statistics are cached: ``$STEPDISTILL_CACHE``, else ``$XDG_CACHE_HOME/stepdistill``, else
    ``~/.cache/stepdistill``."""
    if os.environ.get("STEPDISTILL_CACHE"):
        return Path(os.environ["STEPDISTILL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "stepdistill"


def content_digest(path: str | Path) -> str:
    """sha256 over a file's bytes, or a folder's files (relative names and bytes, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class ToyJudge:
    """Loads the toy evaluator and scores batches of generated images against their prompts."""

    def __init__(self, evaluator_path: str | Path | None = None, batch_size: int = 500, reference_size: int = REFERENCE_SIZE,
                 cache_dir: str | Path | None = None):
        if evaluator_path is None:
            evaluator_path = toy_evaluator_path()
        self.evaluator_path = Path(evaluator_path)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_folder()
        self.model = ToyEvaluator.from_pretrained(str(evaluator_path), local_files_only=True).eval()
        self.batch_size = batch_size
        self.reference_size = reference_size
        self._reference: FeatureStats | None = None

    @torch.no_grad()
    def analyze(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Evaluator outputs for (N, 3, 32, 32) images in [-1, 1]: features, predicted discrete indices, continuous."""
        feats, cont = [], []
        preds: dict[str, list[np.ndarray]] = defaultdict(list)
        for s in range(0, len(images), self.batch_size):
            out = self.model(quantize(images[s:s + self.batch_size].float()))
            feats.append(out["features"].numpy())
            cont.append(out["continuous"].numpy())
            for name in world.DISCRETE_ATTRIBUTES:
                preds[name].append(out[name].argmax(1).numpy())
        result = {name: np.concatenate(v) for name, v in preds.items()}
        result["features"] = np.concatenate(feats).astype(np.float64)
        result["continuous"] = np.concatenate(cont)
        return result

    def reference_fingerprint(self) -> dict:
        """What the reference statistics depend on: the evaluator's files (contents), the world's code, the seed
        and the number of images."""
        return {"features": "toy", "num": self.reference_size, "seed": REFERENCE_SEED,
                "evaluator": content_digest(self.evaluator_path), "world": content_digest(Path(world.__file__))}

    def reference_stats(self) -> FeatureStats:
        """Feature statistics of ``reference_size`` real world images (uniform over the world, fixed seed), cached
        in :func:`cache_folder` under their fingerprint (computed once per evaluator, world and size)."""
        if self._reference is None:
            fingerprint = self.reference_fingerprint()
            name = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]

            def compute() -> np.ndarray:
                images, _ = world.sample(REFERENCE_SEED, self.reference_size)
                return self.analyze(torch.from_numpy(images))["features"]

            self._reference = load_or_compute(self.cache_dir / f"toy-reference-{name}.npz", fingerprint, compute)
        return self._reference

    def score(self, images: torch.Tensor, prompts: list[str]) -> dict:
        """All toy metrics of generated ``images`` (aligned with ``prompts``)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = self.analyze(images)
        target = [world.parse_prompt(p) for p in prompts]
        per_attr = {
            name: float(np.mean(out[name] == np.array([t[name] for t in target]))) for name in world.DISCRETE_ATTRIBUTES
        }
        all_right = np.ones(len(prompts), dtype=bool)
        for name in world.DISCRETE_ATTRIBUTES:
            all_right &= out[name] == np.array([t[name] for t in target])
        stats = FeatureStats.from_features(out["features"])
        ref = self.reference_stats()
        fid = frechet_distance(stats.mean, stats.cov, ref.mean, ref.cov)

        real_images, _ = world.sample(REFERENCE_SEED + 1, len(prompts), prompts=prompts)
        real = self.analyze(torch.from_numpy(real_images))
        groups = _group(prompts)
        diversity = pairwise_diversity([out["features"][idx] for idx in groups.values() if len(idx) > 1])
        real_diversity = pairwise_diversity([real["features"][idx] for idx in groups.values() if len(idx) > 1])
        spread = _within_prompt_std(out["continuous"], groups)
        real_spread = _within_prompt_std(real["continuous"], groups)
        coverage = {name: float(spread[k] / real_spread[k]) for k, name in enumerate(world.CONTINUOUS_ATTRIBUTES)}
        return {
            "fid": float(fid),
            "fid_features": "toy",
            "fid_reference_size": ref.num,
            "adherence": float(np.mean(list(per_attr.values()))),
            "adherence_per_attribute": per_attr,
            "adherence_all": float(all_right.mean()),
            "diversity": float(diversity),
            "diversity_real": float(real_diversity),
            "diversity_features": "toy",
            "coverage": coverage,
            "num_samples": len(prompts),
        }


def _group(prompts: list[str]) -> dict[str, np.ndarray]:
    idx: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        idx[p].append(i)
    return {p: np.array(v) for p, v in idx.items()}


def _within_prompt_std(values: np.ndarray, groups: dict[str, np.ndarray]) -> np.ndarray:
    """Mean over prompts (with ≥ 2 samples) of the per-attribute standard deviation within the prompt."""
    stds = [values[idx].std(axis=0, ddof=1) for idx in groups.values() if len(idx) > 1]
    if not stds:
        raise ValueError("coverage needs at least two samples of some prompt")
    return np.mean(stds, axis=0)
