"""Price each league entry's own recipe in training FLOPs, to size the league's budgets.

For every entry of a league file: a few updates of its recipe with ``train.count_flops`` (the league's own count),
and, for a recipe with an ODE-pair warm-up, a few more with the warm-up off (the updates after it cost more); the
FLOPs of each update come from the run's metrics.csv (logged every update). The recipe's own run is then priced as
setup (the teacher's ODE pairs, made 128 at a time here and priced in proportion to the recipe's number) + warm-up
updates × their cost + the other updates × theirs; an MSD entry's four
students are priced by their first one, times four. Writes a JSON file and prints a table.

    python experiments/league-budget/probe.py --league eval/league.yaml --out eval/results/league-budget/probe.json
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from stepdistill.workflows import load_league


#: teacher ODE pairs made by a probe (a recipe's own number, up to 2,048, is priced in proportion)
PROBE_PAIRS = 128


def _per_update(run: Path) -> list[int]:
    """Each update's FLOPs (differences of the logged cumulative count; the first includes the setup)."""
    with open(run / "logs" / "metrics.csv", newline="", encoding="utf-8") as f:
        counts = [int(float(r["training_flops"])) for r in csv.DictReader(f)]
    return [b - a for a, b in zip([0] + counts[:-1], counts)]


def probe(entry, work: Path, updates: int, extra: list[str]) -> dict:
    run = work / entry.name
    shutil.rmtree(run, ignore_errors=True)
    overrides = [*entry.overrides, "train.count_flops=true", f"train.max_steps={updates}", "train.sample_every=0",
                 "train.checkpoint_every=0", "train.log_every=1", *extra]
    subprocess.run([sys.executable, "-m", "stepdistill.cli", "--threads", "1", "distill", "--pipeline",
                    str(entry.pipeline), "--recipe", str(entry.recipe), "--out", str(run), "--no-export", "--set",
                    *overrides], check=True, stdout=subprocess.DEVNULL)
    if (run / "msd_summary.json").is_file():  # MSD: the first student's run
        run = run / "student_0"
    summary = json.loads((run / "distill_summary.json").read_text())
    setup = int(summary.get("regression_pairs_flops") or 0)
    per = _per_update(run)
    per[0] -= setup
    return {"setup": setup, "per_update": per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--league", default="eval/league.yaml")
    parser.add_argument("--out", default="eval/results/league-budget/probe.json")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=None, help="probe only these entries")
    args = parser.parse_args()
    league = load_league(args.league)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []  # a rerun probes only the missing entries
    with tempfile.TemporaryDirectory() as tmp:
        for entry in league.entries:
            if any(r["name"] == entry.name for r in rows) or (args.only and entry.name not in args.only):
                continue
            recipe = yaml.safe_load(entry.recipe.read_text())
            train, oc = recipe.get("train", {}), recipe.get("objective_config", {}) or {}
            warm = int(oc.get("ode_warmup_steps") or 0)
            max_steps = int(train.get("max_steps", 1000))
            pairs = oc.get("regression_pairs")
            small = [f"objective_config.regression_pairs={PROBE_PAIRS}"] if pairs else []
            updates = args.updates
            if oc.get("updates_per_phase"):  # Phased DMD: one update in each phase (each phase costs more)
                small.append("objective_config.updates_per_phase=1")
                updates = int(oc["num_phases"])
            first = probe(entry, Path(tmp), updates, small)
            if pairs:  # the pairs cost scales with their number: priced from a small set
                first["setup"] = first["setup"] * int(pairs) // PROBE_PAIRS
            after = probe(entry, Path(tmp), args.updates, [*small, "objective_config.ode_warmup_steps=0"]) \
                if warm else first
            warm_cost = first["per_update"][-1]
            main_cost = after["per_update"][-1]
            if oc.get("updates_per_phase"):
                main_cost = sum(first["per_update"]) // len(first["per_update"])
            students = 4 if "multi_student" in recipe else 1
            # DisBack records its path at the first update after the warm-up: the excess of that update over the
            # others is a one-off cost
            one_off = max(0, after["per_update"][1] - main_cost) if warm and len(after["per_update"]) > 2 else 0
            native = students * (first["setup"] + warm * warm_cost + (max_steps - warm) * main_cost + one_off)
            rows.append({"name": entry.name, "recipe": str(entry.recipe.name), "max_steps": max_steps,
                         "ode_warmup_steps": warm, "students": students, "setup_flops": first["setup"],
                         "warmup_update_flops": warm_cost if warm else None, "update_flops": main_cost,
                         "one_off_flops": one_off, "native_run_flops": native,
                         "probe_updates": {"first": first["per_update"], "after_warmup": after["per_update"]}})
            print(f"{entry.name:22s} setup {first['setup'] / 1e12:7.3f} T  update {main_cost / 1e9:8.1f} G"
                  f"{'' if not warm else f'  (warm-up {warm_cost / 1e9:.1f} G x {warm})'}  own run "
                  f"{native / 1e12:7.2f} TFLOP", flush=True)
            out.write_text(json.dumps({"league": str(args.league), "rows": rows}, indent=2) + "\n")
    natives = sorted(r["native_run_flops"] for r in rows)
    print(f"median own run {natives[len(natives) // 2] / 1e12:.2f} TFLOP; wrote {out}")


if __name__ == "__main__":
    main()
