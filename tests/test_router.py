"""The MSD prompt router (stepdistill/models/router.py): pure, deterministic, saved and reloaded unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepdistill.models.router import KeywordRouter, KMeansRouter, load_router, pooled_embedding, save_router, split_prompts
from stepdistill.toy import world


def test_keyword_router_splits_the_toy_world_by_shape(tmp_path):
    router = KeywordRouter(list(world.SHAPES))
    prompts = world.all_prompts()
    subsets = split_prompts(router, prompts)
    assert [len(s) for s in subsets] == [36, 36, 36, 36]
    for k, shape in enumerate(world.SHAPES):
        assert all(world.parse_prompt(p)["shape"] == k for p in subsets[k]), shape
    again = load_router(save_router(router, tmp_path / "router.json"))
    mixed = ["a large blue cross on a white background", "a small red circle on a gray background"]
    assert again.route(mixed) == router.route(mixed) == [3, 0]


def test_keyword_router_without_a_match_needs_a_default():
    with pytest.raises(ValueError, match="no student's pattern matches"):
        KeywordRouter(["circle", "square"]).route(["a hexagon"])
    assert KeywordRouter(["circle", "square"], default=1).route(["a hexagon"]) == [1]
    with pytest.raises(ValueError, match="get no training prompt"):
        split_prompts(KeywordRouter(["circle", "hexagon"], default=0), ["a circle", "a square"])


def test_kmeans_router_recovers_separated_clusters_and_reloads(tmp_path):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    labels = torch.arange(30) % 3
    tokens = centres[labels][:, None, :] + 0.3 * torch.randn(30, 4, 2, generator=g)  # (B, L, D)
    router = KMeansRouter.fit(tokens, 3, seed=0)
    routes = np.array(router.route([""] * 30, tokens))
    # the same partition up to a relabelling of the clusters
    for c in range(3):
        assert len(set(routes[labels.numpy() == c])) == 1
    assert len(set(routes.tolist())) == 3
    np.testing.assert_allclose(pooled_embedding(tokens), tokens.double().mean(1).numpy())
    again = load_router(save_router(router, tmp_path / "r.json"))
    assert again.route([""] * 30, tokens) == routes.tolist()
    assert KMeansRouter.fit(tokens, 3, seed=0).route([""] * 30, tokens) == routes.tolist()  # deterministic fit
    subsets = split_prompts(router, [str(i) for i in range(30)], tokens)
    assert sorted(len(s) for s in subsets) == [10, 10, 10]
