"""Multi-student distillation (MSD, Song et al. 2024, arXiv:2410.23274; no code released): K one-step students, each
distilled from the teacher on its own subset of the prompts (its own generator, fake score and GAN head), and one
exported folder that routes every prompt to its student.

Design: a layer over the existing objectives, not a new objective. MSD changes no loss — it changes which prompts (and,
for the GAN, which real images) each student sees and what the exported student is — so each student is an ordinary
``distill`` run of the recipe's objective (DMD2 for the paper: DM, then DM + GAN) on a prompt file of its subset, in
``<out>/student_<k>/``, with that run's checkpoints, resume and logs. A recipe is an MSD recipe when it has a
``multi_student`` section::

    multi_student:
      router: keyword          # or kmeans (K clusters of the teacher's pooled text embeddings of the training prompts)
      patterns: [circle, square, triangle, cross]   # keyword: one case-insensitive regex per student
      num_students: 4          # kmeans only (keyword: len(patterns))
      seed: 0                  # kmeans only
      student_unet: {block_out_channels: [64, 64, 128]}   # optional: smaller students (teacher UNet config overrides)
      tsm: {steps: 400, batch_size: 64, lr: 5.0e-4, data: auto}  # their TSM stage (see stepdistill.training.tsm)

The rest of the recipe is the per-student recipe (``train.max_steps`` is *per student*: K × max_steps updates in all).
Students train in turn; a rerun with ``--resume latest`` skips finished students (their ``distill_summary.json``) and
resumes the interrupted one from its latest checkpoint.

Smaller students (``student_unet``): each starts as a freshly initialised UNet of the teacher's config with these
overrides, trained by teacher score matching (:mod:`stepdistill.training.tsm`, saved to ``student_<k>/tsm_unet``) on
its prompts, then distilled as above from that UNet (``generator.init_unet``); its fake score and GAN head still start
from the teacher. ``tsm.data``: ``real`` (toy-world images of the student's prompts), ``teacher`` (the teacher's DDIM
samples, ``tsm.teacher_samples`` of them at ``tsm.teacher_steps`` steps and CFG ``tsm.teacher_guidance``) or
``auto`` (real for toy prompts, else teacher).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from stepdistill.core.validation import is_finite_number
from stepdistill.core.yaml_io import load_yaml_file
from stepdistill.export.multi_student import export_multi_student
from stepdistill.models.router import (
    KeywordRouter,
    KMeansRouter,
    load_router,
    save_router,
    split_prompts,
)
from stepdistill.objectives.regression import make_regression_pairs
from stepdistill.training.config import ConfigError, recipe_from_data
from stepdistill.training.prompts import PromptSource
from stepdistill.training.runfolder import (
    RUN_FILE,
    RunFolderError,
    existing_artifacts,
    fingerprint,
    identity_changes,
    left_nothing,
    run_identity,
)
from stepdistill.training.tsm import narrow_unet, train_tsm
from stepdistill.workflows.single_run import (
    _all_toy,
    check_run_config,
    distill_single,
    load_pipeline_spec,
    load_run_prompts,
    load_teacher,
    toy_real_latents,
)

SECTION = "multi_student"
KEYS = {"router", "patterns", "num_students", "seed", "student_unet", "tsm"}
TSM_DEFAULTS = {"steps": 400, "batch_size": 64, "lr": 5.0e-4, "data": "auto", "teacher_samples": 512,
                "teacher_steps": 25, "teacher_guidance": 3.0}


def is_multi_student(recipe: str | Path) -> bool:
    data = load_yaml_file(recipe) if Path(recipe).is_file() else None
    return isinstance(data, dict) and SECTION in data


def _router_spec(section: Any, recipe: str):
    if not isinstance(section, dict):
        raise ConfigError(SECTION, "must be a mapping (router, patterns, num_students, seed)", recipe)
    unknown = sorted(set(section) - KEYS)
    if unknown:
        raise ConfigError(f"{SECTION}.{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(KEYS))})", recipe)
    kind = section.get("router", "keyword")
    if kind == "keyword":
        patterns = section.get("patterns")
        if not isinstance(patterns, list) or len(patterns) < 2 or not all(isinstance(p, str) for p in patterns):
            raise ConfigError(f"{SECTION}.patterns", "must list one regex per student (at least 2)", recipe)
        return KeywordRouter(patterns)
    if kind == "kmeans":
        k = section.get("num_students")
        if not isinstance(k, int) or isinstance(k, bool) or k < 2:
            raise ConfigError(f"{SECTION}.num_students", f"must be an integer >= 2, got {k!r}", recipe)
        return ("kmeans", k, int(section.get("seed", 0)))
    raise ConfigError(f"{SECTION}.router", f"must be 'keyword' or 'kmeans', got {kind!r}", recipe)


def _small_spec(section: dict, recipe: str) -> tuple[dict | None, dict]:
    """(UNet config overrides or None, TSM settings) of an MSD section, validated."""
    overrides = section.get("student_unet")
    if overrides is not None and (not isinstance(overrides, dict) or not overrides):
        raise ConfigError(f"{SECTION}.student_unet", "must map teacher UNet config keys to new values, e.g. "
                          "{block_out_channels: [64, 64, 128]}", recipe)
    tsm = section.get("tsm") or {}
    if not isinstance(tsm, dict):
        raise ConfigError(f"{SECTION}.tsm", "must be a mapping (steps, batch_size, lr, data, ...)", recipe)
    if tsm and overrides is None:
        raise ConfigError(f"{SECTION}.tsm", "TSM is for smaller students: set student_unet too", recipe)
    unknown = sorted(set(tsm) - set(TSM_DEFAULTS))
    if unknown:
        raise ConfigError(f"{SECTION}.tsm.{unknown[0]}", f"unknown key (allowed: {', '.join(TSM_DEFAULTS)})", recipe)
    tsm = {**TSM_DEFAULTS, **tsm}
    for key in ("steps", "batch_size", "teacher_samples", "teacher_steps"):
        if not isinstance(tsm[key], int) or isinstance(tsm[key], bool) or tsm[key] < 1:
            raise ConfigError(f"{SECTION}.tsm.{key}", f"must be a positive integer, got {tsm[key]!r}", recipe)
    for key in ("lr", "teacher_guidance"):
        if not is_finite_number(tsm[key]) or (key == "lr" and not tsm[key] > 0):
            raise ConfigError(f"{SECTION}.tsm.{key}", f"must be a finite{' positive' if key == 'lr' else ''} number, "
                              f"got {tsm[key]!r}", recipe)
        tsm[key] = float(tsm[key])
    if tsm["data"] not in ("auto", "real", "teacher"):
        raise ConfigError(f"{SECTION}.tsm.data", f"must be auto, real or teacher, got {tsm['data']!r}", recipe)
    return overrides, tsm


def _run_tsm(pipeline, student_run: Path, subset: Sequence[str], unet_overrides: dict, tsm: dict, seed: int,
             log) -> dict:
    """The TSM stage of one smaller student: ``student_run/tsm_unet`` (skipped when it is already there)."""
    folder = student_run / "tsm_unet"
    if (folder / "config.json").is_file():
        log(f"[msd] {student_run.name}: TSM done earlier ({folder}), reused")
        return json.loads((folder / "tsm_summary.json").read_text(encoding="utf-8"))
    spec = load_pipeline_spec(pipeline)
    teacher = load_teacher(spec)
    from accelerate import PartialState
    from accelerate.utils import set_seed

    teacher.to(PartialState().device)
    set_seed(seed)  # the narrow UNet's random initialisation is part of the run
    unet = narrow_unet(teacher.unet, unet_overrides)  # a bad config fails here, before any teacher sampling
    prompts = PromptSource(list(subset), str(student_run / "prompts.txt"))
    data = tsm["data"] if tsm["data"] != "auto" else ("real" if _all_toy(subset) else "teacher")
    if data == "real":
        source = toy_real_latents(teacher, seed, prompts)
    else:
        chosen = prompts.sample(tsm["teacher_samples"], torch.Generator().manual_seed(seed + 31))
        pairs = make_regression_pairs(teacher, chosen, num_steps=tsm["teacher_steps"],
                                      guidance=tsm["teacher_guidance"],
                                      generator=torch.Generator().manual_seed(seed + 32), batch_size=64, progress=True)
        latents = pairs.latents.float()

        def source(n: int, rng: torch.Generator):
            idx = torch.randint(len(chosen), (n,), generator=rng)
            return latents[idx.to(latents.device)], [chosen[i] for i in idx.tolist()]
    summary = train_tsm(teacher, unet, prompts, source, folder, steps=tsm["steps"], batch_size=tsm["batch_size"],
                        lr=tsm["lr"], seed=seed, log=log)
    summary["data"] = data
    summary["teacher_parameters"] = sum(p.numel() for p in teacher.unet.parameters())
    (folder / "tsm_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _last_losses(run: Path) -> dict[str, float]:
    """The last logged value of every loss of a student run (its ``logs/metrics.csv``)."""
    import csv

    out: dict[str, float] = {}
    path = run / "logs" / "metrics.csv"
    if path.is_file():
        with path.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key and key.startswith("loss/") and value not in (None, "", "-"):
                        try:
                            out[key] = float(value)
                        except ValueError:
                            pass
    return out


def _student_status(run: Path, config, spec, resume: str | None, allow_config_change: bool) -> tuple[str, str]:
    """What a (resumed) MSD run does with student folder ``run``: ("fresh" | "resume" | "finished", why). A
    folder written by another configuration of this student is refused unless ``allow_config_change``."""
    info = run / RUN_FILE
    if resume is None or not info.is_file():
        return "fresh", ""
    recorded = json.loads(info.read_text(encoding="utf-8"))
    identity = run_identity(config, spec)
    if recorded.get("fingerprint") != fingerprint(identity):
        changes = identity_changes(recorded.get("identity") or {}, identity) or ["<not recorded>"]
        if not allow_config_change:
            raise RunFolderError(
                f"{run} was trained with another configuration (changed: {'; '.join(changes[:4])}"
                f"{'; …' if len(changes) > 4 else ''}); resume with the recipe, pipeline and overrides that trained it, "
                "or pass --allow-config-change to keep what it trained")
    summary = run / "distill_summary.json"
    if summary.is_file():
        done = int(json.loads(summary.read_text(encoding="utf-8")).get("steps") or 0)
        if done >= config.train.max_steps:
            return "finished", f"finished earlier ({done} updates)"
        return "resume", f"continued from {done} to {config.train.max_steps} updates"
    return "resume", "resumed"


def distill_multi(pipeline: str | Path, recipe: str | Path, out_dir: str | Path, overrides: Sequence[str] = (),
                  resume: str | None = None, export: bool = True, overwrite: bool = False,
                  allow_config_change: bool = False, dry_run: bool = False, log=print) -> dict[str, Any]:
    """Train every student of an MSD recipe in turn, then export the routed folder ``<out_dir>/student``.

    Everything is validated before anything is written (the per-student recipe with the overrides, the objective
    config, each student's folder). With ``resume`` a student whose run finished ``train.max_steps`` updates is
    skipped, a started one continues from its latest checkpoint (or from update 0 when it has none yet), and a
    folder trained under another configuration is refused unless ``allow_config_change``. ``dry_run`` returns the
    plan without writing anything."""
    recipe, out = Path(recipe), Path(out_dir)
    data = load_yaml_file(recipe)
    section = data.pop(SECTION)
    router_spec = _router_spec({k: v for k, v in section.items() if k not in ("student_unet", "tsm")}
                               if isinstance(section, dict) else section, str(recipe))
    unet_overrides, tsm = _small_spec(section, str(recipe))
    spec = load_pipeline_spec(pipeline)
    config = recipe_from_data(data, str(recipe), overrides)  # errors name the key before anything is written
    check_run_config(spec, config, recipe, overrides, pipeline)
    prompts = load_run_prompts(spec, config, recipe).prompts
    if overwrite and resume:
        raise RunFolderError("--overwrite starts a new run and --resume continues one: pass only one of them")
    router_path = out / "router.json"
    resumed_router = load_router(router_path) if resume and router_path.is_file() else None
    kmeans = isinstance(router_spec, tuple) or (resumed_router is not None and resumed_router.kind == "kmeans")

    def student_overrides(k: int) -> list[str]:
        run = out / f"student_{k}"
        extra = [f"prompts.source={run / 'prompts.txt'}"]
        if unet_overrides is not None:
            extra.append(f"generator.init_unet={run / 'tsm_unet'}")
        return [*overrides, *extra]

    def student_config(k: int):
        """Student k's resolved recipe; its TSM UNet folder (written later by the TSM stage) is not required yet."""
        given = student_overrides(k)
        cfg = recipe_from_data(data, str(recipe), given[:-1] if unet_overrides is not None else given)
        if unet_overrides is not None:
            cfg.generator.init_unet = str(out / f"student_{k}" / "tsm_unet")
        return cfg

    def status_of(k: int) -> tuple[str, str]:
        run = out / f"student_{k}"
        status, why = _student_status(run, student_config(k), spec, resume, allow_config_change)
        if status == "fresh" and existing_artifacts(run) and not overwrite and not left_nothing(run):
            raise RunFolderError(f"{run} already holds a run; continue the MSD run with --resume latest, replace it "
                                 "with --overwrite, or choose another --out")
        return status, why

    if dry_run:
        num = (resumed_router.num_students if resumed_router is not None else
               router_spec[1] if isinstance(router_spec, tuple) else router_spec.num_students)
        router = resumed_router or (None if kmeans else router_spec)
        subsets = split_prompts(router, prompts) if router is not None and not kmeans else None
        plan = []
        for k in range(num):
            status, why = status_of(k)
            plan.append({"student": k + 1, "of": num, "folder": str(out / f"student_{k}"), "status": status,
                         "why": why, "prompts": len(subsets[k]) if subsets else "split by k-means at run time"})
        return {"dry_run": True, "multi_student": True, "config": config.to_dict(), "students": plan,
                "out": str(out), "router": router_spec.to_dict() if not isinstance(router_spec, tuple)
                else {"kind": "kmeans", "num_students": router_spec[1]}}

    embeds = None  # the training prompts' text embeddings, computed once, for a k-means router only
    if kmeans:
        teacher = load_teacher(spec)
        embeds = teacher.encode_prompt(list(prompts), with_uncond=False).cond  # (N, L, D) hidden states
        del teacher
    if resumed_router is not None:
        router = resumed_router  # a resumed run keeps the partition it started with
    elif isinstance(router_spec, tuple):
        router = KMeansRouter.fit(embeds, router_spec[1], seed=router_spec[2])
    else:
        router = router_spec
    subsets = split_prompts(router, prompts, embeds)
    statuses = [status_of(k) for k in range(len(subsets))]  # every student checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    base_recipe = out / "student_recipe.yaml"
    base_recipe.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    save_router(router, router_path)
    t0 = time.time()
    students = []
    total = len(subsets)
    for k, subset in enumerate(subsets):
        run = out / f"student_{k}"
        status, why = statuses[k]
        tsm_file = run / "tsm_unet" / "tsm_summary.json"
        tsm_summary = json.loads(tsm_file.read_text(encoding="utf-8")) if tsm_file.is_file() else None
        if status == "finished":
            log(f"[msd] student {k + 1} of {total}: {why} ({len(subset)} prompts), skipped")
            summary = json.loads((run / "distill_summary.json").read_text(encoding="utf-8"))
        else:
            log(f"[msd] student {k + 1} of {total}: {len(subset)} prompts" + (f" ({why})" if why else ""))
            run.mkdir(parents=True, exist_ok=True)
            (run / "prompts.txt").write_text("\n".join(subset) + "\n", encoding="utf-8")
            if unet_overrides is not None:
                tsm_summary = _run_tsm(pipeline, run, subset, unet_overrides, tsm, config.train.seed + k, log)
            summary = distill_single(pipeline, base_recipe, run, overrides=student_overrides(k),
                              resume="latest" if status == "resume" else None, export=export, overwrite=overwrite,
                              allow_config_change=allow_config_change, log=log)
        students.append({"student": k, "prompts": len(subset), "example_prompt": subset[0],
                         "steps": summary.get("steps"), "seconds": summary.get("total_seconds"),
                         "final_losses": _last_losses(run), **({"tsm": tsm_summary} if tsm_summary else {})})
    result: dict[str, Any] = {"students": students, "router": router.to_dict() if router.kind == "keyword"
                              else {"kind": "kmeans", "num_students": router.num_students},
                              "total_seconds": round(time.time() - t0, 1)}
    if export:
        result["student"] = str(export_multi_student(out, router, [out / f"student_{k}" / "student"
                                                                   for k in range(len(subsets))], students))
    (out / "msd_summary.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    for s in students:
        losses = ", ".join(f"{k}={v:.4g}" for k, v in sorted(s["final_losses"].items()))
        log(f"[msd] student {s['student'] + 1} of {total}: {s['prompts']} prompts, {s['steps']} updates, "
            f"{s['seconds']} s; {losses}")
    return result
