"""The prompt router of multi-student distillation (MSD, Song et al. 2024, arXiv:2410.23274; no code released).

MSD splits the condition set into K disjoint subsets with a filter function F and trains student k only on c ∈ C_k;
at inference the same deterministic function picks the student (1 UNet evaluation per image, no learned router).
Two filters, both pure functions of the prompt and saved as JSON with the student:

- :class:`KeywordRouter`: student k takes the prompts that match ``patterns[k]`` (a case-insensitive regular
  expression searched in the prompt, first match in order wins), e.g. the toy's shape words
  ``[circle, square, triangle, cross]``; a prompt no pattern matches goes to ``default`` (an error when null);
- :class:`KMeansRouter`: k-means with K clusters on the teacher's pooled text embeddings (the mean over tokens of the
  encoder hidden states, :func:`pooled_embedding`), fitted once (scipy's ``kmeans2``, k-means++ seeding, fixed seed);
  a prompt goes to the nearest centroid (the paper's exact text partition is not public).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

ROUTER_FILE = "router.json"


def pooled_embedding(embeds: torch.Tensor) -> np.ndarray:
    """(B, L, D) encoder hidden states → (B, D) float64: the mean over the L token positions."""
    return embeds.detach().double().mean(dim=1).cpu().numpy()


class KeywordRouter:
    kind = "keyword"

    def __init__(self, patterns: Sequence[str], default: int | None = None) -> None:
        if not patterns:
            raise ValueError("a keyword router needs one pattern per student")
        for p in patterns:
            re.compile(p)  # a bad pattern fails here, with re's message
        if default is not None and not 0 <= default < len(patterns):
            raise ValueError(f"default student {default} out of range for {len(patterns)} students")
        self.patterns = [str(p) for p in patterns]
        self.default = default
        self._compiled = [re.compile(p, re.IGNORECASE) for p in self.patterns]

    @property
    def num_students(self) -> int:
        return len(self.patterns)

    def route(self, prompts: Sequence[str], embeds: torch.Tensor | None = None) -> list[int]:
        out = []
        for prompt in prompts:
            k = next((i for i, rx in enumerate(self._compiled) if rx.search(prompt)), self.default)
            if k is None:
                raise ValueError(f"no student's pattern matches the prompt {prompt!r} (patterns {self.patterns}) and "
                                 "the router has no default student")
            out.append(k)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "patterns": self.patterns, "default": self.default}


class KMeansRouter:
    kind = "kmeans"

    def __init__(self, centroids: np.ndarray | Sequence[Sequence[float]]) -> None:
        self.centroids = np.asarray(centroids, dtype=np.float64)
        if self.centroids.ndim != 2 or len(self.centroids) < 1:
            raise ValueError(f"centroids must be a (K, D) array, got shape {self.centroids.shape}")

    @property
    def num_students(self) -> int:
        return len(self.centroids)

    @classmethod
    def fit(cls, embeds: torch.Tensor, num_students: int, seed: int = 0) -> "KMeansRouter":
        """k-means (scipy ``kmeans2``, k-means++ init, ``seed``) on the pooled embeddings of the training prompts."""
        from scipy.cluster.vq import kmeans2

        x = pooled_embedding(embeds)
        if len(x) < num_students:
            raise ValueError(f"k-means with {num_students} clusters needs at least as many prompts, got {len(x)}")
        centroids, labels = kmeans2(x, num_students, minit="++", seed=np.random.default_rng(seed))
        empty = sorted(set(range(num_students)) - set(labels.tolist()))
        if empty:
            raise ValueError(f"k-means left cluster(s) {empty} empty: use fewer students or more distinct prompts")
        return cls(centroids)

    def route(self, prompts: Sequence[str], embeds: torch.Tensor | None = None) -> list[int]:
        if embeds is None:
            raise ValueError("a k-means router routes on the prompts' text embeddings: pass embeds")
        x = pooled_embedding(embeds)
        d = ((x[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        return [int(i) for i in d.argmin(1)]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "centroids": self.centroids.tolist()}


Router = KeywordRouter | KMeansRouter


def router_from_dict(data: dict[str, Any]) -> Router:
    kind = data.get("kind")
    if kind == "keyword":
        return KeywordRouter(data["patterns"], data.get("default"))
    if kind == "kmeans":
        return KMeansRouter(data["centroids"])
    raise ValueError(f"unknown router kind {kind!r} (expected 'keyword' or 'kmeans')")


def save_router(router: Router, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(router.to_dict(), indent=1) + "\n", encoding="utf-8")
    return path


def load_router(path: str | Path) -> Router:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"router file {path} not found")
    return router_from_dict(json.loads(path.read_text(encoding="utf-8")))


def split_prompts(router: Router, prompts: Sequence[str], embeds: torch.Tensor | None = None) -> list[list[str]]:
    """The prompts of each student (index k → the prompts routed to k; ``embeds``: the prompts' text-encoder hidden
    states, needed by a k-means router); an empty subset is an error."""
    routes = router.route(list(prompts), embeds)
    subsets: list[list[str]] = [[] for _ in range(router.num_students)]
    for p, k in zip(prompts, routes):
        subsets[k].append(p)
    empty = [k for k, s in enumerate(subsets) if not s]
    if empty:
        raise ValueError(f"student(s) {empty} get no training prompt from this router")
    return subsets
