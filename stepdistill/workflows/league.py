"""``stepdistill league``: every method distilled from the teacher under one budget of training FLOPs, judged at 25, 50
and 100% of it on an evaluation seed that no recipe value was chosen on.

A league file (``eval/league.yaml``) names the entries (a recipe, its teacher preset, the step count and guidance its
student is sampled with, the table it belongs to, optional recipe overrides), the budgets (``quick``, ``full``: the
training FLOPs each entry may spend and the samples per prompt of its evaluations), the budget fractions at which the
students are judged, the evaluation seed, and a second seed with the entries (one per table) whose full-budget
students are judged on it too, to measure the evaluation's own noise in each table.

Budget: training FLOPs as the trainer counts them (:mod:`stepdistill.training.flops`: every network's forward and
backward in the objective's losses, the teacher's ODE pairs made before the loop included; data preparation, optimizer
and EMA steps excluded). Each entry runs its recipe unchanged except ``train.budget_flops`` (the run ends after the
update that reaches it), ``train.budget_marks`` (a checkpoint kept at each fraction), ``train.max_steps`` (lifted to
:data:`STEP_CEILING`: the budget, not the recipe's length, ends the run), ``train.sample_every: 0`` and
``train.checkpoint_minutes`` (:data:`CHECKPOINT_MINUTES`; bookkeeping only). Stages keyed to update numbers (an ODE-
pair warm-up, Phased DMD's phases, DisBack's intervals) keep their lengths, so a budget that ends inside a stage
judges the student there: the recipes are frozen, the league never tunes them. An MSD entry (a recipe with a
``multi_student`` section) gives each of its K students 1/K of the budget, and its marks are the students' marks
together.

Held out: a recipe lists in ``selection_seeds`` the evaluation seed bases any of its values was chosen on; an
evaluation at base b draws the seeds b … b + n − 1 (n = 144 prompts × samples per prompt), and the league refuses an
evaluation seed whose range meets a declared base's b … b + 5,039 (the toy-quality protocol's range).

Output under ``--out``: ``league.json`` (the settings and every row), ``tables.md`` (one table per group),
``convergence.png`` (FID_toy against the budget used), ``samples.png`` (every full-budget student on the same
prompts and seeds, read from the stored evaluation samples) and per entry ``entries/<name>/``: ``run/`` (the
distillation run, its checkpoints and ``logs/budget_marks.json``), ``at-<pct>.json`` (one row), ``eval-<pct>/`` (the
samples), ``latency.json`` (its student timed once, alone) and, for a noise entry, ``noise.json`` (its student's
figures on the two seeds). A killed league resumes where it stopped: a finished entry is not trained again, an
unfinished one resumes from its latest checkpoint, an evaluation whose row exists is not redone and one that was cut
off reuses its stored samples (the student it judged is kept until its row is written, and not exported again). An
entry that fails is reported (``failed`` in ``league.json``, the traceback in ``entries/<name>/failed.txt``) and the
others go on; a rerun retries it. ``workers`` > 1 shares the entries among that many processes, each taking the next
unstarted entry when it finishes one (their output in ``workers/worker-<k>.log``); a worker that finds none left
judges the noise of every noise entry already finished (so that it does not idle while another trains); the calling
process then collects the rows, times the students alone and judges whatever noise is left.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

try:
    import fcntl
except ImportError:  # not POSIX: entries are not locked
    fcntl = None  # type: ignore[assignment]

import numpy as np
import torch

from stepdistill.core.interrupts import catch_sigterm, restore_sigterm
from stepdistill.core.outputs import write_text_atomic
from stepdistill.core.validation import int_problem, number_problem
from stepdistill.core.yaml_io import YAMLFileError, load_yaml_file
from stepdistill.eval import measure_pipeline_latency
from stepdistill.eval.league_report import (CLAIM_METRICS, ROW_KEYS, judge_claims, league_tables, plot_convergence,
                                            plot_samples, ranking)
from stepdistill.eval.run_files import folder_digest, read_stored_samples
from stepdistill.eval.runner import run_suite
from stepdistill.eval.suite import suite_from_dict
from stepdistill.export.loading import load_pipeline
from stepdistill.export.multi_student import export_multi_student
from stepdistill.models.router import load_router
from stepdistill.toy import world
from stepdistill.training.checkpoint import latest_checkpoint
from stepdistill.workflows.multi_student import SECTION as MSD_SECTION
from stepdistill.workflows.multi_student import distill_multi
from stepdistill.workflows.single_run import distill_single, export_run, validate_run

#: ``train.max_steps`` of a league run: a ceiling the budget always reaches first
STEP_CEILING = 10_000_000
#: a league run also keeps a checkpoint every this many minutes, so a killed league loses at most that much training
#: (a recipe's ``checkpoint_every`` counts updates, which under an expensive objective can be most of the budget)
CHECKPOINT_MINUTES = 10
#: samples of the toy-quality protocol (144 prompts × 35): the seed range a recipe's selection may have used
PROTOCOL_SAMPLES = 5040
#: the league's samples sheet: the first sample of every SHEET_STRIDE-th toy prompt, SHEET_PROMPTS of them (a stride
#: prime to the toy set's 4 shapes × 6 colours × 2 sizes × 3 backgrounds, so that every attribute varies along a row)
SHEET_PROMPTS = 8
SHEET_STRIDE = 19
BUDGET_UNIT = "training FLOPs (torch.utils.flop_counter, forward + backward of every network)"
TOP_KEYS = {"league", "description", "eval_seed", "noise_seed", "noise_entries", "fractions", "budgets", "entries",
            "latency", "batch_size", "claims"}
CLAIM_KEYS = {"text", "metric", "better", "than", "fractions"}
ENTRY_KEYS = {"name", "recipe", "pipeline", "steps", "guidance", "group", "overrides"}
BUDGET_KEYS = {"budget_flops", "samples_per_prompt"}


class LeagueError(ValueError):
    """A league file or a league folder that cannot be used; the message names the file and the key."""


class EntryBusy(LeagueError):
    """Another league process holds the entry's lock: it is training or judging that entry now."""


@contextmanager
def entry_lock(out: Path, name: str) -> Iterator[None]:
    """Hold ``entries/<name>.lock`` (an exclusive ``flock``) while this process trains or judges the entry, so that two
    league processes writing one folder never work on the same entry; raises :class:`EntryBusy` when another holds
    it. The lock goes with the process, however it ends. (Without ``fcntl``, as on Windows: no lock.)"""
    if fcntl is None:
        yield
        return
    path = out / "entries" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise EntryBusy(f"another league process (pid {holder}) is running entry {name!r} in {out}: wait for "
                            f"it to finish or stop it, then run the league again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class LeagueEntry:
    name: str
    recipe: Path
    pipeline: Path
    steps: int
    guidance: float
    group: str
    overrides: tuple[str, ...] = ()

    @property
    def multi_student(self) -> bool:
        data = load_yaml_file(self.recipe)
        return isinstance(data, dict) and MSD_SECTION in data

    def num_students(self) -> int:
        section = load_yaml_file(self.recipe)[MSD_SECTION]
        return int(section.get("num_students") or len(section.get("patterns") or []))


@dataclass(frozen=True)
class LeagueBudget:
    name: str
    budget_flops: float
    samples_per_prompt: int


@dataclass
class League:
    name: str
    source: Path
    eval_seed: int
    noise_seed: int | None
    noise_entries: list[str]
    fractions: list[float]
    budgets: dict[str, LeagueBudget]
    entries: list[LeagueEntry]
    description: str = ""
    latency: dict[str, int] | bool = field(default_factory=lambda: {"batch": 64, "repeats": 3, "warmup": 1})
    batch_size: int = 144
    claims: list[dict] = field(default_factory=list)


def _fail(source: Path, key: str, problem: str) -> LeagueError:
    return LeagueError(f"{source}: {key}: {problem}")


def _mapping(raw: Any, key: str, allowed: set[str], required: Sequence[str], source: Path) -> dict:
    """``raw`` checked as a mapping (an entry, a claim) with only ``allowed`` keys and every ``required`` one; errors
    name ``key`` (e.g. ``entries[2]``) and the offending sub-key."""
    if not isinstance(raw, dict):
        raise _fail(source, key, "must be a mapping")
    extra = sorted(set(raw) - allowed)
    if extra:
        raise _fail(source, f"{key}.{extra[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for req in required:
        if req not in raw:
            raise _fail(source, f"{key}.{req}", "is required")
    return raw


def _integer(data: dict, key: str, source: Path, minimum: int = 0, default: Any = ..., where: str = "") -> Any:
    """``data[key]`` checked as an integer >= ``minimum`` (``default`` when absent; required when it has none; a
    default of None makes null acceptable); errors name ``where`` + ``key``."""
    if key not in data and default is ...:
        raise _fail(source, where + key, "is required")
    value = data.get(key, default)
    problem = int_problem(value, low=minimum, optional=default is None)
    if problem:
        raise _fail(source, where + key, problem)
    return value


def load_league(path: str | Path) -> League:
    """Read and check a league file; relative paths resolve against its folder. Problems raise
    :class:`LeagueError` naming the file and the key."""
    source = Path(path)
    if not source.is_file():
        raise LeagueError(f"{source}: league file not found (e.g. eval/league.yaml)")
    try:
        data = load_yaml_file(source)
    except YAMLFileError as err:
        raise LeagueError(str(err)) from None
    if not isinstance(data, dict):
        raise _fail(source, "<root>", "a league file is a mapping of keys to values")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise _fail(source, unknown[0], f"unknown key (allowed: {', '.join(sorted(TOP_KEYS))})")
    base = source.parent
    fractions = data.get("fractions", [0.25, 0.5, 1.0])
    if (not isinstance(fractions, list) or not fractions or any(isinstance(f, bool) or not isinstance(f, (int, float))
                                                               or not 0 < f <= 1 for f in fractions)
            or sorted(fractions) != fractions or len(set(fractions)) != len(fractions) or fractions[-1] != 1):
        raise _fail(source, "fractions", f"must be increasing fractions in (0, 1] ending at 1, got {fractions!r}")
    budgets: dict[str, LeagueBudget] = {}
    raw_budgets = data.get("budgets")
    if not isinstance(raw_budgets, dict) or not raw_budgets:
        raise _fail(source, "budgets", "must map budget names (quick, full) to {budget_flops, samples_per_prompt}")
    for name, spec in raw_budgets.items():
        key = f"budgets.{name}"
        if not isinstance(spec, dict) or set(spec) - BUDGET_KEYS:
            raise _fail(source, key, f"must be a mapping with {', '.join(sorted(BUDGET_KEYS))}")
        flops = spec.get("budget_flops")
        problem = number_problem(flops, low=1.0)
        if problem:
            raise _fail(source, f"{key}.budget_flops", f"a number of training FLOPs: {problem}")
        spp = _integer(spec, "samples_per_prompt", source, minimum=2, default=35, where=f"{key}.")
        budgets[str(name)] = LeagueBudget(str(name), float(flops), spp)
    entries: list[LeagueEntry] = []
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise _fail(source, "entries", "must be a non-empty list")
    for i, raw in enumerate(raw_entries):
        key = f"entries[{i}]"
        _mapping(raw, key, ENTRY_KEYS, ("name", "recipe", "pipeline", "steps", "group"), source)
        name = str(raw["name"])
        if not name or "/" in name or name in {e.name for e in entries}:
            raise _fail(source, f"{key}.name", f"must be a unique folder-safe name, got {name!r}")
        recipe, pipeline = (base / str(raw["recipe"])).resolve(), (base / str(raw["pipeline"])).resolve()
        for what, p in (("recipe", recipe), ("pipeline", pipeline)):
            if not p.is_file():
                raise _fail(source, f"{key}.{what}", f"{p} not found")
        steps = _integer(raw, "steps", source, minimum=1, where=f"{key}.")
        guidance = raw.get("guidance", 1.0)
        problem = number_problem(guidance, low=0.0)
        if problem:
            raise _fail(source, f"{key}.guidance", problem)
        overrides = raw.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise _fail(source, f"{key}.overrides", "must be a list of key.sub=value strings")
        entries.append(LeagueEntry(name, recipe, pipeline, steps, float(guidance), str(raw["group"]),
                                   tuple(overrides)))
    noise_entries = _noise_entries(data.get("noise_entries") or [], entries, source)
    latency = data.get("latency", {"batch": 64, "repeats": 3, "warmup": 1})
    claims = _claims(data.get("claims") or [], {e.name for e in entries}, fractions, source)
    return League(name=str(data.get("league") or source.stem), source=source,
                  eval_seed=_integer(data, "eval_seed", source),
                  noise_seed=_integer(data, "noise_seed", source, default=None), noise_entries=noise_entries,
                  fractions=[float(f) for f in fractions], budgets=budgets, entries=entries,
                  description=str(data.get("description") or ""), latency=latency,
                  batch_size=_integer(data, "batch_size", source, minimum=1, default=144), claims=claims)


def _noise_entries(raw: Any, entries: list[LeagueEntry], source: Path) -> list[str]:
    """The league file's ``noise_entries``: entries whose full-budget students are judged again on the noise seed, at
    most one per group (a table's comparisons are set against the noise measured in that table)."""
    groups = {e.name: e.group for e in entries}
    if not isinstance(raw, list) or any(name not in groups for name in raw):
        raise _fail(source, "noise_entries", f"must be a list of entry names, got {raw!r}")
    seen: dict[str, str] = {}
    for name in raw:
        if groups[name] in seen:
            raise _fail(source, "noise_entries", f"{seen[groups[name]]!r} and {name!r} are both in group "
                        f"{groups[name]!r}: name at most one entry per group")
        seen[groups[name]] = name
    return [str(name) for name in raw]


def _claims(raw: Any, names: set[str], fractions: list, source: Path) -> list[dict]:
    """The league file's ``claims``: what a method's paper says it does better than another entry, checked."""
    if not isinstance(raw, list):
        raise _fail(source, "claims", "must be a list of {text, metric, better, than[, fractions]}")
    claims = []
    for i, claim in enumerate(raw):
        key = f"claims[{i}]"
        _mapping(claim, key, CLAIM_KEYS, ("text", "metric", "better", "than"), source)
        if claim["metric"] not in CLAIM_METRICS:
            raise _fail(source, f"{key}.metric", f"one of {', '.join(CLAIM_METRICS)}, got {claim['metric']!r}")
        for side in ("better", "than"):
            if claim[side] not in names:
                raise _fail(source, f"{key}.{side}", f"names no entry: {claim[side]!r}")
        chosen = claim.get("fractions")
        if chosen is not None and (not isinstance(chosen, list) or not chosen or not set(chosen) <= set(fractions)):
            raise _fail(source, f"{key}.fractions", f"must be a list of the league's fractions {fractions}, "
                        f"got {chosen!r}")
        claims.append({**claim, "text": str(claim["text"])})
    return claims


def num_eval_samples(budget: LeagueBudget) -> int:
    return len(world.all_prompts()) * budget.samples_per_prompt


def recipe_selection_seeds(recipe: Path) -> list[int]:
    """The ``selection_seeds`` a recipe declares (read from the file: an MSD recipe is not a plain run config)."""
    data = load_yaml_file(recipe)
    seeds = (data or {}).get("selection_seeds") or []
    if not isinstance(seeds, list) or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise LeagueError(f"{recipe}: selection_seeds: must be a list of evaluation seed bases, got {seeds!r}")
    return seeds


def held_out_problems(league: League, budget: LeagueBudget) -> list[str]:
    """Why the league's evaluation (and noise) seeds are not held out from the entries' recipes: one line per clash
    of a seed range with a seed base a recipe declares it was chosen on; empty when held out."""
    n = num_eval_samples(budget)
    problems = []
    seeds = [("eval_seed", league.eval_seed)] + ([("noise_seed", league.noise_seed)] if league.noise_seed is not None
                                                 else [])
    for key, seed in seeds:
        for entry in league.entries:
            for base in recipe_selection_seeds(entry.recipe):
                if seed < base + max(n, PROTOCOL_SAMPLES) and base < seed + n:
                    problems.append(f"{key} {seed} (seeds {seed} … {seed + n - 1}) meets the seeds {base} … "
                                    f"{base + PROTOCOL_SAMPLES - 1} that {entry.recipe.name} (entry {entry.name}) "
                                    "declares its values were chosen on")
    return problems


def _budget_overrides(budget_flops: float, fractions: Sequence[float]) -> list[str]:
    marks = [f for f in fractions if f < 1]
    return [f"train.budget_flops={budget_flops!r}", f"train.budget_marks={json.dumps(marks)}",
            f"train.max_steps={STEP_CEILING}", "train.sample_every=0",
            f"train.checkpoint_minutes={CHECKPOINT_MINUTES}"]


def _marks(run: Path) -> dict[float, dict]:
    path = run / "logs" / "budget_marks.json"
    if not path.is_file():
        return {}
    return {float(m["fraction"]): m for m in json.loads(path.read_text(encoding="utf-8"))["marks"]}


def _student_runs(entry: LeagueEntry, run: Path) -> list[Path]:
    return [run / f"student_{k}" for k in range(entry.num_students())] if entry.multi_student else [run]


def _trained(entry: LeagueEntry, run: Path) -> bool:
    return all(1.0 in _marks(r) for r in _student_runs(entry, run))


def train_entry(entry: LeagueEntry, budget: LeagueBudget, fractions: Sequence[float], run: Path,
                log: Callable[[str], None]) -> None:
    """Distil ``entry`` under the budget into ``run`` (resuming what is there)."""
    if entry.multi_student:
        share = budget.budget_flops / entry.num_students()
        overrides = [*entry.overrides, *_budget_overrides(share, fractions)]
        resume = "latest" if (run / "router.json").is_file() else None
        distill_multi(entry.pipeline, entry.recipe, run, overrides=overrides, resume=resume, export=False,
                      overwrite=resume is None and run.exists(), log=log)
        return
    overrides = [*entry.overrides, *_budget_overrides(budget.budget_flops, fractions)]
    resume = "latest" if latest_checkpoint(run / "checkpoints") is not None else None
    distill_single(entry.pipeline, entry.recipe, run, overrides=overrides, resume=resume, export=False,
                   overwrite=resume is None and run.exists(), log=log)


def updates_at(entry: LeagueEntry, run: Path, fraction: float) -> int:
    """The generator updates (ODE-pair warm-up updates included) the entry had run at ``fraction`` of the budget,
    summed over an MSD entry's students; 0 when the budget ended before the first one."""
    return sum(int(_marks(r)[fraction]["step"]) for r in _student_runs(entry, run))


#: written into a folder :func:`export_at` filled, last: the checkpoints it was exported from
EXPORT_MARKER = "league_export.json"


def export_at(entry: LeagueEntry, run: Path, fraction: float, out: Path) -> tuple[Path, int, float]:
    """The student at ``fraction`` of the budget exported to ``out``; with the FLOPs and training seconds it had
    used there (summed over an MSD entry's students). A folder this already exported from the same checkpoints is
    kept as it is (:data:`EXPORT_MARKER`), so that an evaluation cut off while judging it finds the student its
    stored samples came from (their fingerprint names the folder's files and times) and reuses them."""
    runs = _student_runs(entry, run)
    marks = [_marks(r)[fraction] for r in runs]
    source = {"checkpoints": [[str(m["checkpoint"]), folder_digest(r / "checkpoints" / str(m["checkpoint"]))]
                              for r, m in zip(runs, marks)]}  # its name, files, sizes and times
    flops = sum(int(m["flops"]) for m in marks)
    seconds = sum(float(m.get("seconds") or 0.0) for m in marks)
    try:
        if json.loads((out / EXPORT_MARKER).read_text(encoding="utf-8")) == source:
            return out, flops, seconds
    except (OSError, ValueError):
        pass
    _export_student(entry, run, runs, marks, out)
    write_text_atomic(out / EXPORT_MARKER, json.dumps(source, indent=2))
    return out, flops, seconds


def _export_student(entry: LeagueEntry, run: Path, runs: list[Path], marks: list[dict], out: Path) -> None:
    """:func:`export_at`'s export (over whatever ``out`` holds) of the checkpoints ``marks`` name in ``runs`` (the
    entry's run, or an MSD entry's student runs)."""
    if not entry.multi_student:
        export_run(run, out, checkpoint=marks[0]["checkpoint"], overwrite=True)
        return
    parts, students = [], []
    for k, (student_run, mark) in enumerate(zip(runs, marks)):
        folder = export_run(student_run, out.parent / f"{out.name}-student_{k}", checkpoint=mark["checkpoint"],
                            overwrite=True)
        parts.append(folder)
        prompts = (student_run / "prompts.txt").read_text(encoding="utf-8").splitlines()
        students.append({"student": k, "prompts": len(prompts), "example_prompt": prompts[0], "steps": mark["step"]})
    export_multi_student(run, load_router(run / "router.json"), parts, students, out_dir=out, overwrite=True)
    for folder in parts:
        shutil.rmtree(folder, ignore_errors=True)


def evaluate(league: League, budget: LeagueBudget, name: str, pipeline: Path, steps: int, guidance: float,
             seed: int, work: Path, log: Callable[[str], None]) -> dict:
    """The toy-quality protocol on one exported student (its report entry)."""
    data = {"suite": f"league-{league.name}-{budget.name}", "metrics": ["toy"], "prompts": "toy",
            "samples_per_prompt": budget.samples_per_prompt, "seed": seed, "batch_size": league.batch_size,
            "latency": False,  # timed once per entry, alone: entry_latency
            "entries": [{"name": name, "role": "student", "pipeline": str(pipeline), "steps": steps,
                         "guidance": guidance}]}
    suite = suite_from_dict(data, source=f"{league.source} ({name})")
    return run_suite(suite, work, log=log, write_files=False)["entries"][0]


def entry_latency(league: League, entry: LeagueEntry, folder: Path, log: Callable[[str], None]) -> dict | None:
    """The latency of the entry's student (:func:`~stepdistill.eval.measure_pipeline_latency` at the league's
    ``latency`` settings, on the first toy prompt), measured once, at the full budget, by the process that writes the
    tables after every worker has ended, so that no other training shares the cores; kept in ``latency.json``. A
    student's latency does not change with training (the same network and step count), so every row of the entry
    carries it. None when the league file sets ``latency: false``."""
    if not league.latency:
        return None
    path = folder / "latency.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["latency_ms"]
    settings = league.latency if isinstance(league.latency, dict) else {}
    student, _, _ = export_at(entry, folder / "run", 1.0, folder / "student-latency")
    t0 = time.time()
    try:
        pipe = load_pipeline(student, device="cuda" if torch.cuda.is_available() else "cpu")
        latency = measure_pipeline_latency(pipe, world.all_prompts()[0], entry.steps, entry.guidance,
                                           batch=int(settings.get("batch", 64)), warmup=int(settings.get("warmup", 1)),
                                           repeats=int(settings.get("repeats", 3)))
    finally:
        shutil.rmtree(student, ignore_errors=True)
    log(f"[league] {entry.name}: latency {latency['batchN']:.2f} ms per image at batch {latency['n']}, "
        f"{latency['batch1']:.1f} ms at batch 1 ({time.time() - t0:.0f} s)")
    write_text_atomic(path, json.dumps({"latency_ms": latency}, indent=2))
    return latency


def league_row(entry: LeagueEntry, league: League, budget: LeagueBudget, fraction: float, flops: int,
               seconds: float, result: dict, seed: int, updates: int) -> dict:
    """One committed row: the fields of :data:`stepdistill.eval.league_report.ROW_KEYS` and the rest of the
    evaluation's figures."""
    row = {
        "name": entry.name, "recipe": str(entry.recipe.relative_to(entry.recipe.parents[1])), "group": entry.group,
        "steps": entry.steps, "guidance": entry.guidance, "league_budget": budget.name, "budget_unit": BUDGET_UNIT,
        "budget": flops, "budget_total": budget.budget_flops, "budget_fraction": fraction, "updates": updates,
        "eval_seed": seed,
        "num_samples": result["num_samples"], "fid": result["fid"], "adherence": result["adherence"],
        "all_correct": result.get("adherence_all"), "diversity": result["diversity"],
        "coverage": result.get("coverage"), "nfe": result["nfe"], "latency_ms": result.get("latency_ms"),
        "wall_s": round(seconds, 1), "adherence_per_attribute": result.get("adherence_per_attribute"),
        "overrides": list(entry.overrides),
    }
    missing = [k for k in ROW_KEYS if k not in row]
    assert not missing, missing  # a bug here, not in the league file
    return row


def sheet_prompts() -> list[int]:
    """The toy prompts (indices) the samples sheet shows: every :data:`SHEET_STRIDE`-th, :data:`SHEET_PROMPTS` of
    them."""
    return [k * SHEET_STRIDE % len(world.all_prompts()) for k in range(SHEET_PROMPTS)]


def full_budget_samples(budget: LeagueBudget, folder: Path) -> np.ndarray | None:
    """The entry's full-budget student on the :func:`sheet_prompts` (the first sample of each: the same prompts and
    seeds for every entry), read from the samples its evaluation stored (uint8, N×3×H×W); None when they are not
    there."""
    spp = budget.samples_per_prompt
    indices = [i * spp for i in sheet_prompts()]
    stored = folder / f"eval-{_pct(1.0)}" / "samples"
    configurations = [p for p in stored.iterdir() if p.is_dir()] if stored.is_dir() else []
    return read_stored_samples(configurations[0], indices) if len(configurations) == 1 else None


def _pct(fraction: float) -> str:
    return f"{round(fraction * 100):03d}"


def _tasks_done(entry: LeagueEntry, folder: Path, fractions: Sequence[float]) -> int:
    """The entry's finished tasks, read from its folder: its training (1) and each judged fraction (1 each)."""
    return int(_trained(entry, folder / "run")) + sum((folder / f"at-{_pct(f)}.json").is_file() for f in fractions)


def _attempt_entry(league: League, budget: LeagueBudget, entry: LeagueEntry, out: Path, bar,
                   log: Callable[[str], None], time_latency: bool = True) -> tuple[list[dict], str | None]:
    """:func:`_run_entry` under the entry's lock: its rows and None, or no rows and why it did not finish (another
    process holds it; it failed: the traceback then in ``entries/<name>/failed.txt``, removed once it succeeds)."""
    folder = out / "entries" / entry.name
    failure = folder / "failed.txt"
    try:
        with entry_lock(out, entry.name):
            rows = _run_entry(league, budget, entry, folder, bar, log, time_latency)
        failure.unlink(missing_ok=True)
        return rows, None
    except EntryBusy as err:
        log(f"[league] {entry.name}: skipped, {err}")
        return [], str(err)
    except Exception as err:  # noqa: BLE001 - one entry's failure must not stop the league
        why = f"{type(err).__name__}: {err}"
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(failure, traceback.format_exc())
        log(f"[league] {entry.name}: failed ({why}); the other entries go on, the traceback is in {failure}; run "
            "the league again to retry it")
        return [], why


def _end_with_parent(parent: int, every: float = 2.0) -> None:
    """Send this process SIGTERM once its parent ``parent`` has ended (it is then adopted: another parent pid)."""
    while os.getppid() == parent:
        time.sleep(every)
    os.kill(os.getpid(), signal.SIGTERM)


def _worker_noise(league: League, budget: LeagueBudget, entry: LeagueEntry, out: Path,
                  log: Callable[[str], None]) -> None:
    """In a worker with no entry left: :func:`_noise` for ``entry`` under its lock, if the entry is judged at the
    full budget and its noise is not; nothing if another process holds the entry or it is not finished. A failure is
    logged and left to the collecting pass, which judges the noise again (and reports it)."""
    folder = out / "entries" / entry.name
    last = folder / f"at-{_pct(1.0)}.json"
    if not last.is_file() or (folder / "noise.json").is_file():
        return
    try:
        with entry_lock(out, entry.name):
            _noise(league, budget, entry, out, [json.loads(last.read_text(encoding="utf-8"))], log)
    except EntryBusy:
        return
    except Exception as err:  # noqa: BLE001 - the collecting pass judges it again
        log(f"[league] {entry.name}: judging the noise failed ({type(err).__name__}: {err}); the collecting pass "
            "tries again")


def _worker(path: str, out: str, budget_name: str, names: list[str], noise_names: list[str], next_index: Any,
            threads: int, log_file: str) -> None:
    """A league worker process: it takes the next of ``names`` (``next_index``, a counter shared with the other
    workers) until none is left, training and judging each with ``threads`` torch threads (latency is timed later,
    alone, by the collecting process), then judges the noise of those of ``noise_names`` that are finished and not
    taken by another worker; its output in ``log_file``. It ends itself (SIGTERM) if the league process that started
    it ends first, however that ended, so that it never goes on holding an entry on its own."""
    from tqdm.auto import tqdm

    threading.Thread(target=_end_with_parent, args=(os.getppid(),), daemon=True).start()
    with open(log_file, "a", encoding="utf-8") as stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        torch.set_num_threads(threads)
        league = load_league(path)
        entries = {e.name: e for e in league.entries}
        while True:
            with next_index.get_lock():
                i = next_index.value
                next_index.value = i + 1
            if i >= len(names):
                break
            with tqdm(disable=True) as bar:
                _attempt_entry(league, league.budgets[budget_name], entries[names[i]], Path(out), bar,
                               lambda line: print(line, flush=True), time_latency=False)
        for name in noise_names:
            _worker_noise(league, league.budgets[budget_name], entries[name], Path(out),
                          lambda line: print(line, flush=True))


def _run_workers(league: League, budget: LeagueBudget, entries: list[LeagueEntry], noise_entries: list[LeagueEntry],
                 out: Path, workers: int, log: Callable[[str], None]) -> None:
    """The entries shared among ``workers`` processes, each with an equal share of this process's torch threads and
    taking the next unstarted entry (in league-file order) whenever it finishes one, so that no worker idles while
    another has a queue, then judging the noise of the finished ``noise_entries``; one progress bar over all of them,
    read from the entry folders. A worker that fails is reported; the in-process pass that follows finishes (or
    retries) whatever it left. Interrupted (Ctrl-C, or SIGTERM: ``kill`` on this process), it stops the workers before
    it ends, so none goes on holding an entry."""
    import multiprocessing

    from tqdm.auto import tqdm

    threads = max(1, torch.get_num_threads() // workers)
    logs = out / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    names = [e.name for e in entries]
    noise_names = [e.name for e in noise_entries]
    next_index = context.Value("i", 0)
    processes = []
    for k in range(min(workers, len(entries))):
        log_file = logs / f"worker-{k}.log"
        process = context.Process(target=_worker, name=f"league-worker-{k}", daemon=False,
                                  args=(str(league.source), str(out), budget.name, names, noise_names, next_index,
                                        threads, str(log_file)))
        process.start()
        processes.append((process, log_file))
    log(f"[league] {len(processes)} workers ({threads} thread{'s' if threads > 1 else ''} each) take the "
        f"{len(entries)} entries in turn, each the next when it finishes one: {', '.join(names)}; their output in "
        f"{logs}/worker-<k>.log")
    total = len(entries) * (1 + len(league.fractions)) + len(noise_entries)

    def done() -> int:
        return (sum(_tasks_done(e, out / "entries" / e.name, league.fractions) for e in entries)
                + sum((out / "entries" / e.name / "noise.json").is_file() for e in noise_entries))

    bar = tqdm(total=total, initial=done(), desc=f"league[{budget.name}] x{len(processes)}", unit="task",
               dynamic_ncols=True)
    previous_handler = catch_sigterm()
    try:
        while any(p.is_alive() for p, _ in processes):
            time.sleep(5)
            bar.n = done()
            bar.refresh()
        bar.n = done()
        bar.refresh()
    except BaseException:
        for process, _ in processes:
            process.terminate()
        raise
    finally:
        restore_sigterm(previous_handler)
        bar.close()
        for process, _ in processes:
            process.join()
    for process, log_file in processes:
        if process.exitcode != 0:
            log(f"[league] worker {process.name} ended with exit code {process.exitcode} (see {log_file}); the "
                "entry it was on, and any it did not reach, are done here")


def run_league(path: str | Path, out_dir: str | Path, budget_name: str = "quick", only: Sequence[str] | None = None,
               log: Callable[[str], None] = print, workers: int = 1) -> dict[str, Any]:
    """Train and judge every entry (see the module docstring); returns what ``league.json`` holds. With ``workers``
    > 1 the entries are first shared among that many processes, each taking the next when it finishes one (each with
    its share of the torch threads: on 2 CPU cores two one-thread workers train about 1.45 times as fast as one
    two-thread process), then this process collects their rows (finishing anything a worker left), times each
    student alone, judges the noise and writes the tables."""
    if workers < 1:
        raise LeagueError(f"workers must be at least 1, got {workers}")
    from tqdm.auto import tqdm

    league = load_league(path)
    if budget_name not in league.budgets:
        raise LeagueError(f"{league.source}: budgets: no budget {budget_name!r} (it has "
                          f"{', '.join(league.budgets)})")
    budget = league.budgets[budget_name]
    problems = held_out_problems(league, budget)
    if problems:
        raise LeagueError(f"{league.source}: the evaluation is not held out: " + "; ".join(problems)
                          + ". Choose an eval_seed (and noise_seed) outside those ranges.")
    entries = [e for e in league.entries if not only or e.name in only]
    if only and len(entries) != len(set(only)):
        raise LeagueError(f"--only names entries the league does not have: "
                          f"{sorted(set(only) - {e.name for e in league.entries})}")
    out = Path(out_dir)
    settings = {"league": league.name, "source": str(league.source), "budget": budget_name,
                "budget_flops": budget.budget_flops, "budget_unit": BUDGET_UNIT, "eval_seed": league.eval_seed,
                "samples_per_prompt": budget.samples_per_prompt, "fractions": league.fractions}
    state_file = out / "league_settings.json"
    if state_file.is_file():
        before = json.loads(state_file.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if k != "source" and before.get(k) != settings[k])
        if changed:
            raise LeagueError(f"{out} holds a league run with other settings ({', '.join(changed)}); resume it with "
                              "the same league file and budget, or choose another --out")
    for entry in entries:  # every plain run checked before anything trains (distill_multi checks its own first)
        if not entry.multi_student:
            validate_run(entry.pipeline, entry.recipe,
                         [*entry.overrides, *_budget_overrides(budget.budget_flops, league.fractions)])
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(state_file, json.dumps(settings, indent=2))
    noise_entries = [e for e in entries if e.name in league.noise_entries] if league.noise_seed is not None else []
    if workers > 1:
        pending = [e for e in entries
                   if _tasks_done(e, out / "entries" / e.name, league.fractions) < 1 + len(league.fractions)]
        if len(pending) > 1:
            unjudged = [e for e in noise_entries if not (out / "entries" / e.name / "noise.json").is_file()]
            _run_workers(league, budget, pending, unjudged, out, min(workers, len(pending)), log)
    tasks = len(entries) * (1 + len(league.fractions)) + len(noise_entries)
    bar = tqdm(total=tasks, desc=f"league[{budget_name}]", unit="task", dynamic_ncols=True)
    t0 = time.time()
    rows: list[dict] = []
    failed: dict[str, str] = {}
    try:
        for entry in entries:
            tasks_before = bar.n
            done_rows, why = _attempt_entry(league, budget, entry, out, bar, log)
            rows += done_rows
            if why is not None:
                failed[entry.name] = why
                bar.update(tasks_before + 1 + len(league.fractions) - bar.n)  # its remaining tasks, skipped
        noise = []
        for entry in noise_entries:
            if entry.name not in failed:
                bar.set_postfix_str(f"{entry.name}: noise")
                noise.append(_noise(league, budget, entry, out, rows, log))
            bar.update(1)
    finally:
        bar.close()
    claims = judge_claims(rows, league.claims, noise)
    images = []
    if rows:
        plot_convergence(rows, out / "convergence.png", noise)
        images.append("convergence.png")
        sheet = {e.name: full_budget_samples(budget, out / "entries" / e.name) for e in entries}
        sheet = {name: images_u8 for name, images_u8 in sheet.items() if images_u8 is not None}
        if sheet:
            prompts = world.all_prompts()
            plot_samples(rows, sheet, [prompts[i] for i in sheet_prompts()], out / "samples.png")
            images.append("samples.png")
    result = {**settings, "wall_seconds_this_run": round(time.time() - t0, 1), "rows": rows, "noise": noise,
              "claims": claims, "failed": failed, "images": images}
    write_text_atomic(out / "league.json", json.dumps(result, indent=2))
    write_text_atomic(out / "tables.md", league_tables(rows, league.fractions, noise, claims))
    for group in dict.fromkeys(r["group"] for r in rows):
        best = ranking([r for r in rows if r["group"] == group], 1.0)
        if best:
            log(f"[league] {group}: best at the full budget {best[0]['name']} (FID_toy {best[0]['fid']:.1f})")
    log(f"[league] wrote {', '.join(str(out / name) for name in ['league.json', 'tables.md', *images])}")
    for name, why in failed.items():
        log(f"[league] {name}: FAILED ({why})")
    return result


def _run_entry(league: League, budget: LeagueBudget, entry: LeagueEntry, folder: Path, bar,
               log: Callable[[str], None], time_latency: bool = True) -> list[dict]:
    """Train one entry under the budget (unless done), judge it at each fraction (unless judged) and, with
    ``time_latency``, time its student (unless timed); its rows."""
    run = folder / "run"
    bar.set_postfix_str(f"{entry.name}: training")
    if not _trained(entry, run):
        log(f"[league] {entry.name}: distilling {entry.recipe.name} under {budget.budget_flops:.3g} FLOPs")
        train_entry(entry, budget, league.fractions, run, log)
    bar.update(1)
    rows = []
    for fraction in league.fractions:
        row_file = folder / f"at-{_pct(fraction)}.json"
        if not row_file.is_file():
            bar.set_postfix_str(f"{entry.name}: judging at {fraction:.0%}")
            student, flops, seconds = export_at(entry, run, fraction, folder / f"student-{_pct(fraction)}")
            result = evaluate(league, budget, entry.name, student, entry.steps, entry.guidance, league.eval_seed,
                              folder / f"eval-{_pct(fraction)}", log)
            row = league_row(entry, league, budget, fraction, flops, seconds, result, league.eval_seed,
                             updates_at(entry, run, fraction))
            write_text_atomic(row_file, json.dumps(row, indent=2))
            shutil.rmtree(student, ignore_errors=True)  # re-exported from its checkpoint if needed again
        row = json.loads(row_file.read_text(encoding="utf-8"))
        if "updates" not in row:  # a row judged before rows carried it: read from the run's budget marks
            row = {**row, "updates": updates_at(entry, run, fraction)}
            write_text_atomic(row_file, json.dumps(row, indent=2))
        rows.append(row)
        bar.update(1)
    if time_latency:
        bar.set_postfix_str(f"{entry.name}: timing")
        latency = entry_latency(league, entry, folder, log)
        for fraction, row in zip(league.fractions, rows):
            if row.get("latency_ms") != latency:  # also replaces a time taken while other work shared the cores
                row["latency_ms"] = latency
                write_text_atomic(folder / f"at-{_pct(fraction)}.json", json.dumps(row, indent=2))
    return rows


def _noise(league: League, budget: LeagueBudget, entry: LeagueEntry, out: Path, rows: list[dict],
           log: Callable[[str], None]) -> dict:
    """The evaluation's own noise in the entry's group: its full-budget student judged again on ``noise_seed``
    (``entries/<name>/noise.json``: the entry, its group, both seeds and both figures)."""
    folder = out / "entries" / entry.name
    path = folder / "noise.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    first = next(r for r in rows if r["name"] == entry.name and math.isclose(r["budget_fraction"], 1.0))
    log(f"[league] {entry.name}: noise: its full-budget student judged again on seed {league.noise_seed}")
    student, _, _ = export_at(entry, folder / "run", 1.0, folder / "student-noise")
    again = evaluate(league, budget, entry.name, student, entry.steps, entry.guidance, league.noise_seed,
                     folder / "eval-noise", log)
    shutil.rmtree(student, ignore_errors=True)
    noise = {"name": entry.name, "group": entry.group, "budget_fraction": 1.0,
             "eval_seeds": [league.eval_seed, league.noise_seed],
             "fid": [first["fid"], again["fid"]], "adherence": [first["adherence"], again["adherence"]],
             "num_samples": again["num_samples"]}
    write_text_atomic(path, json.dumps(noise, indent=2))
    return noise
