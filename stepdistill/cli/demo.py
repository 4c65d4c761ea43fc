"""`stepdistill demo`: the main job on the embedded toy default, with a report under --out
(:mod:`stepdistill.workflows.demo`); this module turns the options into :class:`DemoOptions` and prints."""

from __future__ import annotations

import argparse
from pathlib import Path

from stepdistill.workflows.demo import DemoOptions, DemoProgress, distill_line, run_demo


class _Console(DemoProgress):
    """The demo's console lines."""

    def distilling(self, options: DemoOptions) -> None:
        print(f"[demo] distilling the toy teacher with {options.recipe} into {options.student_dir}", flush=True)

    def distilled(self, options: DemoOptions, summary: dict) -> None:
        print(f"[demo] distillation: {distill_line(summary)}; student exported to {options.student_dir}", flush=True)

    def log(self, message: str) -> None:
        print(message, flush=True)

    def entry(self, entry: dict) -> None:
        lat = entry["latency_ms"]
        print(f"[demo] {entry['name']:>8} {entry['steps']:>2} step(s) w={entry['guidance']:g}: FID_toy "
              f"{entry['fid']:.2f}  adherence {entry['adherence']:.3f}  diversity {entry['diversity']:.4f}  "
              f"latency/img {lat['batchN']:.2f} ms (batch 1: {lat['batch1']:.1f} ms)", flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: distil the toy teacher into a few-step student (unless --skip-distill),
    export it to <out>/student, evaluate teacher (1/4/25 steps with CFG; without CFG at the student's NFE, the
    end-to-end latency ideal) and the student at its own step count with the toy evaluator, and report."""
    options = DemoOptions(
        out=Path(args.out), pipeline=args.pipeline, recipe=args.recipe, teacher=args.teacher, evaluator=args.evaluator,
        guidance=args.guidance, samples_per_prompt=args.samples_per_prompt, max_prompts=args.max_prompts,
        seed=args.seed, latency_batch=args.latency_batch, latency_repeats=args.latency_repeats,
        latency_warmup=args.latency_warmup, skip_distill=args.skip_distill, overwrite=args.overwrite,
    )
    result = run_demo(options, _Console())
    print(f"[demo] wrote {', '.join(str(f) for f in result['files'])} in {result['wall_seconds']:.0f} s")
    return 0
