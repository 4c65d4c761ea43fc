"""`stepdistill gpu-scale`: the gpu-scale benchmark (:mod:`stepdistill.eval.gpu_scale`), through the command line's
quiet, one-line-error entry point; every option after the subcommand is the benchmark's own."""

from __future__ import annotations

import argparse

from stepdistill.eval.gpu_scale import main


def cmd_gpu_scale(args: argparse.Namespace) -> int:
    return main(list(args.options), prog="stepdistill gpu-scale")
