"""The files a suite run keeps (:mod:`stepdistill.eval.runner`): cheap identities of inputs for fingerprints,
atomically written JSON, and the per-batch sample store.

Samples of one configuration live under ``<out>/samples/<slug>/``: one compressed ``batch-<start>-<end>.npz`` of
uint8 images (``sample_format: npz``) or a ``batch-<start>-<end>/`` folder of PNGs (``sample_format: png``), each
written to a temporary name and renamed into place, so a batch that exists is complete. ``fingerprint.json``
records what the samples depend on; samples of another fingerprint are discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from stepdistill.core.outputs import atomic_file, write_text_atomic

__all__ = ["FORMAT_VERSION", "SampleStore", "digest", "folder_digest", "read_stored_samples", "uint8_to_float",
           "write_json"]

FORMAT_VERSION = 1  # of the sample and entry fingerprints: bump it to invalidate every stored sample and entry


def digest(obj: Any) -> str:
    """sha256 of ``obj`` as sorted JSON (``str`` for anything JSON cannot hold)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def folder_digest(path: str | os.PathLike) -> str:
    """Cheap identity of a file or folder: relative names, sizes and modification times (no content reads)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return digest([p.name, st.st_size, st.st_mtime_ns])
    rows = []
    for f in sorted(p.rglob("*")):
        if f.is_file():
            st = f.stat()
            rows.append([str(f.relative_to(p)), st.st_size, st.st_mtime_ns])
    return digest(rows)


def uint8_to_float(u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float images in [-1, 1] (exactly the 8-bit levels)."""
    return torch.from_numpy(np.ascontiguousarray(u8)).float() / 127.5 - 1.0


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def _umask_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) files; give them the permissions a plain open() would."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


class SampleStore:
    """The stored samples of one configuration: atomic per-batch files, kept only while ``fingerprint`` holds."""

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
            write_json(fp_file, fingerprint)

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
            with atomic_file(path) as tmp, open(tmp, "wb") as handle:
                np.savez_compressed(handle, images=images, seeds=np.asarray(seeds, dtype=np.int64),
                                    seconds=np.asarray(seconds))
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
        return _read_batch(self._name(start, end), start, end)


def _read_batch(path: Path, start: int, end: int) -> np.ndarray:
    """The images of one stored batch (uint8, N×3×H×W): an ``.npz`` file or a folder of PNGs."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return data["images"]
    from PIL import Image

    return np.stack([np.asarray(Image.open(path / f"{i:07d}.png").convert("RGB")).transpose(2, 0, 1)
                     for i in range(start, end)])


_BATCH_NAME = re.compile(r"batch-(\d+)-(\d+)(\.npz)?")


def read_stored_samples(folder: Path, indices: Sequence[int]) -> np.ndarray | None:
    """Samples ``indices`` of one configuration (uint8, N×3×H×W), read from its stored batches in ``folder`` (its
    ``samples/<slug>/``, either format) without touching them: the fingerprint is not checked, so the caller knows
    which run wrote them. None when no stored batch holds one of the indices."""
    batches = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _BATCH_NAME.fullmatch(path.name)
        if match and (match[3] is not None) == path.is_file():
            batches.append((int(match[1]), int(match[2]), path))
    loaded: dict[Path, np.ndarray] = {}
    images = []
    for index in indices:
        hit = next(((start, end, path) for start, end, path in batches if start <= index < end), None)
        if hit is None:
            return None
        start, end, path = hit
        if path not in loaded:
            loaded[path] = _read_batch(path, start, end)
        images.append(loaded[path][index - start])
    return np.stack(images) if images else None
