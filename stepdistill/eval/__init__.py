"""Metric library: FID (and Fréchet distances on any features), CLIP score, HPSv2, diversity, latency.

Submodules are imported explicitly (``from stepdistill.eval.fid import frechet_distance``) so that importing
this package stays cheap; optional back-ends (open_clip, hpsv2) are imported lazily inside the functions that
need them and raise :class:`MetricUnavailable` when absent.
"""

from stepdistill.eval.errors import MetricUnavailable

__all__ = ["MetricUnavailable"]
