"""`stepdistill league`: every method distilled under one budget of training FLOPs and judged at fractions of it on a
held-out seed (:mod:`stepdistill.workflows.league`)."""

from __future__ import annotations

import argparse

from stepdistill.workflows.league import run_league


def cmd_league(args: argparse.Namespace) -> int:
    result = run_league(args.suite, args.out, budget_name=args.budget, only=args.only, workers=args.workers)
    print(open(f"{args.out}/tables.md", encoding="utf-8").read())
    print(f"{len(result['rows'])} rows under {args.out}")
    if result["failed"]:
        print("failed entries (run the same command again to retry them): " + ", ".join(result["failed"]))
        return 1
    return 0
