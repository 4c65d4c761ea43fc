"""`stepdistill export`: a run's student as a diffusers pipeline folder."""

from __future__ import annotations

import argparse

from stepdistill.workflows.distill import export_run


def cmd_export(args: argparse.Namespace) -> int:
    path = export_run(args.run, args.out, args.checkpoint, overwrite=args.overwrite)
    print(f"exported the student to {path}")
    return 0
