"""`stepdistill demo`: the main job on the embedded toy default, with a report under --out."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from stepdistill.cli.distill import _distill_line
from stepdistill.eval.bench import evaluate_configuration
from stepdistill.eval.generate import (
    export_info,
    generate,
    image_grid,
    load_pipeline,
    sample_seeds,
)
from stepdistill.eval.report import (
    write_report,
)
from stepdistill.eval.toy_metrics import ToyJudge
from stepdistill.toy import world
from stepdistill.workflows.distill import distill, export_run

# Teacher steps with the demo's CFG scale. 50 steps (41.7 / 0.976 against 25 steps' 42.5 / 0.975 in the demo) would
# add about 4 minutes on 2 CPU cores and push the demo past its 10-minute budget.
DEMO_TEACHER_STEPS = (1, 4, 25)

def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: distil the toy teacher into a few-step student (unless --skip-distill),
    export it to <out>/student, evaluate teacher (1/4/25 steps with CFG; without CFG at the student's NFE, the
    end-to-end latency ideal) and the student at its own step count with the toy evaluator, and report."""
    import torch

    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError(f"--max-prompts must be ≥ 1, got {args.max_prompts}")
    if args.samples_per_prompt < 2:
        raise ValueError(f"--samples-per-prompt must be ≥ 2 (diversity compares samples of one prompt), got "
                         f"{args.samples_per_prompt}")
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    student_dir = out / "student"
    distill_summary = None
    if not args.skip_distill:
        print(f"[demo] distilling the toy teacher with {args.recipe} into {student_dir}", flush=True)
        distill_summary = distill(args.pipeline, args.recipe, out / "run", resume=None if args.overwrite else "latest",
                                  export=False, overwrite=args.overwrite)
        export_run(out / "run", student_dir)
        print(f"[demo] distillation: {_distill_line(distill_summary)}; student exported to {student_dir}", flush=True)

    teacher_pipe = load_pipeline(args.teacher)
    judge = ToyJudge(args.evaluator)
    prompts = world.all_prompts()
    if args.max_prompts is not None:  # an even spread over the 144 prompts (a quick look, not the benchmark)
        prompts = prompts[:: max(1, len(prompts) // args.max_prompts)][: args.max_prompts]
    entries = []
    grid_prompts = [  # every shape twice, six colours, both sizes, all backgrounds
        world.make_prompt(world.SHAPES[i % 4], tuple(world.COLORS)[(i * 5) % 6], tuple(world.SIZES)[(i // 2) % 2],
                          tuple(world.BACKGROUNDS)[i % 3])
        for i in range(8)
    ]
    grid_seeds = sample_seeds(len(grid_prompts), 1, 10_000)
    grid_rows, row_names = [], []

    def run(pipe, name, role, steps, guidance):
        entry, _ = evaluate_configuration(pipe, judge, name, role, steps, guidance, prompts, args.samples_per_prompt,
                                          seed=args.seed, latency_batch=args.latency_batch,
                                          latency_repeats=args.latency_repeats, latency_warmup=args.latency_warmup)
        entries.append(entry)
        print(f"[demo] {name:>8} {steps:>2} step(s) w={guidance:g}: FID_toy {entry['fid']:.2f}  adherence "
              f"{entry['adherence']:.3f}  diversity {entry['diversity']:.4f}  latency/img "
              f"{entry['latency_ms']['batchN']:.2f} ms (batch 1: {entry['latency_ms']['batch1']:.1f} ms)", flush=True)
        grid_rows.append(generate(pipe, grid_prompts, grid_seeds, steps, guidance, progress=False))
        row_names.append(f"{name} {steps} step(s), w={guidance:g}")

    student_info = export_info(student_dir) if student_dir.is_dir() else {}
    student_steps = len(student_info.get("timesteps", ())) or 1
    run(teacher_pipe, "teacher", "teacher", student_steps, 1.0)
    for steps in DEMO_TEACHER_STEPS:
        run(teacher_pipe, "teacher", "teacher", steps, args.guidance)
    if student_dir.is_dir():
        run(load_pipeline(student_dir), student_info.get("method", "student"), "student", student_steps, 1.0)
    grid = image_grid(torch.cat(grid_rows), rows=len(grid_rows), cols=len(grid_prompts), scale=4)
    grid.save(out / "grid.png")
    legend = ("Grid rows, top to bottom: " + "; ".join(row_names) + ".\n\nGrid prompts, left to right: "
              + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(grid_prompts)))
    extra = legend
    if distill_summary is not None:
        extra += f"\n\nDistillation ({args.recipe}): {_distill_line(distill_summary)}."
    extra += f"\n\nTotal demo wall time: {time.time() - t_start:.0f} s."
    write_report(out, "toy-demo", entries, extra_md=extra, images={"Samples (same prompts and seeds in every row)": "grid.png"})
    print(f"[demo] wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'grid.png'} in {time.time() - t_start:.0f} s")
    return 0
