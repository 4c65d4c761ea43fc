"""`stepdistill merge`: interpolate two students' weights, or sweep λ."""

from __future__ import annotations

import argparse
from pathlib import Path

from stepdistill.cli.parser import finite_float
from stepdistill.export.merge import merge_students, merge_sweep


def cmd_merge(args: argparse.Namespace) -> int:
    if (args.alpha is None) == (args.sweep is None):
        raise ValueError("give exactly one of --alpha λ or --sweep λ1,λ2,...")
    if args.alpha is not None:
        path = merge_students(args.a, args.b, args.alpha, args.out, overwrite=args.overwrite)
        print(f"wrote the merged student (λ = {args.alpha}) to {path}")
        return 0
    try:
        alphas = [finite_float(x) for x in args.sweep.split(",") if x.strip()]
    except argparse.ArgumentTypeError:
        raise ValueError(f"--sweep takes comma-separated finite numbers, got {args.sweep!r}") from None
    template = args.suite if args.suite else ("eval/toy-students.yaml" if Path("eval/toy-students.yaml").is_file()
                                              else None)
    result = merge_sweep(args.a, args.b, alphas, args.out, suite_template=template, overwrite=args.overwrite)
    print(f"wrote {len(result['folders'])} merged students under {args.out}; score the front with\n"
          f"  stepdistill bench --suite {result['suite']} --out {Path(args.out) / 'bench'}")
    return 0
