"""Distillation objectives behind one interface (:class:`~stepdistill.objectives.base.Objective`).

``build_objective(name, teacher, generator, config)`` builds one by name from :data:`OBJECTIVES`; ``config`` is
validated against the objective's ``DEFAULTS`` (an unknown key is a ValueError naming it and the allowed keys).
"""

from __future__ import annotations

from typing import Any, Mapping

from stepdistill.objectives.base import (  # noqa: F401
    Batch,
    Objective,
    ObjectiveConfigError,
    RealImages,
    RegressionPairs,
    Requirements,
    UpdatePlan,
    resolve_config,
)
from stepdistill.objectives.cfg_distill import CFGDistill
from stepdistill.objectives.dmd import DMD
from stepdistill.objectives.dmd2 import DMD2
from stepdistill.objectives.lcm import LCM
from stepdistill.objectives.phased_dmd import PhasedDMD
from stepdistill.objectives.regression import make_regression_pairs
from stepdistill.objectives.sid import SiD
from stepdistill.objectives.tcd import TCD
from stepdistill.objectives.vsd import VSD

OBJECTIVES: dict[str, type[Objective]] = {
    "cfg_distill": CFGDistill,
    "dmd": DMD,
    "dmd2": DMD2,
    "lcm": LCM,
    "phased_dmd": PhasedDMD,
    "sid": SiD,
    "tcd": TCD,
    "vsd": VSD,
}


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def check_objective_config(name: str, config: Mapping[str, Any] | None, num_train_timesteps: int = 1000) -> dict[str, Any]:
    """Validate ``config`` for objective ``name`` without building anything; returns the resolved config.
    Raises :class:`ObjectiveConfigError` (naming the key) or ValueError (unknown objective)."""
    return objective_class(name).check_config(config, num_train_timesteps)


def build_objective(name: str, teacher, generator, config: Mapping[str, Any] | None = None) -> Objective:
    """The objective ``name`` for ``teacher``/``generator`` with ``config`` (keys of its ``DEFAULTS``)."""
    cls = objective_class(name)
    cls.check_config(config, teacher.schedule.num_train_timesteps)  # fail before building any network
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
    "check_objective_config",
    "ObjectiveConfigError",
    "objective_defaults",
    "DMD",
    "DMD2",
    "LCM",
    "TCD",
    "PhasedDMD",
    "SiD",
    "VSD",
    "RealImages",
    "RegressionPairs",
    "Requirements",
    "UpdatePlan",
    "make_regression_pairs",
]
