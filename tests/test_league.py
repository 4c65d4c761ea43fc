"""`stepdistill league`: the league file's checks, the held-out seed rule, and a one-entry league on the toy teacher
that trains under a FLOP budget, judges its student at each fraction, writes the tables and the plot, and resumes
without redoing finished work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from stepdistill.eval import benchmarks_doc
from stepdistill.eval.league_report import judge_claims, league_tables, noise_measurements
from stepdistill.eval.league_report import ranks as league_ranks
from stepdistill.eval.league_report import plot_samples
from stepdistill.eval.run_files import SampleStore, folder_digest, read_stored_samples
from stepdistill.workflows.league import (LeagueError, entry_lock, export_at, full_budget_samples, held_out_problems,
                                          load_league, run_league)

from helpers import REPO

#: toy-sid.yaml at batch 4 counts 20.1 GFLOP per update (measured with train.count_flops), so this budget is three
#: updates: the 0.25 mark after update 1, 0.5 after update 2, the end after update 3
BUDGET = 60e9


def _league(tmp_path: Path, body: str = "", eval_seed: int = 400000, recipe: Path | None = None) -> Path:
    recipe = recipe or REPO / "training" / "toy-sid.yaml"
    text = textwrap.dedent(f"""
        league: test
        eval_seed: {eval_seed}
        noise_seed: 500000
        noise_entries: [sid]
        fractions: [0.25, 0.5, 1.0]
        latency: {{batch: 2, repeats: 1, warmup: 0}}
        budgets:
          quick: {{budget_flops: {BUDGET}, samples_per_prompt: 2}}
        entries:
          - name: sid
            recipe: {recipe}
            pipeline: {REPO / 'pipelines' / 'toy.yaml'}
            steps: 1
            group: 1 step
            overrides: [train.batch_size=4]
    """) + body
    path = tmp_path / "league.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("body, key", [
    ("bogus: 1\n", "bogus"),
    ("fractions: [0.5, 0.25, 1.0]\n", "fractions"),
])
def test_league_file_errors_name_the_key(tmp_path, body, key):
    path = _league(tmp_path)
    text = path.read_text().replace("fractions: [0.25, 0.5, 1.0]\n", "") + body
    path.write_text(text)
    with pytest.raises(LeagueError) as info:
        load_league(path)
    assert f"{path}: {key}:" in str(info.value)


@pytest.mark.parametrize("old, new, key", [
    (f"budget_flops: {BUDGET}", "budget_flops: 0", "budgets.quick.budget_flops"),
    ("steps: 1", "steps: one", "entries[0].steps"),
    ("eval_seed: 400000", "eval_seed: -1", "eval_seed"),
])
def test_league_values_are_checked(tmp_path, old, new, key):
    path = _league(tmp_path)
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(LeagueError) as info:
        load_league(path)
    assert f": {key}:" in str(info.value)


def test_a_seed_a_recipe_was_tuned_on_is_refused(tmp_path):
    recipe = tmp_path / "tuned.yaml"
    recipe.write_text((REPO / "training" / "toy-sid.yaml").read_text() + "\nselection_seeds: [100000]\n")
    # 288 samples from seed 99900 reach 100187: they meet 100000 ... 105039
    league = load_league(_league(tmp_path, eval_seed=99900, recipe=recipe))
    problems = held_out_problems(league, league.budgets["quick"])
    assert len(problems) == 1 and "eval_seed 99900" in problems[0] and "tuned.yaml" in problems[0]
    with pytest.raises(LeagueError, match="not held out"):
        run_league(league.source, tmp_path / "out")
    # a seed past the declared range (100000 + 5,040) is held out
    assert held_out_problems(load_league(_league(tmp_path, eval_seed=105040, recipe=recipe)),
                             league.budgets["quick"]) == []


def test_every_shipped_toy_recipe_declares_its_selection_seeds_and_the_league_is_held_out():
    league = load_league(REPO / "eval" / "league.yaml")
    for name, budget in league.budgets.items():
        assert held_out_problems(league, budget) == [], name
    assert league.budgets["full"].budget_flops >= 4 * league.budgets["quick"].budget_flops


def test_league_trains_under_the_budget_in_two_workers_judges_each_fraction_and_resumes(tmp_path, capsys):
    # a second entry that fails once trained (a one-step student asked for 2 steps): reported, the others go on
    path = _league(tmp_path, body=(f"  - name: broken\n    recipe: {REPO / 'training' / 'toy-sid.yaml'}\n"
                                   f"    pipeline: {REPO / 'pipelines' / 'toy.yaml'}\n    steps: 2\n"
                                   "    group: 1 step\n    overrides: [train.batch_size=4]\n"))
    out = tmp_path / "out"
    # two worker processes taking the entries in turn (each starts one; which one is a race); this process then
    # collects their rows (retrying the broken entry's judging, which fails again) and judges the noise
    result = run_league(path, out, "quick", workers=2)
    logs = [(out / "workers" / f"worker-{k}.log").read_text() for k in range(2)]
    assert sorted(["[league] sid: distilling" in text for text in logs]) == [False, True]
    assert sorted(["[league] broken: failed" in text for text in logs]) == [False, True]
    # the student is timed once, by this process after the workers ended, and every row of the entry carries it;
    # the noise is judged by a worker that found no entry left, and not again by this process
    printed = capsys.readouterr().out
    assert "[league] sid: latency" in printed
    assert not any("latency" in text for text in logs)
    assert sorted(["[league] sid: noise" in text for text in logs]) == [False, True]
    assert "[league] sid: noise" not in printed
    timed = json.loads((out / "entries" / "sid" / "latency.json").read_text())["latency_ms"]
    assert timed["n"] == 2 and timed["batchN"] > 0
    assert all(r["latency_ms"] == timed for r in result["rows"])
    assert list(result["failed"]) == ["broken"] and "exactly 1 step" in result["failed"]["broken"]
    assert "Traceback" in (out / "entries" / "broken" / "failed.txt").read_text()
    rows = result["rows"]
    assert [r["budget_fraction"] for r in rows] == [0.25, 0.5, 1.0]
    per_update = rows[0]["budget"]  # the 0.25 mark is reached after the first update
    assert [r["budget"] for r in rows] == [per_update, 2 * per_update, 3 * per_update]
    assert 2 * per_update < BUDGET <= 3 * per_update
    for r in rows:
        assert r["num_samples"] == 288 and r["eval_seed"] == 400000 and r["nfe"] == 1 and r["steps"] == 1
        assert r["recipe"] == "training/toy-sid.yaml" and r["budget_unit"].startswith("training FLOPs")
        assert r["fid"] > 0 and 0 <= r["adherence"] <= 1 and r["wall_s"] > 0
    noise = json.loads((out / "entries" / "sid" / "noise.json").read_text())
    assert result["noise"] == [noise] and noise["name"] == "sid" and noise["group"] == "1 step"
    assert noise["eval_seeds"] == [400000, 500000] and noise["fid"][0] == rows[-1]["fid"]
    assert noise["fid"][1] != noise["fid"][0]  # other noises, another FID
    tables = (out / "tables.md").read_text()
    assert "### 1 step" in tables and "| 1 | sid |" in tables
    assert f"Evaluation noise in this group: `sid` at 100% of the budget scores FID_toy {noise['fid'][0]:.1f}" in tables
    assert (out / "convergence.png").stat().st_size > 0
    # the samples sheet: the full-budget student's stored samples at the sheet's prompts (0, 19, 38, ...: sample 0
    # of each, 2 per prompt here), read back as the evaluation stored them
    assert result["images"] == ["convergence.png", "samples.png"] and (out / "samples.png").stat().st_size > 0
    stored = next((out / "entries" / "sid" / "eval-100" / "samples").iterdir())
    sheet = full_budget_samples(load_league(path).budgets["quick"], out / "entries" / "sid")
    assert sheet.shape[0] == 8 and sheet.dtype == np.uint8
    first_batch = np.load(next(stored.glob("batch-0000000-*.npz")))["images"]
    assert np.array_equal(sheet[0], first_batch[0]) and np.array_equal(sheet[1], first_batch[19 * 2])
    assert not list((out / "entries" / "sid").glob("student-*"))  # exported students are removed after judging

    # a second call redoes nothing: no training, no evaluation
    before = {p: p.stat().st_mtime_ns for p in (out / "entries" / "sid").glob("at-*.json")}
    capsys.readouterr()
    again = run_league(path, out, "quick")
    assert "distilling" not in capsys.readouterr().out  # the broken entry is retried from its finished run, too
    assert again["rows"] == rows
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # a league cut off before its last evaluation judges only that one again, from the kept checkpoint
    (out / "entries" / "sid" / "at-100.json").unlink()
    third = run_league(path, out, "quick")
    assert third["rows"][-1]["fid"] == pytest.approx(rows[-1]["fid"], rel=1e-6)
    assert {p: p.stat().st_mtime_ns for p in before if p.name != "at-100.json"} == {
        p: t for p, t in before.items() if p.name != "at-100.json"}

    # a student exported again from the same checkpoint is left as it is (the sample store's fingerprint names its
    # files and times), so an evaluation cut off while judging it reuses its stored samples; another checkpoint is
    # exported anew
    sid = next(e for e in load_league(path).entries if e.name == "sid")
    student, flops, _ = export_at(sid, out / "entries" / "sid" / "run", 1.0, tmp_path / "student")
    kept = folder_digest(student)
    assert flops == rows[-1]["budget"]
    assert folder_digest(export_at(sid, out / "entries" / "sid" / "run", 1.0, student)[0]) == kept
    assert folder_digest(export_at(sid, out / "entries" / "sid" / "run", 0.5, student)[0]) != kept

    # another budget in the same folder is refused
    path.write_text(path.read_text().replace(f"budget_flops: {BUDGET}", f"budget_flops: {2 * BUDGET}"))
    with pytest.raises(LeagueError, match="other settings"):
        run_league(path, out, "quick")


def _row(name: str, group: str, fraction: float, fid: float | None, adherence: float = 0.9) -> dict:
    return {"name": name, "recipe": f"training/{name}.yaml", "group": group, "steps": 1, "budget_unit": "FLOPs",
            "budget": int(fraction * 1e12), "budget_fraction": fraction, "eval_seed": 7, "num_samples": 10,
            "fid": fid, "adherence": adherence, "all_correct": 0.5, "diversity": 0.01, "coverage": None, "nfe": 1,
            "latency_ms": None, "wall_s": 1.0}


def test_ranks_follow_fid_per_fraction_and_group_and_the_tables_show_them():
    rows = [_row("a", "1 step", 0.5, 30.0), _row("a", "1 step", 1.0, 20.0),
            _row("b", "1 step", 0.5, 10.0), _row("b", "1 step", 1.0, 25.0),
            _row("c", "1 step", 0.5, None), _row("c", "1 step", 1.0, 20.0, adherence=0.95),
            _row("d", "4 steps", 0.5, 99.0), _row("d", "4 steps", 1.0, 98.0),
            {**_row("e", "1 step", 0.5, 5.0), "updates": 0}, {**_row("e", "1 step", 1.0, 5.0), "updates": 0}]
    # at 50%: b (10) before a (30), c unscored, e (no update yet) not ranked despite its FID; at 100%: the tie at 20
    # goes to c's higher adherence, then a, then b
    assert league_ranks(rows, "1 step", [0.5, 1.0]) == {"a": [2, 2], "b": [1, 3], "c": [None, 1], "e": [None, None]}
    assert league_ranks(rows, "4 steps", [0.5, 1.0]) == {"d": [1, 1]}
    tables = league_tables(rows, [0.5, 1.0])
    assert "| b | 10.0 / 0.900 (1) | 25.0 / 0.900 (3) |" in tables
    assert "| 1 | c |" in tables and "| 3 | b |" in tables and "| no update | e | 5.0 |" in tables


def test_methods_table_reads_the_league_file_and_names_a_missing_entry(tmp_path):
    for name in ("eval", "docs", "training"):
        shutil.copytree(REPO / name, tmp_path / name, symlinks=True)
    rows = [_row("x", "1 step", 1.0, 50.0), _row("y", "1 step", 1.0, 40.0, adherence=0.8),
            {**_row("z", "1 step", 1.0, 30.0), "updates": 0}]
    league_json = tmp_path / "eval" / "results" / "league-test" / "league.json"
    league_json.parent.mkdir(parents=True)
    league_json.write_text(json.dumps({"budget": "quick", "budget_flops": 2e12, "eval_seed": 7, "rows": rows}))
    methods = tmp_path / "docs" / "methods" / "methods.yaml"
    spec = yaml.safe_load(methods.read_text())
    spec["league"] = "league-test/league.json"
    for method in spec["methods"]:
        method.pop("league", None)
    spec["methods"][0]["league"] = ["x"]
    methods.write_text(yaml.safe_dump(spec, sort_keys=False))
    table = benchmarks_doc.methods_table(tmp_path)
    assert "league: FID_toy / adherence (rank) at 2.00 TFLOP, eval seed 7" in table.splitlines()[0]
    assert "1 step: 50.0 / 0.900 (2 of 2)" in table.splitlines()[2]
    assert table.splitlines()[3].count("| — |") == 1  # a method without league entries
    assert "1 step: **y** (FID_toy 40.0, adherence 0.800, 1 NFE)." in table
    assert "Not ranked, their budget spent before their first update: z." in table
    spec["methods"][1]["league"] = ["z"]
    methods.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert "1 step: 30.0 / 0.900 (not ranked: no update within the budget)" in benchmarks_doc.methods_table(tmp_path)
    spec["methods"][0]["league"] = ["nobody"]
    methods.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(benchmarks_doc.BenchmarksDocError, match=r"methods\[0\].*'nobody'.*has x, y, z"):
        benchmarks_doc.methods_table(tmp_path)


def test_claims_are_judged_against_the_noise_and_untrained_students_are_not_testable():
    rows = [_row("a", "1 step", 0.5, 30.0), _row("a", "1 step", 1.0, 20.0, adherence=0.95),
            _row("b", "1 step", 0.5, 33.0), _row("b", "1 step", 1.0, 40.0, adherence=0.90),
            {**_row("c", "1 step", 0.5, 5.0), "updates": 0}, {**_row("c", "1 step", 1.0, 5.0), "updates": 0}]
    rows[0]["diversity"], rows[2]["diversity"] = 0.02, 0.03
    noise = [{"name": "b", "group": "1 step", "fid": [50.0, 54.0], "adherence": [0.9, 0.91]}]
    claims = [{"text": "a beats b", "metric": "fid", "better": "a", "than": "b"},
              {"text": "b beats a", "metric": "fid", "better": "b", "than": "a", "fractions": [1.0]},
              {"text": "a more diverse", "metric": "diversity", "better": "a", "than": "b", "fractions": [0.5]},
              {"text": "a more adherent", "metric": "adherence", "better": "a", "than": "b", "fractions": [1.0]},
              {"text": "c beats a", "metric": "fid", "better": "c", "than": "a", "fractions": [1.0]}]
    judged = judge_claims(rows, claims, noise)
    # FID noise 4: at 50% a is 3 better (within it), at 100% 20 better (holds); the reverse claim does not hold
    assert [(x["fraction"], x["margin"], x["noise"], x["verdict"]) for x in judged[0]["at"]] == [
        (0.5, 3.0, 4.0, "within noise"), (1.0, 20.0, 4.0, "holds")]
    assert judged[1]["at"][0]["verdict"] == "does not hold" and judged[1]["at"][0]["margin"] == -20.0
    # diversity has no noise measure: higher is better, 0.02 against 0.03 does not hold
    assert judged[2]["at"][0]["verdict"] == "does not hold" and judged[2]["at"][0]["noise"] is None
    # adherence: 0.05 better, noise 0.01
    assert judged[3]["at"][0]["verdict"] == "holds" and judged[3]["at"][0]["noise"] == pytest.approx(0.01)
    assert judged[4]["at"][0]["verdict"] == "not testable: c had run no update"
    # the same figure on both sides, with no noise measure for it: equal, not "does not hold"
    same = [{**rows[1], "name": "twin"}, rows[1]]
    tie = judge_claims(same, [{"text": "t", "metric": "all_correct", "better": "twin", "than": "a"}], noise)
    assert tie[0]["at"][0]["verdict"] == "equal"
    assert judged[0]["noise_entry"] == "b" and judged[2]["noise_entry"] is None
    tables = league_tables(rows, [0.5, 1.0], noise=[{**noise[0], "budget_fraction": 1.0, "eval_seeds": [1, 2],
                                                     "num_samples": 10}], claims=judged)
    assert "| a beats b | fid (a vs b) | 50%: 30.0 vs 33.0, within noise; 100%: 20.0 vs 40.0, holds |" in tables
    assert ("Evaluation noise in this group: `b` at 100% of the budget scores FID_toy 50.0 on eval seed 1 and 54.0 on "
            "seed 2") in tables


def test_each_claim_is_set_against_the_noise_of_its_own_group():
    rows = [_row("a", "1 step", 1.0, 90.0), _row("b", "1 step", 1.0, 96.0),
            _row("c", "4 steps", 1.0, 30.0), _row("d", "4 steps", 1.0, 36.0), _row("e", "25 steps", 1.0, 40.0),
            _row("f", "25 steps", 1.0, 45.0)]
    noise = [{"name": "b", "group": "1 step", "fid": [96.0, 88.0], "adherence": [0.9, 0.9]},
             {"name": "d", "group": "4 steps", "fid": [36.0, 35.0], "adherence": [0.9, 0.9]}]
    claims = [{"text": "a beats b", "metric": "fid", "better": "a", "than": "b"},
              {"text": "c beats d", "metric": "fid", "better": "c", "than": "d"},
              {"text": "e beats f", "metric": "fid", "better": "e", "than": "f"}]
    judged = judge_claims(rows, claims, noise)
    # the same margin, 6: within the one-step noise (8), past the four-step noise (1)
    assert [(j["noise_entry"], j["at"][0]["noise"], j["at"][0]["verdict"]) for j in judged[:2]] == [
        ("b", 8.0, "within noise"), ("d", 1.0, "holds")]
    # a group without its own measurement takes the largest measured (the most cautious): 8, so 5 is within it
    assert (judged[2]["noise_entry"], judged[2]["at"][0]["verdict"]) == ("b", "within noise")
    # a league file from before noise was measured per group holds one mapping without a group: its rows give it
    old = {"name": "d", "fid": [36.0, 35.0], "adherence": [0.9, 0.9]}
    assert noise_measurements(old, rows) == [{**old, "group": "4 steps"}]
    assert judge_claims(rows, claims[:1], old)[0]["at"][0]["noise"] == 1.0  # the only one measured


@pytest.mark.parametrize("value, problem", [
    ("[nobody]", "a list of entry names"),
    ("[sid, sid2]", "both in group '1 step'"),
])
def test_noise_entries_are_checked(tmp_path, value, problem):
    body = (f"  - name: sid2\n    recipe: {REPO / 'training' / 'toy-sid.yaml'}\n"
            f"    pipeline: {REPO / 'pipelines' / 'toy.yaml'}\n    steps: 1\n    group: 1 step\n")
    path = _league(tmp_path, body)
    path.write_text(path.read_text().replace("noise_entries: [sid]", f"noise_entries: {value}"))
    with pytest.raises(LeagueError, match=f"noise_entries: .*{problem}"):
        load_league(path)


@pytest.mark.parametrize("claim, key", [
    ("{text: t, metric: fid, better: sid, than: nobody}", "claims[0].than"),
    ("{text: t, metric: speed, better: sid, than: sid}", "claims[0].metric"),
    ("{text: t, metric: fid, better: sid, than: sid, fractions: [0.3]}", "claims[0].fractions"),
    ("{text: t, metric: fid, better: sid}", "claims[0].than"),
])
def test_league_claims_are_checked(tmp_path, claim, key):
    with pytest.raises(LeagueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_league(_league(tmp_path, f"claims:\n  - {claim}\n"))


def test_an_entry_another_league_process_is_running_is_skipped_not_run_twice(tmp_path):
    out = tmp_path / "out"
    with entry_lock(out, "sid"):  # as another league process would hold it (flock: per open file, so even here)
        result = run_league(_league(tmp_path), out, "quick")
    assert "another league process (pid" in result["failed"]["sid"] and result["rows"] == []
    assert not (out / "entries" / "sid" / "run").exists()  # nothing trained, nothing judged
    assert result["noise"] == []
    with entry_lock(out, "sid"):  # released when the holder is done: taken again at once
        pass


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an ended child no one has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_killed_league_stops_its_workers_and_frees_their_entries(tmp_path, how):
    # SIGTERM: the league stops its workers; SIGKILL (nothing can be done in the league process): the workers see
    # their parent gone and end themselves. Either way within seconds, long before their entries (300 updates) end.
    path = _league(tmp_path, body=(f"  - name: sid2\n    recipe: {REPO / 'training' / 'toy-sid.yaml'}\n"
                                   f"    pipeline: {REPO / 'pipelines' / 'toy.yaml'}\n    steps: 1\n"
                                   "    group: 1 step\n    overrides: [train.batch_size=4]\n"))
    path.write_text(path.read_text().replace(f"budget_flops: {BUDGET}", f"budget_flops: {100 * BUDGET}"))
    out = tmp_path / "out"
    league = subprocess.Popen([sys.executable, "-m", "stepdistill.cli", "league", "--suite", str(path), "--budget",
                               "quick", "--workers", "2", "--out", str(out)], cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        holders: list[int] = []
        deadline = time.time() + 300
        while len(holders) < 2 and time.time() < deadline and league.poll() is None:
            time.sleep(0.5)
            holders = [int(text) for text in (p.read_text().strip() for p in (out / "entries").glob("*.lock")
                                              if (out / "entries").is_dir()) if text]
        assert len(holders) == 2 and league.pid not in holders  # both workers are on an entry
        league.send_signal(how)
        assert league.wait(timeout=60) != 0
        deadline = time.time() + 20
        while any(_running(pid) for pid in holders) and time.time() < deadline:
            time.sleep(0.5)
        assert not any(_running(pid) for pid in holders)
    finally:
        league.kill()
    for name in ("sid", "sid2"):
        with entry_lock(out, name):  # free: no process goes on holding it
            pass


@pytest.mark.parametrize("fmt", ["npz", "png"])
def test_stored_samples_are_read_back_across_batches_in_either_format(tmp_path, fmt):
    store = SampleStore(tmp_path / "s", fmt, {"k": 1}, print)
    images = np.random.default_rng(0).integers(0, 256, size=(8, 3, 4, 4), dtype=np.uint8)
    store.save(0, 5, images[:5], list(range(5)), 1.0)
    store.save(5, 8, images[5:], list(range(5, 8)), 1.0)
    assert np.array_equal(read_stored_samples(tmp_path / "s", [1, 5, 7, 0]), images[[1, 5, 7, 0]])
    assert read_stored_samples(tmp_path / "s", [1, 8]) is None  # no stored batch holds sample 8
    assert read_stored_samples(tmp_path / "missing", [0]) is None


def test_samples_sheet_shows_the_students_that_have_samples(tmp_path):
    rows = [_row("a", "1 step", 1.0, 30.0), _row("b", "1 step", 1.0, 20.0), {**_row("c", "4 steps", 1.0, 9.0),
                                                                             "updates": 0}]
    images = np.zeros((3, 3, 8, 8), dtype=np.uint8)
    path = plot_samples(rows, {"a": images, "c": images}, ["p1", "p2", "p3"], tmp_path / "samples.png")
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="no row"):
        plot_samples(rows, {"x": images}, ["p1", "p2", "p3"], tmp_path / "none.png")
