"""Distillation objectives behind one interface (:class:`~stepdistill.objectives.base.Objective`).

``build_objective(name, teacher, generator, config)`` builds one by name from :data:`OBJECTIVES`; ``config`` is
validated against the objective's ``DEFAULTS`` (an unknown key is a ValueError naming it and the allowed keys).
"""

from __future__ import annotations

from typing import Any, Mapping

from stepdistill.objectives.base import Batch, Objective, resolve_config
from stepdistill.objectives.dmd import DMD, RegressionPairs, make_regression_pairs
from stepdistill.objectives.dmd2 import DMD2
from stepdistill.objectives.vsd import VSD

OBJECTIVES: dict[str, type[Objective]] = {
    "dmd": DMD,
    "dmd2": DMD2,
    "vsd": VSD,
}


def build_objective(name: str, teacher, generator, config: Mapping[str, Any] | None = None) -> Objective:
    """The objective ``name`` for ``teacher``/``generator`` with ``config`` (keys of its ``DEFAULTS``)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    resolve_config(name, cls.DEFAULTS, config)  # fail on unknown keys before building any network
    return cls(teacher, generator, dict(config or {}))


def objective_defaults(name: str) -> dict[str, Any]:
    """A copy of the default config of objective ``name``."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}")
    return dict(OBJECTIVES[name].DEFAULTS)


__all__ = [
    "Batch",
    "Objective",
    "OBJECTIVES",
    "build_objective",
    "objective_defaults",
    "DMD",
    "DMD2",
    "VSD",
    "RegressionPairs",
    "make_regression_pairs",
]
