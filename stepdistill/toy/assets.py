"""Where the shipped toy assets live, and one clear error when they are missing."""

from __future__ import annotations

import json
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent.parent / "assets"
TOY_TEACHER = ASSETS_DIR / "toy-teacher"
TOY_EVALUATOR = ASSETS_DIR / "toy-evaluator"


def require(path: Path, what: str, command: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"the {what} is missing: expected a folder at {path}. It is committed with the repository; "
            f"recreate it with `{command}`."
        )
    return path


def toy_teacher_path() -> Path:
    return require(TOY_TEACHER, "toy teacher", "stepdistill toy train-teacher")


def toy_evaluator_path() -> Path:
    return require(TOY_EVALUATOR, "toy evaluator", "stepdistill toy train-evaluator")


def is_toy_model(source: str | Path) -> bool:
    """Whether ``source`` names the toy teacher (``"toy"`` or its folder) or a student exported from it: models
    whose tokenizer knows only the toy world's closed vocabulary."""
    if str(source) == "toy":
        return True
    path = Path(source).expanduser()
    try:
        if path.resolve() == TOY_TEACHER.resolve():
            return True
        info = path / "stepdistill_export.json"
        return info.is_file() and json.loads(info.read_text(encoding="utf-8")).get("base_model") == "toy-teacher"
    except (OSError, ValueError):
        return False


def check_toy_vocabulary(prompts, where: str) -> None:
    """ValueError naming ``where`` and the first prompt with a word outside the toy vocabulary (which the toy
    tokenizer would split into characters, silently)."""
    from stepdistill.toy import world

    for i, prompt in enumerate(prompts):
        unknown = world.words_outside_vocabulary(prompt)
        if unknown:
            raise ValueError(
                f"{where}: prompt {i + 1} ({prompt!r}) uses {', '.join(repr(w) for w in unknown)}, outside the toy "
                f"world's vocabulary, which the toy tokenizer would split into characters; use only: "
                f"{' '.join(world.VOCABULARY)}")
