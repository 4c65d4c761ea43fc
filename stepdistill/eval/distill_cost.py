"""The distill-cost benchmark (eval/README.md): wall time, steps per second and peak memory of each objective's
training step on a teacher (the toy by default).

Each recipe runs in its own ``stepdistill distill`` subprocess, so the peak memory it reports (``torch.cuda``'s peak
allocation on a GPU, the process' maximum resident set size on a CPU) belongs to that objective alone, and one
objective's caches never speed up the next. The run is the recipe itself with ``train.max_steps`` replaced by the
number of measured steps and checkpoints, sample grids and export switched off; its CSV log (one row per step)
gives the steady-state rate after ``warmup`` steps. The full-run projection is ``setup + max_steps / rate``.

A recipe with an ODE-pair warm-up (``objective_config.ode_warmup_steps`` = W > 0, whose updates are much cheaper)
runs 2 × ``steps`` updates with the warm-up moved to the first ``steps``: each phase gets its own steady rate and
the projection is ``setup + W / rate_warmup + (max_steps − W) / rate``; the set-up includes making the pairs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from stepdistill.core.outputs import write_text_atomic
from stepdistill.eval.report import device_description
from stepdistill.training.config import load_recipe


class DistillCostError(RuntimeError):
    """A measured run failed; the message carries the tail of its output."""


def _steady_rate(metrics_csv: Path, warmup: int, first: int = 0, last: int | None = None) -> tuple[float, int]:
    """Generator steps per second between the end of step ``first + warmup`` and the last logged step ≤ ``last``
    (time_s column)."""
    with metrics_csv.open() as f:
        rows = [(int(r["step"]), float(r["time_s"])) for r in csv.DictReader(f)]
    rows = [(s - first, t) for s, t in rows if s >= first and (last is None or s <= last)]
    if not rows:
        raise DistillCostError(f"{metrics_csv} holds no rows")
    start = next(((s, t) for s, t in rows if s >= warmup), rows[0])
    end = rows[-1]
    if end[0] <= start[0]:  # too few steps for a warm-up: use the whole run
        return end[0] / max(end[1], 1e-9), end[0]
    return (end[0] - start[0]) / (end[1] - start[1]), end[0] - start[0]


def measure_recipe(
    pipeline: str | Path,
    recipe: str | Path,
    work_dir: str | Path,
    steps: int = 20,
    warmup: int = 3,
    overrides: Sequence[str] = (),
    threads: int | None = None,
) -> dict[str, Any]:
    """Run ``steps`` generator updates of ``recipe`` in a fresh process and return its cost figures."""
    if steps <= warmup:
        raise ValueError(f"steps ({steps}) must exceed warmup ({warmup})")
    config = load_recipe(recipe, overrides)
    work = Path(work_dir)
    if work.exists():
        shutil.rmtree(work)
    cmd = [sys.executable, "-m", "stepdistill.cli"]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += ["distill", "--pipeline", str(pipeline), "--recipe", str(recipe), "--out", str(work), "--no-export"]
    ode_warmup = int(config.objective_config.get("ode_warmup_steps") or 0)
    run_steps = 2 * steps if ode_warmup > 0 else steps
    forced = [f"train.max_steps={run_steps}", "train.checkpoint_every=0", "train.sample_every=0", "train.log_every=1"]
    if ode_warmup > 0:
        forced.append(f"objective_config.ode_warmup_steps={steps}")
    for item in [*overrides, *forced]:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise DistillCostError(f"{recipe}: `stepdistill distill` exited with {proc.returncode}:\n{tail}")
    summary = json.loads((work / "distill_summary.json").read_text())
    metrics = work / "logs" / "metrics.csv"
    setup_s = float(summary["total_seconds"]) - float(summary["wall_time_s"])
    full_steps = int(config.train.max_steps)
    warmup_rate = None
    if ode_warmup > 0:
        warmup_rate, _ = _steady_rate(metrics, warmup, first=0, last=steps)
        rate, measured_steps = _steady_rate(metrics, warmup, first=steps)
        projected = setup_s + min(ode_warmup, full_steps) / warmup_rate + max(full_steps - ode_warmup, 0) / rate
    else:
        rate, measured_steps = _steady_rate(metrics, warmup)
        projected = setup_s + full_steps / rate
    return {
        "recipe": str(recipe),
        "objective": config.objective,
        "batch_size": int(config.train.batch_size),
        # what the trainer ran (0 for an objective without auxiliary networks, e.g. LCM), not a recipe key's default
        "aux_updates_per_generator_update": int(summary["aux_updates_per_generator_update"]),
        "generator_lora_rank": config.generator.lora_rank,
        "mixed_precision": config.train.mixed_precision,
        "gradient_checkpointing": bool(config.train.gradient_checkpointing),
        "measured_steps": measured_steps,
        "warmup_steps": warmup,
        "steps_per_s": rate,
        "seconds_per_step": 1.0 / rate,
        "setup_s": setup_s,
        "process_wall_s": elapsed,
        "peak_memory_bytes": int(summary["peak_memory_bytes"]),
        "peak_memory_source": summary["peak_memory_source"],
        "training_state_bytes": (summary.get("training_state_bytes") or {}).get("total"),
        "generator_saved_activation_bytes": summary.get("generator_saved_activation_bytes", {}).get("main"),
        "generator_forwards_per_update": summary.get("generator_forwards_per_update"),
        "device": summary["device"],
        "recipe_max_steps": full_steps,
        "ode_warmup_steps": ode_warmup,
        "ode_warmup_steps_per_s": warmup_rate,
        "projected_full_run_s": projected,
        "overrides": list(overrides),
    }


def _warmup_cell(entry: dict) -> str:
    if not entry.get("ode_warmup_steps"):
        return "—"
    return f"{entry['ode_warmup_steps']} ({entry['ode_warmup_steps_per_s']:.2f})"


def _fmt_count(n: float | None) -> str:
    return "—" if n is None else f"{n:g}"


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.0f}"


def markdown_table(entries: list[dict]) -> str:
    head = ("| recipe | objective | batch | fake updates / step | generator forwards / step | steps/s | s/step "
            "| setup (s) | peak memory (MiB) | weights + grads + optimizer (MiB) | saved activations, generator step (MiB) "
            "| recipe steps | warm-up steps (steps/s) | projected full run |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for e in entries:
        lines.append(
            f"| {e['recipe']} | {e['objective']} | {e['batch_size']} | {e['aux_updates_per_generator_update']} "
            f"| {_fmt_count(e.get('generator_forwards_per_update'))} | {e['steps_per_s']:.3f} | {e['seconds_per_step']:.2f} | {e['setup_s']:.1f} "
            f"| {e['peak_memory_bytes'] / 2**20:.0f} | {_mib(e.get('training_state_bytes'))} "
            f"| {_mib(e.get('generator_saved_activation_bytes'))} "
            f"| {e['recipe_max_steps']} | {_warmup_cell(e)} "
            f"| {e['projected_full_run_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def _entry_fingerprint(pipeline: str | Path, recipe: str | Path, overrides: Sequence[str],
                       threads: int | None) -> dict[str, Any]:
    """What a cached entry must match to be reused: the SHA-256 of the recipe file and of the pipeline spec (when it
    is a file), the overrides and the thread count."""

    def sha256(path: str | Path) -> str | None:
        path = Path(path)
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None

    return {"recipe": str(recipe), "recipe_sha256": sha256(recipe), "pipeline": str(pipeline),
            "pipeline_sha256": sha256(pipeline), "overrides": list(overrides), "threads": threads}


def run_distill_cost(
    pipeline: str | Path,
    recipes: Sequence[str | Path],
    out_dir: str | Path,
    steps: int = 20,
    warmup: int = 3,
    overrides: Sequence[str] = (),
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure every recipe; write ``report.json`` and ``report.md`` under ``out_dir``. An entry measured earlier (an
    interrupted invocation) is reused only if its recipe and pipeline files, steps, overrides and threads are the same:
    an edited recipe is measured again."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / "entries"
    cache_dir.mkdir(exist_ok=True)
    entries = []
    for recipe in tqdm(list(recipes), desc="distill-cost", unit="recipe"):
        key = f"{Path(recipe).stem}-s{steps}-w{warmup}"
        cached = cache_dir / f"{key}.json"
        fingerprint = _entry_fingerprint(pipeline, recipe, overrides, threads)
        if cached.is_file():
            entry = json.loads(cached.read_text())
            if entry.get("fingerprint") == fingerprint:
                entries.append(entry)
                continue
        entry = measure_recipe(pipeline, recipe, out / "runs" / Path(recipe).stem, steps, warmup, overrides, threads)
        entry["fingerprint"] = fingerprint
        write_text_atomic(cached, json.dumps(entry, indent=2))
        entries.append(entry)
    report = {"suite": "distill-cost", "device": device_description(), "pipeline": str(pipeline), "entries": entries}
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    md = (f"# distill-cost\n\nPipeline: `{pipeline}`. Device: {report['device']}.\n\n"
          f"Each recipe ran {steps} generator steps (2 × {steps} with an ODE-pair warm-up, {steps} in each phase) "
          f"in its own process (checkpoints, sample grids and export off); the rate is measured after {warmup} "
          f"warm-up steps. Peak memory: {entries[0]['peak_memory_source'] if entries else '—'}. The projected full "
          "run is set-up + the recipe's max_steps / rate (with an ODE-pair warm-up: set-up + W / warm-up rate + "
          "(max_steps − W) / rate). Saved activations: the bytes autograd keeps for the backward pass of one "
          "generator step after any warm-up (distinct storages, parameters excluded; stepdistill/training/"
          "activations.py). Generator forwards / step: the student's x₀ predictions per generator update after any "
          "warm-up, auxiliary updates and backward-simulation steps included (mean over the measured updates).\n\n" + markdown_table(entries) + "\n")
    write_text_atomic(out / "report.md", md)
    return report
