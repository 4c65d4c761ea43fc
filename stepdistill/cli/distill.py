"""`stepdistill distill`: distil a teacher into a student with a recipe, and its --dry-run plan."""

from __future__ import annotations

import argparse
import json

from stepdistill.workflows.distill import distill


def cmd_distill(args: argparse.Namespace) -> int:
    summary = distill(args.pipeline, args.recipe, args.out, overrides=args.set or (), resume=args.resume,
                      export=not args.no_export, overwrite=args.overwrite,
                      allow_config_change=args.allow_config_change, dry_run=args.dry_run)
    if args.dry_run and summary.get("multi_student"):
        import yaml

        print("# stepdistill distill --dry-run (multi-student recipe): nothing was loaded or written")
        for s in summary["students"]:
            print(f"# student {s['student']} of {s['of']} ({s['folder']}): {s['status']}"
                  + (f", {s['why']}" if s["why"] else "") + f"; prompts: {s['prompts']}")
        print(yaml.safe_dump({"router": summary["router"], **summary["config"]}, sort_keys=False).rstrip())
        return 0
    if args.dry_run:
        import yaml

        print(f"# stepdistill distill --dry-run: nothing was loaded or written. Run fingerprint {summary['fingerprint']}")
        if summary["resume_from"]:
            print(f"# would resume from {summary['resume_from']} (step {summary['start_step']})")
        else:
            print(f"# would start a fresh run in {summary['out']}")
        for note in summary["notes"]:
            print(f"# {note}")
        print(yaml.safe_dump({"pipeline": summary["pipeline"], **summary["config"]}, sort_keys=False).rstrip())
        return 0
    print(json.dumps({k: summary[k] for k in ("steps", "wall_time_s", "steps_per_s", "student") if k in summary},
                     indent=2, default=str))
    return 0
