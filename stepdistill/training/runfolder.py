"""What ``stepdistill distill`` decides before it loads a model or writes a file: the whole run validated (recipe,
pipeline preset, overrides, objective config), and what the output folder holds — so that a fresh run never shares a
folder with an old one and a resumed run never continues a checkpoint written under another configuration.

The run's identity is its resolved recipe (every key except those that only say how long to train and how often to
log, checkpoint or sample: :data:`VOLATILE_KEYS`) plus the pipeline preset; its fingerprint is a SHA-256 of that.
Each checkpoint's marker records both (``Trainer(run_identity=...)``), and the folder's ``run.json`` records the
run that owns it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from stepdistill.core.outputs import write_text_atomic
from stepdistill.training.checkpoint import (
    CheckpointError,
    find_loadable_checkpoint,
    find_resume_checkpoint,
    list_checkpoints,
    read_marker,
)
from stepdistill.training.config import ConfigError, RunConfig

RUN_FILE = "run.json"
#: keys that do not change what a run trains up to a given step (a resumed run may change them freely)
VOLATILE_KEYS = frozenset({
    "train.max_steps", "train.checkpoint_every", "train.checkpoint_minutes", "train.keep_checkpoints",
    "train.sample_every", "train.log_every", "train.num_workers", "train.count_flops", "train.budget_flops",
    "train.budget_marks", "selection_seeds",
})
#: what a run writes into its folder (and ``--overwrite`` removes)
RUN_ARTIFACTS = ("run.json", "run_config.yaml", "pipeline.yaml", "checkpoints", "logs", "samples", "student",
                 "distill_summary.json", "disback")


class RunFolderError(ValueError):
    """The output folder holds another run, or a checkpoint does not belong to this run's configuration."""


def run_identity(config: RunConfig, pipeline: Any) -> dict[str, Any]:
    """``{"config": {dotted key: value}, "pipeline": {...}}`` without the volatile keys."""
    flat = {k: v for k, v in config.flat().items() if k not in VOLATILE_KEYS}
    spec = dataclasses.asdict(pipeline) if dataclasses.is_dataclass(pipeline) else dict(pipeline)
    return json.loads(json.dumps({"config": flat, "pipeline": spec}, default=str))


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys (``config.<dotted>`` / ``pipeline.<key>``) whose values differ, as ``key: old -> new``."""
    out = []
    for part in ("config", "pipeline"):
        a, b = old.get(part), new.get(part, {})
        if a is None:  # a checkpoint written before the pipeline was recorded
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<unset>") != b.get(key, "<unset>"):
                out.append(f"{key if part == 'config' else 'pipeline.' + key}: {a.get(key, '<unset>')!r} -> "
                           f"{b.get(key, '<unset>')!r}")
    return out


def _marker_identity(marker: dict[str, Any]) -> dict[str, Any] | None:
    if isinstance(marker.get("identity"), dict):
        return marker["identity"]
    if isinstance(marker.get("config"), dict):  # older checkpoints: the config only
        config = RunConfig.from_dict(marker["config"])
        return {"config": {k: v for k, v in json.loads(json.dumps(config.flat(), default=str)).items()
                           if k not in VOLATILE_KEYS}}
    return None


def existing_artifacts(out: Path) -> list[Path]:
    found = []
    for name in RUN_ARTIFACTS:
        p = out / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(p)
    return found


def left_nothing(out: Path) -> bool:
    """Whether the run in ``out`` ended (failed, diverged, was killed) before writing anything worth keeping: no
    checkpoint, no student, no summary of a finished run and no DisBack path; its logs and samples alone do not
    block a new run there."""
    return (not list_checkpoints(out / "checkpoints") and not any((out / name).exists() for name in
            ("student", "distill_summary.json", "disback")))


def describe_run(out: Path) -> str:
    ckpts = list_checkpoints(out / "checkpoints")
    what = [f"{len(ckpts)} checkpoint{'s' if len(ckpts) != 1 else ''}" + (f", the last {ckpts[-1][1].name}" if ckpts else "")]
    info = out / RUN_FILE
    if info.is_file():
        try:
            data = json.loads(info.read_text(encoding="utf-8"))
            what.append(f"recipe {data.get('recipe')}")
        except ValueError:
            pass
    return "; ".join(what)


@dataclasses.dataclass
class RunPlan:
    """The decisions ``distill`` acts on (see :func:`plan_run`)."""

    config: RunConfig
    spec: Any
    out: Path
    identity: dict[str, Any]
    fingerprint: str
    resume_from: Path | None = None
    start_step: int = 0
    remove: list[Path] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def apply(self) -> None:
        """Remove what ``--overwrite`` replaces (only the run's own files and folders)."""
        for p in self.remove:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def write_run_file(self, recipe: str | Path, pipeline: str | Path, overrides: Sequence[str]) -> None:
        path = self.out / RUN_FILE
        data: dict[str, Any] = {}
        if path.is_file() and self.resume_from is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                data = {}
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        if not data:
            data = {"fingerprint": self.fingerprint, "recipe": str(recipe), "pipeline": str(pipeline),
                    "overrides": list(overrides), "created": now, "resumes": []}
        if self.resume_from is not None:
            data.setdefault("resumes", []).append({"from": self.resume_from.name, "at": now,
                                                   "fingerprint": self.fingerprint})
        data["identity"] = self.identity
        write_text_atomic(path, json.dumps(data, indent=2, default=str))


def plan_run(
    config: RunConfig,
    spec: Any,
    out_dir: str | Path,
    resume: str | Path | None = None,
    overwrite: bool = False,
    allow_config_change: bool = False,
) -> RunPlan:
    """Decide what a ``distill`` run does with ``out_dir`` (nothing is written or removed here):

    - a fresh run (``resume`` None) in a folder that holds an earlier run is refused, unless ``overwrite`` (then the
      earlier run's files are listed in ``remove``);
    - ``resume`` ("latest", a checkpoint's name or a path) picks the newest *loadable* checkpoint (a damaged newer
      one is skipped and said so in ``notes``); a checkpoint whose recorded run identity differs from this run's is
      refused unless ``allow_config_change``; "latest" with no checkpoint starts fresh only if the folder holds no
      other run."""
    out = Path(out_dir)
    identity = run_identity(config, spec)
    fp = fingerprint(identity)
    plan = RunPlan(config, spec, out, identity, fp)
    found = existing_artifacts(out)
    ckpt_dir = out / "checkpoints"

    def refuse_in_use() -> None:
        raise RunFolderError(
            f"{out} already holds a run ({describe_run(out)}); continue it with --resume latest, replace it with "
            "--overwrite (deletes its checkpoints, logs, samples and student), or choose another --out")

    if resume is None:
        if found:
            if overwrite:
                plan.notes.append(f"--overwrite: removing the earlier run in {out} ({describe_run(out)})")
            elif left_nothing(out):
                plan.notes.append(f"the earlier run in {out} ended before its first checkpoint; replacing it")
            else:
                refuse_in_use()
            plan.remove = found
        return plan

    if str(resume) == "latest":
        path, skipped = find_loadable_checkpoint(ckpt_dir)
        for bad, problem in skipped:
            plan.notes.append(f"checkpoint {bad.name} is damaged ({problem}); "
                              + (f"resuming from {path.name} instead" if path else "no earlier checkpoint is intact"))
        if path is None:
            if skipped:
                raise CheckpointError(f"no loadable checkpoint under {ckpt_dir}: " + "; ".join(
                    f"{b.name}: {p}" for b, p in skipped) + ". Start over with --overwrite")
            owner = _folder_fingerprint(out)
            if found and owner != fp:
                if not (overwrite or left_nothing(out)):
                    refuse_in_use()
                plan.remove = found
                plan.notes.append(f"{'--overwrite: removing' if overwrite else 'replacing'} the earlier run in {out}"
                                  + ("" if overwrite else " (it ended before its first checkpoint)"))
            elif found:
                plan.notes.append(f"{out} holds this run but no checkpoint yet: starting it from step 0")
            return plan
    else:
        path = find_resume_checkpoint(ckpt_dir, resume)
        if path is None:
            raise CheckpointError(f"no checkpoint {str(resume)!r} under {ckpt_dir}")
    marker = read_marker(path)
    saved = _marker_identity(marker)
    changes = identity_changes(saved, identity) if saved is not None else ["<the checkpoint records no configuration>"]
    if changes:
        if not allow_config_change:
            old_fp = marker.get("fingerprint", "unrecorded")
            raise RunFolderError(
                f"checkpoint {path} was written by another run configuration (fingerprint {old_fp}, this run {fp}; "
                f"changed: {'; '.join(changes[:4])}{'; …' if len(changes) > 4 else ''}); resume with the recipe, "
                "pipeline and overrides that wrote it, or pass --allow-config-change to resume anyway")
        plan.notes.append(f"--allow-config-change: resuming {path.name} despite: {'; '.join(changes)}")
    if overwrite:
        raise RunFolderError("--overwrite starts a new run and --resume continues one: pass only one of them")
    plan.resume_from = path
    plan.start_step = int(marker.get("step", 0))
    return plan


def _folder_fingerprint(out: Path) -> str | None:
    info = out / RUN_FILE
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text(encoding="utf-8")).get("fingerprint")
    except ValueError:
        return None


def config_error_from_objective(err, recipe: str | Path, overrides: Sequence[str]) -> ConfigError:
    """An :class:`~stepdistill.objectives.base.ObjectiveConfigError` as a ConfigError naming the dotted key, the
    recipe file and the override that set it (if one did)."""
    key = f"objective_config.{err.key}"
    touched = [o for o in overrides if o.split("=", 1)[0].strip() == key]
    problem = err.problem + (f" (set by override {touched[-1]!r})" if touched else "")
    return ConfigError(key, problem, str(recipe))
