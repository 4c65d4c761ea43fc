"""Sample diversity and attribute coverage — how mode collapse shows up.

* :func:`pairwise_diversity` — per prompt, the mean pairwise cosine *distance* (1 − cos) between the embeddings of
  its N samples (generated from different seeds), averaged over prompts: the diversity measure of Cideron et al.
  2024, "Diversity-Rewarded CFG Distillation". Report it with the name of the embedding model.
* :func:`coverage` — for continuous attributes (e.g. the toy world's position and size), the spread of the samples
  compared with the real distribution: the ratio of standard deviations (< 1 means a narrower, collapsed spread)
  and the 1-D Wasserstein distance between the marginals (``scipy.stats.wasserstein_distance``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import wasserstein_distance

__all__ = ["pairwise_diversity", "per_prompt_diversity", "coverage"]


def _as_array(x, ndim: int) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float64).numpy()
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    arr = np.asarray(x, dtype=np.float64)
    if ndim == 2 and arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != ndim:
        raise ValueError(f"expected a {ndim}-D array, got shape {arr.shape}")
    return arr


def per_prompt_diversity(features_per_prompt: Sequence) -> np.ndarray:
    """Mean pairwise (1 − cosine similarity) among each prompt's samples; one value per prompt."""
    values = []
    for i, feats in enumerate(features_per_prompt):
        x = _as_array(feats, 2)
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"prompt {i}: diversity needs at least two samples, got {n}")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ValueError(f"prompt {i}: a feature vector is zero; its cosine similarity is undefined")
        unit = x / norms
        sim = unit @ unit.T
        upper = np.triu_indices(n, k=1)
        values.append(float(np.mean(1.0 - sim[upper])))
    if not values:
        raise ValueError("no prompts given")
    return np.asarray(values)


def pairwise_diversity(features_per_prompt: Sequence) -> float:
    """Mean over prompts of the mean pairwise (1 − cosine similarity) among that prompt's N samples.

    ``features_per_prompt``: one (N_i, D) array (or tensor) of sample embeddings per prompt, N_i ≥ 2.
    0 for identical samples; larger is more diverse (≤ 2)."""
    return float(np.mean(per_prompt_diversity(features_per_prompt)))


def coverage(samples, reference, names: Sequence[str] | None = None) -> dict:
    """Compare continuous attributes of generated ``samples`` (N, K) with ``reference`` ones (M, K) (1-D arrays
    are one attribute).

    Returns ``{"per_attribute": {name: {"sample_std", "reference_std", "std_ratio", "wasserstein",
    "sample_mean", "reference_mean"}}, "mean_std_ratio", "min_std_ratio", "mean_wasserstein"}``. A std ratio well
    below 1 is the signature of mode collapse. Names default to ``attr0``, ``attr1``, ..."""
    s = _as_array(samples, 2)
    r = _as_array(reference, 2)
    if s.shape[1] != r.shape[1]:
        raise ValueError(f"samples have {s.shape[1]} attributes, reference {r.shape[1]}")
    if s.shape[0] < 2 or r.shape[0] < 2:
        raise ValueError("coverage needs at least two samples and two reference values")
    k = s.shape[1]
    names = list(names) if names is not None else [f"attr{i}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} names for {k} attributes")
    per = {}
    for i, name in enumerate(names):
        s_std, r_std = float(np.std(s[:, i], ddof=1)), float(np.std(r[:, i], ddof=1))
        if r_std > 0:
            ratio = s_std / r_std
        else:
            ratio = 1.0 if s_std == 0 else float("inf")
        per[name] = {
            "sample_std": s_std,
            "reference_std": r_std,
            "std_ratio": ratio,
            "wasserstein": float(wasserstein_distance(s[:, i], r[:, i])),
            "sample_mean": float(np.mean(s[:, i])),
            "reference_mean": float(np.mean(r[:, i])),
        }
    ratios = [v["std_ratio"] for v in per.values()]
    return {
        "per_attribute": per,
        "mean_std_ratio": float(np.mean(ratios)),
        "min_std_ratio": float(np.min(ratios)),
        "mean_wasserstein": float(np.mean([v["wasserstein"] for v in per.values()])),
    }
