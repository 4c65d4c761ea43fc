"""Reading the project's YAML files (recipes, pipeline presets, suites, ``--set`` overrides) the same way everywhere.

Two differences from ``yaml.safe_load``:

- numbers follow YAML 1.2: ``1e-3``, ``3E5`` and ``-2.5e+4`` are floats (PyYAML's YAML 1.1 resolver reads a mantissa
  without a dot, such as ``1e-3``, as a *string*, so ``lr: 1e-3`` would be refused as "not a number" while
  ``lr: 1.0e-3`` was accepted);
- a syntax error names the file, line and column (``recipe.yaml:4:7: ...``) instead of PyYAML's ``"<unicode
  string>"`` for text read from disk.

Non-finite values (``.nan``, ``.inf``) still parse as floats; the validators that read them refuse them where infinity
or NaN means nothing (:func:`stepdistill.core.validation.is_finite_number`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["YAMLFileError", "Loader", "load_yaml_file", "parse_yaml_value"]

#: YAML 1.2 core-schema floats (plus the ``.inf`` / ``.nan`` forms PyYAML already knows)
_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:\d[\d_]*\.[\d_]*|\.\d[\d_]*)(?:[eE][-+]?\d+)?
        |[-+]?\d[\d_]*[eE][-+]?\d+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose float resolver is YAML 1.2's (see the module docstring)."""


Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
                                  for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


class YAMLFileError(ValueError):
    """A YAML file (or override value) that does not parse; the message names where."""


def _describe(err: yaml.YAMLError, where: str) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    text = f"{problem} ({context})" if context else str(problem)
    if mark is not None:
        return f"{where}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {text}"
    return f"{where}: not valid YAML: {text}"


def load_yaml_file(path: str | Path) -> Any:
    """The document in ``path`` (None for an empty file); :class:`YAMLFileError` naming ``path:line:column`` when
    it does not parse, FileNotFoundError when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found" if not path.exists() else f"{path} is not a file")
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader
    except yaml.YAMLError as err:
        raise YAMLFileError(_describe(err, str(path))) from None


def parse_yaml_value(text: str, where: str = "value") -> Any:
    """One scalar or flow value written on the command line (``--set key=VALUE``), parsed as in a file."""
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader
    except yaml.YAMLError as err:
        raise YAMLFileError(_describe(err, where)) from None
