"""The distill-cost benchmark: one subprocess per recipe, steady-state rate from the per-step CSV, peak memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import REPO

from stepdistill.eval import distill_cost
from stepdistill.eval.report import quality_gap_table, quality_gaps, speedups
from stepdistill.training.config import load_recipe


def test_steady_rate_leaves_out_the_warmup(tmp_path):
    csv = tmp_path / "metrics.csv"
    # step 1 is slow (warm-up: 5 s), then 0.5 s per step
    rows = ["step,time_s,loss/generator"] + [f"{s},{5 + 0.5 * (s - 1)},0.1" for s in range(1, 11)]
    csv.write_text("\n".join(rows) + "\n")
    rate, measured = distill_cost._steady_rate(csv, warmup=2)
    assert measured == 8 and rate == pytest.approx(2.0)
    rate_all, _ = distill_cost._steady_rate(csv, warmup=1)
    assert rate_all == pytest.approx(2.0)  # from the end of step 1 on, the warm-up is excluded too


def test_steady_rate_of_a_phase(tmp_path):
    csv = tmp_path / "metrics.csv"
    # steps 1-4: 0.25 s each (warm-up phase), steps 5-8: 1 s each
    times = [0.25 * s for s in range(1, 5)] + [1.0 + 1.0 * (s - 4) for s in range(5, 9)]
    csv.write_text("step,time_s\n" + "".join(f"{s},{t}\n" for s, t in zip(range(1, 9), times)))
    rate_w, n_w = distill_cost._steady_rate(csv, warmup=1, first=0, last=4)
    rate_dm, n_dm = distill_cost._steady_rate(csv, warmup=1, first=4)
    assert (n_w, n_dm) == (3, 3) and rate_w == pytest.approx(4.0) and rate_dm == pytest.approx(1.0)


def test_distill_cost_projects_an_ode_warmup_recipe_by_phase(tmp_path):
    from tiny_models import make_tiny_sd_pipeline

    make_tiny_sd_pipeline(tmp_path / "teacher")
    spec = tmp_path / "pipe.yaml"
    spec.write_text(f"teacher: {tmp_path / 'teacher'}\ndtype: float32\n")
    overrides = ["train.batch_size=2", "objective_config.aux_updates_per_generator_update=1",
                 "objective_config.regression_pairs=4", "objective_config.regression_steps=2",
                 "objective_config.ode_warmup_steps=50", "train.max_steps=80"]
    entry = distill_cost.measure_recipe(spec, REPO / "training" / "toy-dmd.yaml", tmp_path / "w", steps=4, warmup=1,
                                        overrides=overrides, threads=1)
    assert entry["ode_warmup_steps"] == 50 and entry["measured_steps"] == 3
    rows = (tmp_path / "w" / "logs" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 8  # 4 warm-up + 4 distribution-matching updates, one row each
    assert entry["ode_warmup_steps_per_s"] > entry["steps_per_s"] > 0  # the warm-up skips the fake-score updates
    expected = entry["setup_s"] + 50 / entry["ode_warmup_steps_per_s"] + 30 / entry["steps_per_s"]
    assert entry["projected_full_run_s"] == pytest.approx(expected)
    assert "| 50 (" in distill_cost.markdown_table([entry])


def test_distill_cost_measures_each_recipe_in_its_own_process(tmp_path, monkeypatch):
    from tiny_models import make_tiny_sd_pipeline

    make_tiny_sd_pipeline(tmp_path / "teacher")
    spec = tmp_path / "pipe.yaml"
    spec.write_text(f"teacher: {tmp_path / 'teacher'}\ndtype: float32\n")
    recipes = [tmp_path / "dmd2.yaml", REPO / "training" / "vsd.yaml"]
    recipes[0].write_text((REPO / "training" / "dmd2.yaml").read_text())
    overrides = ["train.batch_size=2", "objective_config.aux_updates_per_generator_update=1",
                 "train.mixed_precision=no", "train.gradient_checkpointing=false"]
    out = tmp_path / "cost"
    report = distill_cost.run_distill_cost(spec, recipes[:1], out, steps=4, warmup=1, overrides=overrides, threads=1)
    entry = report["entries"][0]
    assert entry["objective"] == "dmd2" and entry["measured_steps"] == 3 and entry["batch_size"] == 2
    assert entry["steps_per_s"] > 0 and entry["seconds_per_step"] == pytest.approx(1 / entry["steps_per_s"])
    assert entry["peak_memory_bytes"] > 50 * 2**20  # a python process with torch loaded is well above 50 MiB
    assert entry["generator_saved_activation_bytes"] > 0  # the generator step was measured, after the warm-up
    max_steps = load_recipe(recipes[0]).train.max_steps
    assert entry["recipe_max_steps"] == max_steps
    assert entry["projected_full_run_s"] == pytest.approx(entry["setup_s"] + max_steps / entry["steps_per_s"])
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["suite"] == "distill-cost" and len(on_disk["entries"]) == 1
    assert f"| {recipes[0]} | dmd2 | 2 | 1 |" in (out / "report.md").read_text()

    # a second invocation reuses the measured entry and runs only the new recipe
    real_measure = distill_cost.measure_recipe
    calls = []

    def measure(pipeline, recipe, *args, **kwargs):
        calls.append(Path(recipe).stem)
        return real_measure(pipeline, recipe, *args, **kwargs)

    monkeypatch.setattr(distill_cost, "measure_recipe", measure)
    report = distill_cost.run_distill_cost(spec, recipes, out, steps=4, warmup=1, overrides=overrides, threads=1)
    assert [e["objective"] for e in report["entries"]] == ["dmd2", "vsd"] and calls == ["vsd"]

    # an edited recipe is measured again, not served from the cache
    recipes[0].write_text(recipes[0].read_text().replace("max_steps:", "max_steps: 7 #", 1))
    report = distill_cost.run_distill_cost(spec, recipes[:1], out, steps=4, warmup=1, overrides=overrides, threads=1)
    assert calls == ["vsd", "dmd2"] and report["entries"][0]["recipe_max_steps"] == 7


def test_distill_cost_failure_names_the_recipe(tmp_path):
    spec = tmp_path / "pipe.yaml"
    spec.write_text(f"teacher: {tmp_path / 'missing'}\n")
    with pytest.raises(distill_cost.DistillCostError, match="toy-dmd2.yaml"):
        distill_cost.measure_recipe(spec, REPO / "training" / "toy-dmd2.yaml", tmp_path / "w", steps=3, warmup=1)


def test_speedups_against_the_nfe_ratio_and_the_end_to_end_ideal():
    def entry(name, role, steps, guidance, nfe, ms):
        return {"name": name, "role": role, "steps": steps, "guidance": guidance, "nfe": nfe,
                "latency_ms": {"batch1": ms, "batchN": ms, "n": 8}}

    rows = speedups([entry("teacher", "teacher", 1, 1, 1, 2.0), entry("teacher", "teacher", 50, 3, 100, 100.0),
                     entry("dmd2", "student", 1, 1, 1, 2.5)])
    (row,) = rows
    assert row["measured"] == pytest.approx(40.0) and row["nfe_ratio"] == 100
    assert row["of_nfe_ratio"] == pytest.approx(0.4)
    assert row["end_to_end_ideal"] == pytest.approx(50.0) and row["of_end_to_end_ideal"] == pytest.approx(0.8)
    assert speedups([entry("teacher", "teacher", 50, 3, 100, 100.0), entry("x", "student", 2, 1, 2, 4.0)])[0][
        "end_to_end_ideal"] is None


def test_unreliable_latency_is_flagged_in_json_and_markdown(tmp_path):
    """The demo under load: the 1-step teacher timed 131 ms/img and the same-network student 3.5 ms — a physical
    inconsistency; and repeats that spread widely. Both mark the speed-up unreliable, in report.json and report.md."""
    from stepdistill.eval.report import speedup_table, write_report

    def entry(name, role, steps, guidance, nfe, times):
        med = sorted(times)[len(times) // 2]
        return {"name": name, "role": role, "steps": steps, "guidance": guidance, "nfe": nfe, "fid": 1.0,
                "fid_features": "toy", "adherence": 0.9, "diversity": 0.05, "num_samples": 8,
                "latency_ms": {"batch1": med, "batchN": med, "n": 8, "batchN_times": times,
                               "batchN_spread": (max(times) - min(times)) / med}}

    steady = [entry("teacher", "teacher", 1, 1.0, 1, [3.4, 3.5, 3.6]), entry("teacher", "teacher", 50, 3.0, 100, [200, 201, 202]),
              entry("dmd", "student", 1, 1.0, 1, [3.5, 3.5, 3.6])]
    (row,) = speedups(steady)
    assert row["reliable"] and row["unreliable_because"] == []
    loaded = [entry("teacher", "teacher", 1, 1.0, 1, [130, 131, 132]), *steady[1:]]
    (row,) = speedups(loaded)
    assert not row["reliable"] and "same networks" in row["unreliable_because"][0]
    noisy = [steady[0], entry("teacher", "teacher", 50, 3.0, 100, [150, 200, 260]), steady[2]]
    (row,) = speedups(noisy)
    assert not row["reliable"] and "spread by 55%" in row["unreliable_because"][0]
    assert "**no**" in speedup_table([row]) and "unreliable" in speedup_table([row])
    report = write_report(tmp_path, "t", loaded)
    assert report["speedups"][0]["reliable"] is False
    assert "unreliable" in (tmp_path / "report.md").read_text()


def test_quality_gaps_against_the_most_nfe_teacher():
    def entry(name, role, steps, nfe, fid, adherence, diversity):
        return {"name": name, "role": role, "steps": steps, "guidance": 3.0 if role == "teacher" else 1.0, "nfe": nfe,
                "fid": fid, "adherence": adherence, "diversity": diversity, "latency_ms": None}

    entries = [entry("teacher", "teacher", 4, 8, 55.0, 0.95, 0.05), entry("teacher", "teacher", 50, 100, 40.0, 0.97, 0.04),
               entry("dmd", "student", 1, 1, 130.0, 0.92, 0.06), entry("dmd2", "student", 1, 1, 35.0, None, 0.02)]
    dmd, dmd2 = quality_gaps(entries)
    assert dmd["reference"] == "teacher 50 steps, w=3"  # the 50-step teacher, not the 4-step one listed first
    assert dmd["fid_gap"] == pytest.approx(90.0) and dmd["adherence_gap_points"] == pytest.approx(5.0)
    assert dmd["diversity_ratio"] == pytest.approx(1.5)
    assert dmd2["fid_gap"] == pytest.approx(-5.0) and dmd2["adherence_gap_points"] is None
    assert dmd2["diversity_ratio"] == pytest.approx(0.5)
    table = quality_gap_table([dmd, dmd2])
    assert "| dmd | 1 | teacher 50 steps, w=3 | 130.00 (40.00) | +90.00 | 0.920 (0.970) | +5.0 | 1.50 |" in table
    assert "| -5.00 |" in table and "| — |" in table
    assert quality_gaps([entry("dmd", "student", 1, 1, 1.0, 1.0, 1.0)]) == []
