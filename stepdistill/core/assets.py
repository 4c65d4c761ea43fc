"""The folders shipped under ``assets/`` (the toy teacher and the toy evaluator), named so that ``teacher: toy`` is a
local model source like any other; one clear error when one is missing. The toy world's code lives in
:mod:`stepdistill.toy`; this module knows only where its folders are."""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent.parent / "assets"
TOY_TEACHER = ASSETS_DIR / "toy-teacher"
TOY_EVALUATOR = ASSETS_DIR / "toy-evaluator"
TOY_FLOW_TEACHER = ASSETS_DIR / "toy-flow-teacher"
#: A pipeline folder's own call arguments (``{"call_kwargs": {...}}``), passed on every call of the pipeline; the toy
#: flow teacher records its ``max_sequence_length`` there.
PIPELINE_CALL_FILE = "stepdistill_pipeline.json"


def require(path: Path, what: str, command: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"the {what} is missing: expected a folder at {path}. It is committed with the repository; "
            f"recreate it with `{command}`."
        )
    return path


def toy_teacher_path() -> Path:
    return require(TOY_TEACHER, "toy teacher", "stepdistill toy train-teacher")


def toy_flow_teacher_path() -> Path:
    return require(TOY_FLOW_TEACHER, "toy flow teacher", "stepdistill toy train-flow-teacher")


def toy_evaluator_path() -> Path:
    return require(TOY_EVALUATOR, "toy evaluator", "stepdistill toy train-evaluator")
