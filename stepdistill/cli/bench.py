"""`stepdistill bench`: a benchmark suite (eval/*.yaml), resumable, with its report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from stepdistill.eval.report import (
    markdown_table,
    warnings_markdown,
)
from stepdistill.eval.runner import run_suite
from stepdistill.eval.suite import load_suite


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark suite file and write report.json, report.md, quality.png, metrics.png and grid.png."""

    def run() -> int:
        suite = load_suite(args.suite)
        if args.samples_per_prompt is not None or args.max_prompts is not None:
            suite = suite.with_overrides(args.samples_per_prompt, args.max_prompts)
        out = Path(args.out)
        report = run_suite(suite, out)
        print()
        print(markdown_table(report["entries"]))
        warned = warnings_markdown(report["entries"])
        if warned:
            print(f"\n{warned}")
        wall = report["run"]["wall_seconds"]
        print(f"\nwrote {out / 'report.json'}, {out / 'report.md'}, {out / 'quality.png'}, {out / 'grid.png'} "
              f"in {wall:.0f} s ({time.strftime('%H:%M:%S', time.gmtime(wall))})")
        return 0

    return run()
