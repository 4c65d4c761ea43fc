"""The folders shipped under ``assets/`` (the toy teacher and the toy evaluator), named so that ``teacher: toy`` is a
local model source like any other; one clear error when one is missing. The toy world's code lives in
:mod:`stepdistill.toy`; this module knows only where its folders are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

ASSETS_DIR = Path(__file__).resolve().parent.parent.parent / "assets"
TOY_TEACHER = ASSETS_DIR / "toy-teacher"
TOY_EVALUATOR = ASSETS_DIR / "toy-evaluator"
TOY_FLOW_TEACHER = ASSETS_DIR / "toy-flow-teacher"
#: A pipeline folder's own call arguments (``{"call_kwargs": {...}}``), passed on every call of the pipeline; the toy
#: flow teacher records its ``max_sequence_length`` there.
PIPELINE_CALL_FILE = "stepdistill_pipeline.json"


def read_call_kwargs(folder: str | Path) -> dict[str, Any]:
    """The ``call_kwargs`` that ``folder/stepdistill_pipeline.json`` records ({} when the folder has no such file).
    A malformed file raises ValueError naming it."""
    path = Path(folder) / PIPELINE_CALL_FILE
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")).get("call_kwargs") or {})
    except (ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"{path} is not valid JSON with a 'call_kwargs' object ({e})") from e


def write_call_kwargs(folder: str | Path, call_kwargs: Mapping[str, Any]) -> None:
    """Record ``call_kwargs`` as the arguments every call of the pipeline in ``folder`` takes."""
    (Path(folder) / PIPELINE_CALL_FILE).write_text(json.dumps({"call_kwargs": dict(call_kwargs)}, indent=2) + "\n",
                                                   encoding="utf-8")


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
