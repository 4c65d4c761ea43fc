"""Workflows: distill, multi-student distillation, the league and the demo, composing the layers below."""

from stepdistill.workflows.league import load_league, run_league

__all__ = ["load_league", "run_league"]
