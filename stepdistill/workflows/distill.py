"""``stepdistill distill``: one run (:mod:`stepdistill.workflows.single_run`) or, for a recipe with a
``multi_student`` section, one ordinary run per student and the routed export
(:mod:`stepdistill.workflows.multi_student`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from stepdistill.workflows.multi_student import distill_multi, is_multi_student
from stepdistill.workflows.single_run import (
    distill_single,
    export_run,
    load_pipeline_spec,
    load_teacher,
    validate_run,
    with_regression_pairs,
)

__all__ = ["distill", "export_run", "load_pipeline_spec", "load_teacher", "validate_run", "with_regression_pairs"]


def distill(
    pipeline: str | Path,
    recipe: str | Path,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    resume: str | None = None,
    export: bool = True,
    overwrite: bool = False,
    allow_config_change: bool = False,
    dry_run: bool = False,
    log=print,
) -> dict[str, Any]:
    """Train a student as ``recipe`` says on the teacher ``pipeline`` names; export it to ``<out_dir>/student``
    (:func:`~stepdistill.workflows.single_run.distill_single`); an MSD recipe trains one ordinary run per student
    and exports the routed pipeline (:func:`~stepdistill.workflows.multi_student.distill_multi`). Same arguments,
    same return value."""
    run = distill_multi if is_multi_student(recipe) else distill_single
    return run(pipeline, recipe, out_dir, overrides=overrides, resume=resume, export=export, overwrite=overwrite,
               allow_config_change=allow_config_change, dry_run=dry_run, log=log)
