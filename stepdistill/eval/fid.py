"""Fréchet distances between feature distributions, feature statistics, and the clean preprocessing FID uses.

* :func:`frechet_distance` — d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}) (Heusel et al. 2017, "GANs trained by a
  two time-scale update rule converge to a local Nash equilibrium"; reference code bioinf-jku/TTUR). It works for
  any features: Inception pool3 (FID), the toy evaluator (FID_toy), CLIP or DINOv2 embeddings (FD_CLIP, FD_DINOv2).
* :class:`FeatureStats`, :class:`StreamingStats`, :func:`load_or_compute` — mean/covariance of features, accumulated
  batch by batch, cached as ``.npz`` (keys ``mu``/``sigma`` as pytorch-fid and clean-fid write them) together with a
  JSON fingerprint of how they were computed; a cache is reused only when its fingerprint matches exactly.
* :func:`quantize_images`, :func:`clean_resize` — the "clean" preprocessing of Parmar et al. 2022 ("On Aliased
  Resizing and Surprising Subtleties in GAN Evaluation"): quantise to uint8 as a saved image would be, then resize
  each channel as a float image with PIL's bicubic filter (which antialiases when downsampling).

The FID Inception-v3 network itself (plain ``torch.nn``, or its TorchScript form) is in
:mod:`stepdistill.eval.inception`. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import scipy.linalg
import torch
from PIL import Image

from stepdistill.core.outputs import atomic_file

__all__ = [
    "frechet_distance",
    "FeatureStats",
    "StreamingStats",
    "load_or_compute",
    "compute_stats",
    "compute_fid",
    "quantize_images",
    "clean_resize",
]

# Largest |imaginary part| of sqrtm(Σ₁Σ₂) that is treated as round-off and dropped.
IMAG_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------
def _sqrtm_or_none(matrix: np.ndarray) -> np.ndarray | None:
    """scipy's matrix square root, or None when the matrix is singular (scipy warns), sqrtm fails, or the result
    is not finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            root = scipy.linalg.sqrtm(matrix)
        except (scipy.linalg.LinAlgError, scipy.linalg.LinAlgWarning, ValueError):
            return None
    if isinstance(root, tuple):  # very old scipy with disp=False semantics
        root = root[0]
    if not np.all(np.isfinite(root)):
        return None
    return root


def _max_imag(matrix: np.ndarray) -> float:
    return float(np.max(np.abs(matrix.imag))) if np.iscomplexobj(matrix) and matrix.size else 0.0


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}), in float64 with ``scipy.linalg.sqrtm`` (as TTUR, pytorch-fid and
    clean-fid compute it). When Σ₁Σ₂ is singular (scipy warns), sqrtm fails or is not finite, or its imaginary part
    is not negligible, ``eps·I`` is added to both covariances and the root is taken again. An imaginary part is
    dropped only when it is round-off (max |imag| < 1e-3); otherwise :class:`ValueError` is raised.

    The value is not clipped: identical statistics give ~0 up to round-off (possibly a tiny negative number).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors must be 1-D and of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be {d}x{d}, got {sigma1.shape} and {sigma2.shape}")
    if not (np.all(np.isfinite(mu1)) and np.all(np.isfinite(mu2))
            and np.all(np.isfinite(sigma1)) and np.all(np.isfinite(sigma2))):
        raise ValueError("statistics contain NaN or inf")

    diff = mu1 - mu2
    covmean = _sqrtm_or_none(sigma1 @ sigma2)
    if covmean is None or _max_imag(covmean) >= IMAG_TOLERANCE:
        warnings.warn(
            f"Fréchet distance: the product of the covariances is singular or badly conditioned; adding {eps:g}·I "
            "to both covariances (typically fewer samples than feature dimensions).",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(d) * eps
        covmean = _sqrtm_or_none((sigma1 + offset) @ (sigma2 + offset))
        if covmean is None:
            raise ValueError(f"sqrtm(Σ₁Σ₂) is not finite even after adding {eps:g}·I to the covariances")
    imag = _max_imag(covmean)
    if imag >= IMAG_TOLERANCE:
        raise ValueError(f"sqrtm(Σ₁Σ₂) has a non-negligible imaginary component (max |imag| = {imag:.3g})")
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------------------------
# Feature statistics
# ---------------------------------------------------------------------------------------------------------------
def _canonical_fingerprint(fingerprint: Mapping[str, Any] | None) -> dict:
    """JSON round trip (sorted keys), so tuples/lists and key order do not affect equality."""
    if fingerprint is None:
        return {}
    try:
        return json.loads(json.dumps(dict(fingerprint), sort_keys=True))
    except TypeError as err:
        raise TypeError(f"a statistics fingerprint must be JSON-serialisable: {err}") from None


def _as_2d_float64(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {arr.shape}")
    return arr


@dataclass
class FeatureStats:
    """Mean and covariance (ddof=1, as ``np.cov``) of ``num`` feature vectors, with a fingerprint describing how
    they were computed (feature extractor, resolution, resize mode, number of images, ...)."""

    mean: np.ndarray
    cov: np.ndarray
    num: int
    fingerprint: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_features(cls, features, fingerprint: Mapping[str, Any] | None = None) -> "FeatureStats":
        feats = _as_2d_float64(features)
        if feats.shape[0] < 2:
            raise ValueError("at least two feature vectors are needed for a covariance")
        return cls(
            mean=feats.mean(axis=0),
            cov=np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1]),
            num=int(feats.shape[0]),
            fingerprint=_canonical_fingerprint(fingerprint),
        )

    def frechet_distance(self, other: "FeatureStats", eps: float = 1e-6) -> float:
        return frechet_distance(self.mean, self.cov, other.mean, other.cov, eps=eps)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``mu``, ``sigma``, ``num`` and the JSON ``fingerprint`` to an ``.npz`` file, atomically (a temporary
        file in the same folder, then a rename: :func:`stepdistill.core.outputs.atomic_file`)."""
        path = Path(path)
        with atomic_file(path) as tmp, open(tmp, "wb") as handle:
            np.savez(
                handle,
                mu=np.asarray(self.mean, dtype=np.float64),
                sigma=np.asarray(self.cov, dtype=np.float64),
                num=np.asarray(self.num, dtype=np.int64),
                fingerprint=np.asarray(json.dumps(_canonical_fingerprint(self.fingerprint), sort_keys=True)),
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Read statistics written by :meth:`save`; also reads pytorch-fid / clean-fid ``.npz`` files (``mu`` and
        ``sigma`` only: ``num`` is then -1 and the fingerprint empty)."""
        with np.load(str(path), allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{path}: not a statistics file (expected arrays 'mu' and 'sigma')")
            mean = np.asarray(data["mu"], dtype=np.float64)
            cov = np.asarray(data["sigma"], dtype=np.float64)
            num = int(data["num"]) if "num" in data else -1
            fingerprint = json.loads(str(data["fingerprint"])) if "fingerprint" in data else {}
        return cls(mean=mean, cov=cov, num=num, fingerprint=fingerprint)


class StreamingStats:
    """Mean and covariance accumulated batch by batch, so that features need not be held in memory.

    Keeps float64 sums of x and x·xᵀ over the samples. To avoid the cancellation of the one-pass formula when the
    mean is large compared with the spread, the sums are taken of x − s with a fixed shift s (the first batch's
    mean); the covariance is invariant to the shift.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.num = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features) -> "StreamingStats":
        feats = _as_2d_float64(features)
        if feats.shape[0] == 0:
            return self
        if self.dim is None:
            self.dim = int(feats.shape[1])
        if feats.shape[1] != self.dim:
            raise ValueError(f"feature dimension changed: expected {self.dim}, got {feats.shape[1]}")
        if self._shift is None:
            self._shift = feats.mean(axis=0)
            self._sum = np.zeros(self.dim, dtype=np.float64)
            self._outer = np.zeros((self.dim, self.dim), dtype=np.float64)
        centred = feats - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.num += int(feats.shape[0])
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.num == 0:
            raise ValueError("no features accumulated")
        return self._shift + self._sum / self.num

    @property
    def cov(self) -> np.ndarray:
        if self.num < 2:
            raise ValueError("at least two feature vectors are needed for a covariance")
        m = self._sum / self.num
        cov = (self._outer - self.num * np.outer(m, m)) / (self.num - 1)
        return (cov + cov.T) / 2.0  # exact symmetry despite round-off

    def to_stats(self, fingerprint: Mapping[str, Any] | None = None) -> FeatureStats:
        return FeatureStats(mean=self.mean, cov=self.cov, num=self.num, fingerprint=_canonical_fingerprint(fingerprint))


def load_or_compute(
    path: str | os.PathLike,
    fingerprint: Mapping[str, Any],
    compute_fn: Callable[[], "FeatureStats | np.ndarray"],
) -> FeatureStats:
    """Cached statistics: reuse ``path`` only if its fingerprint equals ``fingerprint`` exactly; otherwise (absent,
    unreadable or different fingerprint) call ``compute_fn()`` (returning :class:`FeatureStats` or an (N, D) feature
    array), stamp it with ``fingerprint`` and overwrite ``path`` atomically."""
    path = Path(path)
    wanted = _canonical_fingerprint(fingerprint)
    if path.exists():
        try:
            cached = FeatureStats.load(path)
        except Exception as err:  # a truncated or foreign file: recompute, but say so
            warnings.warn(f"ignoring unreadable statistics cache {path}: {err}", RuntimeWarning, stacklevel=2)
        else:
            if cached.fingerprint == wanted:
                return cached
    result = compute_fn()
    stats = result if isinstance(result, FeatureStats) else FeatureStats.from_features(result)
    stats = FeatureStats(mean=stats.mean, cov=stats.cov, num=stats.num, fingerprint=wanted)
    stats.save(path)
    return stats


def compute_stats(
    feature_fn: Callable[[Any], Any],
    images_iterable: Iterable[Any],
    fingerprint: Mapping[str, Any] | None = None,
) -> FeatureStats:
    """Stream batches through ``feature_fn`` (batch -> (B, D) array or tensor) and accumulate their statistics."""
    acc = StreamingStats()
    for batch in images_iterable:
        acc.update(feature_fn(batch))
    if acc.num < 2:
        raise ValueError("compute_stats needs at least two images")
    return acc.to_stats(fingerprint)


def compute_fid(
    feature_fn: Callable[[Any], Any],
    images_iterable: Iterable[Any],
    ref_stats: "FeatureStats | tuple[np.ndarray, np.ndarray]",
    eps: float = 1e-6,
) -> float:
    """Fréchet distance between the features of ``images_iterable`` (streamed batch by batch through any
    ``feature_fn``) and reference statistics (a :class:`FeatureStats` or a ``(mu, sigma)`` pair).

    With the Inception features this is FID; with the toy evaluator's features FID_toy; with CLIP / DINOv2
    embeddings FD_CLIP / FD_DINOv2. Which extractor was used is the caller's to report."""
    if isinstance(ref_stats, FeatureStats):
        ref_mu, ref_sigma = ref_stats.mean, ref_stats.cov
    else:
        ref_mu, ref_sigma = ref_stats
    stats = compute_stats(feature_fn, images_iterable)
    if stats.dim != np.asarray(ref_mu).shape[0]:
        raise ValueError(f"feature dimension {stats.dim} does not match the reference statistics ({np.asarray(ref_mu).shape[0]})")
    return frechet_distance(stats.mean, stats.cov, ref_mu, ref_sigma, eps=eps)


# ---------------------------------------------------------------------------------------------------------------
# Clean preprocessing (Parmar et al. 2022)
# ---------------------------------------------------------------------------------------------------------------
def quantize_images(images) -> np.ndarray:
    """Images in [-1, 1] (float, (N, 3, H, W), tensor or array) -> uint8 in [0, 255], rounded as a PNG writer
    would (``round((x + 1) / 2 · 255)``). uint8 input is returned unchanged (as an array)."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return images.detach().cpu().numpy()
        images = images.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    arr = (np.clip(arr.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5
    return np.round(arr).astype(np.uint8)


def clean_resize(images_uint8, size: int | tuple[int, int] = 299) -> np.ndarray:
    """Resize uint8 images (N, 3, H, W) to ``size`` (int or (height, width)) the clean-fid way: each channel as a
    32-bit float PIL image (mode "F") with the bicubic filter, so that no second quantisation happens and
    downsampling is antialiased. Returns float32 (N, 3, h, w) in [0, 255] (bicubic may overshoot slightly; like
    clean-fid we do not clip)."""
    if isinstance(images_uint8, torch.Tensor):
        images_uint8 = images_uint8.detach().cpu().numpy()
    arr = np.asarray(images_uint8)
    if arr.dtype != np.uint8:
        raise TypeError(f"clean_resize expects uint8 images (quantise first, see quantize_images), got {arr.dtype}")
    if arr.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {arr.shape}")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    out = np.empty((arr.shape[0], arr.shape[1], height, width), dtype=np.float32)
    for n in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            channel = Image.fromarray(arr[n, c].astype(np.float32), mode="F")
            out[n, c] = np.asarray(channel.resize((width, height), resample=Image.BICUBIC), dtype=np.float32)
    return out

