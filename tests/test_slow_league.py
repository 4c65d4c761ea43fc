"""Slow (``make test-slow``): the quick league of ``eval/league.yaml`` — every toy method distilled under the quick
budget of training FLOPs and judged at 25, 50 and 100% of it on the held-out seed (720 samples each), in two worker
processes. About an hour on 2 CPU cores. A rerun into the same folder redoes nothing."""

from __future__ import annotations

import math

import pytest

from helpers import REPO

from stepdistill.toy.assets import TOY_EVALUATOR, TOY_FLOW_TEACHER, TOY_TEACHER
from stepdistill.workflows.league import load_league, run_league

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (TOY_TEACHER.is_dir() and TOY_FLOW_TEACHER.is_dir() and TOY_EVALUATOR.is_dir()),
                       reason="toy assets not present"),
]


def test_quick_league(tmp_path):
    league = load_league(REPO / "eval" / "league.yaml")
    budget = league.budgets["quick"]
    result = run_league(league.source, tmp_path / "league", "quick", workers=2)
    rows = result["rows"]
    assert {(r["name"], r["budget_fraction"]) for r in rows} == {
        (e.name, f) for e in league.entries for f in league.fractions}
    for r in rows:
        # each mark is the first update at or past its fraction of the budget
        assert r["budget"] >= r["budget_fraction"] * budget.budget_flops, r["name"]
        assert r["num_samples"] == 144 * budget.samples_per_prompt and r["eval_seed"] == league.eval_seed
        assert math.isfinite(r["fid"]) and 0 <= r["adherence"] <= 1
    by_name = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r["budget"])
    assert all(b == sorted(b) for b in by_name.values())  # later marks spent more
    assert (tmp_path / "league" / "tables.md").is_file() and (tmp_path / "league" / "convergence.png").is_file()
    # the noise measured in each group that names a noise entry, on the two seeds
    assert [m["name"] for m in result["noise"]] == league.noise_entries
    assert len({m["group"] for m in result["noise"]}) == len(league.noise_entries)
    assert all(m["eval_seeds"] == [league.eval_seed, league.noise_seed] for m in result["noise"])
