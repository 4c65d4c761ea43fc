"""Inception FID for a suite (metric ``fid``): the extractor, the images it sees, and the reference statistics.

The reference is either ``reference_stats`` (a ``.npz`` of mean and covariance, checked against the extractor and
``fid_resize`` it was computed with) or ``reference_images`` (a folder; its statistics are computed once and cached
with a fingerprint of the extractor, the file listing, the image count and the preprocessing, under
``reference_stats`` when given, else ``<out>/cache/fid-reference-<hash>.npz``). With ``fid_resize: S`` every image
(generated or reference) is first cropped to its centre square and resized to S×S the clean way, as the
COCO-at-256 protocol does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from stepdistill.eval.fid import (
    FeatureStats,
    StreamingStats,
    clean_resize,
    frechet_distance,
    load_or_compute,
)
from stepdistill.eval.inception import InceptionV3Features, resolve_inception_path
from stepdistill.eval.run_files import digest, folder_digest
from stepdistill.eval.suite import Suite

__all__ = ["INCEPTION_FID_FEATURES", "REFERENCE_IMAGE_SUFFIXES", "InceptionFid"]

INCEPTION_FID_FEATURES = "inception-2015-12-05"
REFERENCE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _center_square(img: np.ndarray) -> np.ndarray:
    _, h, w = img.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return img[:, top:top + s, left:left + s]


class InceptionFid:
    """The Inception-v3 of ``suite.inception`` (:class:`~stepdistill.eval.errors.MetricUnavailable` with
    instructions when absent) and the suite's reference statistics, loaded or computed at construction, so that a
    missing weight file or reference fails a run before any generation. ``fingerprint`` is what an entry's FID
    depends on."""

    def __init__(self, suite: Suite, out: Path, device: str, log: Callable[[str], None]):
        self.suite, self.log = suite, log
        weights = resolve_inception_path(suite.inception)
        self.inception = InceptionV3Features.from_pretrained(weights, device=device)
        self.reference_info: dict = {}
        self.reference = self._reference(out)
        self.fingerprint = {"inception": folder_digest(weights), "backend": self.inception.backend,
                            "reference": digest(self.reference.fingerprint) if self.reference.fingerprint
                            else folder_digest(suite.reference_stats),
                            "fid_resize": suite.fid_resize}

    def prepare(self, images: list[np.ndarray] | np.ndarray) -> list[np.ndarray]:
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

    def features(self, images: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Inception pool3 features (N, 2048) of uint8 (3, H, W) images, after :meth:`prepare`."""
        prepared = self.prepare(images)
        if len({im.shape for im in prepared}) == 1:
            return self.inception.extract(np.stack(prepared))
        return np.concatenate([self.inception.extract(im[None]) for im in prepared])

    def result(self, stats: StreamingStats) -> dict:
        """The report fields of the FID of ``stats`` (features of one configuration's samples)."""
        ref, suite = self.reference, self.suite
        return {
            "fid": float(frechet_distance(stats.mean, stats.cov, ref.mean, ref.cov)),
            "fid_features": INCEPTION_FID_FEATURES,
            "fid_extractor": f"{self.inception.name} ({self.inception.backend})",
            "fid_preprocessing": (f"8-bit, centre square resized to {suite.fid_resize} px (PIL bicubic, float), "
                                  "then clean resize to 299" if suite.fid_resize else "8-bit, clean resize to 299"),
            "fid_reference_size": ref.num,
            "fid_reference": self.reference_info,
        }

    def _reference(self, out: Path) -> FeatureStats:
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
            self.reference_info = {"stats": suite.reference_stats, "num": stats.num}
            self.log(f"FID reference statistics: {suite.reference_stats} ({stats.num if stats.num >= 0 else '?'} images)")
            return stats
        folder = Path(suite.reference_images)
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in REFERENCE_IMAGE_SUFFIXES)
        if suite.reference_limit:
            files = files[: suite.reference_limit]
        if len(files) < 2:
            raise ValueError(f"reference_images {folder}: found {len(files)} image(s) "
                             f"({', '.join(REFERENCE_IMAGE_SUFFIXES)}); FID needs at least 2")
        listing = digest([[f.name, f.stat().st_size] for f in files])
        fingerprint = self.inception.fingerprint(
            reference=folder.name, listing=listing, num_images=len(files), fid_resize=suite.fid_resize,
            crop="center-square" if suite.fid_resize else "none", backend=self.inception.backend,
        )
        cache = Path(suite.reference_stats) if suite.reference_stats else \
            out / "cache" / f"fid-reference-{digest(fingerprint)[:12]}.npz"

        def compute():
            from PIL import Image

            self.log(f"FID reference statistics: {len(files)} images from {folder} -> {cache}")
            acc, t0 = StreamingStats(), time.time()
            for s in range(0, len(files), 32):
                imgs = [np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files[s:s + 32]]
                acc.update(self.features(imgs))
            self.log(f"  reference statistics done ({time.time() - t0:.1f} s)")
            return acc.to_stats()

        stats = load_or_compute(cache, fingerprint, compute)
        self.reference_info = {"images": str(folder), "num": stats.num, "stats": str(cache)}
        return stats
