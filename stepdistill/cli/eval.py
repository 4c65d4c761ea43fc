"""`stepdistill eval`: one pipeline, one prompt set, one (steps, guidance) -> a JSON file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stepdistill.core.outputs import write_text_atomic
from stepdistill.eval.report import (
    markdown_table,
    warnings_markdown,
)
from stepdistill.eval.runner import run_suite
from stepdistill.eval.suite import suite_from_dict


def cmd_eval(args: argparse.Namespace) -> int:
    """One pipeline, one prompt set, one (steps, guidance): the bench engine with a single entry -> a JSON file."""

    def run() -> int:
        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give the JSON file to write, e.g. {out / 'eval.json'}")
        if out.suffix.lower() != ".json":
            raise ValueError(f"--out must name a .json file, got {out}")

        data: dict = {
            "suite": args.name if args.suite_name is None else args.suite_name,
            "metrics": args.metrics,
            "prompts": args.prompts,
            "samples_per_prompt": args.samples_per_prompt,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "latency": {"batch": args.latency_batch, "repeats": args.latency_repeats, "warmup": args.latency_warmup}
            if args.latency_batch > 0 else False,
            "entries": [{"name": args.name, "role": args.role, "pipeline": args.pipeline, "steps": args.steps,
                         "guidance": args.guidance, "scheduler": args.scheduler,
                         "negative_prompt": args.negative_prompt}],
        }
        optional = {
            "max_prompts": args.max_prompts, "resolution": args.resolution, "device": args.device,
            "dtype": args.dtype, "toy_evaluator": args.toy_evaluator, "toy_reference_size": args.toy_reference_size,
            "inception": args.inception, "reference_images": args.reference_images,
            "reference_stats": args.reference_stats, "fid_resize": args.fid_resize, "clip_model": args.clip_model,
            "clip_backend": args.clip_backend, "clip_arch": args.clip_arch, "hps_checkpoint": args.hps_checkpoint,
            "hps_version": args.hps_version,
        }
        data.update({k: v for k, v in optional.items() if v is not None})
        suite = suite_from_dict(data, base_dir=Path.cwd(), source="the eval options")
        work = Path(args.work_dir) if args.work_dir else out.parent / f"{out.stem}_samples"
        report = run_suite(suite, work, write_files=False)
        write_text_atomic(out, json.dumps(report, indent=2))
        print(markdown_table(report["entries"]))
        warned = warnings_markdown(report["entries"])
        if warned:
            print(f"\n{warned}")
        print(f"wrote {out} (samples under {work}) in {report['run']['wall_seconds']:.0f} s")
        return 0

    return run()
