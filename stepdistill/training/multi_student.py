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

The rest of the recipe is the per-student recipe (``train.max_steps`` is *per student*: K × max_steps updates in all).
Students train in turn; a rerun with ``--resume latest`` skips finished students (their ``distill_summary.json``) and
resumes the interrupted one from its latest checkpoint. Not yet here: smaller students (narrower UNets with TSM first).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

SECTION = "multi_student"
KEYS = {"router", "patterns", "num_students", "seed"}


def is_multi_student(recipe: str | Path) -> bool:
    data = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) if Path(recipe).is_file() else None
    return isinstance(data, dict) and SECTION in data


def _router_spec(section: Any, recipe: str):
    from stepdistill.router import KeywordRouter
    from stepdistill.training.config import ConfigError

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


def distill_multi(pipeline: str | Path, recipe: str | Path, out_dir: str | Path, overrides: Sequence[str] = (),
                  resume: str | None = None, export: bool = True, overwrite: bool = False,
                  allow_config_change: bool = False, log=print) -> dict[str, Any]:
    """Train every student of an MSD recipe in turn, then export the routed folder ``<out_dir>/student``."""
    from stepdistill.router import KMeansRouter, load_router, save_router, split_prompts
    from stepdistill.training.run import distill, load_pipeline_spec, load_teacher
    from stepdistill.training.trainer import load_prompts

    recipe, out = Path(recipe), Path(out_dir)
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    spec = _router_spec(data.pop(SECTION), str(recipe))
    out.mkdir(parents=True, exist_ok=True)
    base_recipe = out / "student_recipe.yaml"
    base_recipe.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    from stepdistill.training.config import load_recipe

    config = load_recipe(base_recipe, overrides)  # errors name the key before anything trains
    prompts = load_prompts(config.prompts.source).prompts
    router_path = out / "router.json"
    resumed_router = load_router(router_path) if resume and router_path.is_file() else None
    embeds = None  # the training prompts' text embeddings, computed once, for a k-means router only
    if isinstance(spec, tuple) or (resumed_router is not None and resumed_router.kind == "kmeans"):
        teacher = load_teacher(load_pipeline_spec(pipeline))
        embeds = teacher.encode_prompt(list(prompts), with_uncond=False)
        del teacher
    if resumed_router is not None:
        router = resumed_router  # a resumed run keeps the partition it started with
    elif isinstance(spec, tuple):
        router = KMeansRouter.fit(embeds, spec[1], seed=spec[2])
    else:
        router = spec
    save_router(router, router_path)
    subsets = split_prompts(router, prompts, embeds)
    t0 = time.time()
    students = []
    for k, subset in enumerate(subsets):
        run = out / f"student_{k}"
        run.mkdir(parents=True, exist_ok=True)
        (run / "prompts.txt").write_text("\n".join(subset) + "\n", encoding="utf-8")
        summary_path = run / "distill_summary.json"
        if resume and summary_path.is_file():
            log(f"[msd] student {k}: finished earlier ({len(subset)} prompts), skipped")
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        else:
            has_ckpt = (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
            log(f"[msd] student {k} of {len(subsets)}: {len(subset)} prompts" + (" (resumed)" if has_ckpt and resume
                                                                                   else ""))
            summary = distill(pipeline, base_recipe, run, overrides=[*overrides, f"prompts.source={run / 'prompts.txt'}"],
                              resume=resume if has_ckpt else None, export=export, overwrite=overwrite,
                              allow_config_change=allow_config_change, log=log)
        students.append({"student": k, "prompts": len(subset), "example_prompt": subset[0],
                         "steps": summary.get("steps"), "seconds": summary.get("total_seconds"),
                         "final_losses": _last_losses(run)})
    result: dict[str, Any] = {"students": students, "router": router.to_dict() if router.kind == "keyword"
                              else {"kind": "kmeans", "num_students": router.num_students},
                              "total_seconds": round(time.time() - t0, 1)}
    if export:
        from stepdistill.pipelines.export_multi import export_multi_student

        result["student"] = str(export_multi_student(out, router, [out / f"student_{k}" / "student"
                                                                   for k in range(len(subsets))], students))
    (out / "msd_summary.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    for s in students:
        losses = ", ".join(f"{k}={v:.4g}" for k, v in sorted(s["final_losses"].items()))
        log(f"[msd] student {s['student']}: {s['prompts']} prompts, {s['steps']} updates, {s['seconds']} s; {losses}")
    return result
