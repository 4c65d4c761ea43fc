"""Toy-specific checks on models and prompts; where the shipped toy folders live is
:mod:`stepdistill.core.assets` (re-exported here)."""

from __future__ import annotations

import json
from pathlib import Path

from stepdistill.core.assets import (  # noqa: F401 (re-exported)
    ASSETS_DIR,
    TOY_EVALUATOR,
    TOY_FLOW_TEACHER,
    TOY_TEACHER,
    require,
    toy_evaluator_path,
    toy_flow_teacher_path,
    toy_teacher_path,
)
from stepdistill.toy import world


def is_toy_model(source: str | Path) -> bool:
    """Whether ``source`` names a toy teacher (``"toy"``, ``"toy-flow"`` or their folders) or a student exported from
    one: models whose tokenizer knows only the toy world's closed vocabulary."""
    if str(source) in ("toy", "toy-flow"):
        return True
    path = Path(source).expanduser()
    try:
        if path.resolve() in (TOY_TEACHER.resolve(), TOY_FLOW_TEACHER.resolve()):
            return True
        info = path / "stepdistill_export.json"
        return info.is_file() and json.loads(info.read_text(encoding="utf-8")).get("base_model") in (
            "toy-teacher", "toy-flow-teacher")
    except (OSError, ValueError):
        return False


def check_toy_vocabulary(prompts, where: str) -> None:
    """ValueError naming ``where`` and the first prompt with a word outside the toy vocabulary (which the toy
    tokenizer would split into characters, silently)."""
    for i, prompt in enumerate(prompts):
        unknown = world.words_outside_vocabulary(prompt)
        if unknown:
            raise ValueError(
                f"{where}: prompt {i + 1} ({prompt!r}) uses {', '.join(repr(w) for w in unknown)}, outside the toy "
                f"world's vocabulary, which the toy tokenizer would split into characters; use only: "
                f"{' '.join(world.VOCABULARY)}")
