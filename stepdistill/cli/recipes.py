"""`stepdistill recipes`: the distillation recipes with their method and description."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stepdistill.core.yaml_io import YAMLFileError, load_yaml_file


def recipe_description(text: str, width: int) -> str:
    """The first paragraph of a recipe's header comment on one line, shortened to ``width`` characters at a word
    boundary (with "…") when longer."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if not body:
            if lines:
                break
            continue
        lines.append(body)
    summary = " ".join(" ".join(lines).split())
    if len(summary) <= width:
        return summary
    cut = summary.rfind(" ", 0, max(width - 1, 1))
    return (summary[:cut] if cut > 0 else summary[: width - 1]).rstrip(" ,;:(") + "…"


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the recipes under --dir with their method and the start of their header comment."""
    import shutil

    folder = Path(args.dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"recipe folder {folder} not found (run from the repository root or pass --dir)")
    rows, broken = [], []
    for path in sorted(folder.glob("*.yaml")):
        try:
            data = load_yaml_file(path)
        except YAMLFileError as err:
            broken.append(str(err))
            continue
        if not isinstance(data, dict) or "objective" not in data:
            continue
        rows.append((path.name, str(data["objective"]), path.read_text(encoding="utf-8")))
    if not rows:
        raise FileNotFoundError(f"no recipes (YAML files with an 'objective' key) in {folder}")
    width = max(len(r[0]) for r in rows)
    mwidth = max(len(r[1]) for r in rows)
    columns = shutil.get_terminal_size((160, 24)).columns if sys.stdout.isatty() else 160
    room = max(40, columns - width - mwidth - 4)
    for name, method, text in rows:
        print(f"{name:<{width}}  {method:<{mwidth}}  {recipe_description(text, room)}")
    for problem in broken:
        print(f"skipped {problem}", file=sys.stderr)
    return 0
