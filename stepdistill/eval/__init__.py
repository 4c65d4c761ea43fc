"""Metric library: FID (and Fréchet distances on any features), CLIP score, HPSv2, diversity, latency.

The public names below are what scripts outside the package (``experiments/``) may use; everything else is imported
from its submodule (``from stepdistill.eval.fid import frechet_distance``). Optional back-ends (open_clip, hpsv2) are
imported lazily inside the functions that need them and raise :class:`MetricUnavailable` when absent.
"""

from stepdistill.eval.bench import measure_pipeline_latency
from stepdistill.eval.errors import MetricUnavailable

# the function as generate_images: the package attribute `generate` stays the submodule (stepdistill.eval.generate)
from stepdistill.eval.generate import generate as generate_images
from stepdistill.eval.generate import image_grid, sample_seeds
from stepdistill.eval.report import write_report
from stepdistill.eval.toy_metrics import ToyJudge

__all__ = [
    "MetricUnavailable",
    "ToyJudge",
    "generate_images",
    "image_grid",
    "measure_pipeline_latency",
    "sample_seeds",
    "write_report",
]
