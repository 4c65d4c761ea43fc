"""`stepdistill distill-cost`: steps/s, peak memory and training-state bytes of each recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from stepdistill.eval.distill_cost import markdown_table as cost_table
from stepdistill.eval.distill_cost import run_distill_cost


def cmd_distill_cost(args: argparse.Namespace) -> int:
    def run() -> int:
        report = run_distill_cost(args.pipeline, args.recipes, args.out, steps=args.steps, warmup=args.warmup,
                                  overrides=args.set or (), threads=args.threads)
        print(cost_table(report["entries"]))
        print(f"wrote {Path(args.out) / 'report.md'} and report.json")
        return 0

    return run()
