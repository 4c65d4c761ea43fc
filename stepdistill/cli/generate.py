"""`stepdistill generate`: an image grid from a diffusers pipeline folder (a teacher, a student, or 'toy')."""

from __future__ import annotations

import argparse
from pathlib import Path

from stepdistill.eval.generate import (
    check_student_call,
    export_info,
    generate,
    image_grid,
    load_pipeline,
    student_call_defaults,
)
from stepdistill.toy.assets import check_toy_vocabulary, is_toy_model


def cmd_generate(args: argparse.Namespace) -> int:
    for name in ("num", "scale"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be ≥ 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {args.steps}")
    if args.guidance is not None and args.guidance < 0:
        raise ValueError(f"--guidance must be ≥ 0 (values ≤ 1 disable classifier-free guidance), got {args.guidance}")
    if Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {args.out}")
    if is_toy_model(args.pipeline):
        check_toy_vocabulary([args.prompt, *([args.negative_prompt] if args.negative_prompt else [])], "--prompt")
    info = export_info(args.pipeline) if args.pipeline != "toy" and Path(args.pipeline).is_dir() else {}
    default_steps, default_guidance = student_call_defaults(info)
    steps = default_steps if args.steps is None else args.steps
    guidance = default_guidance if args.guidance is None else args.guidance
    check_student_call(info, steps, guidance, args.pipeline)  # before loading anything
    pipe = load_pipeline(args.pipeline)
    prompts = [args.prompt] * args.num
    seeds = list(range(args.seed, args.seed + args.num))
    images = generate(pipe, prompts, seeds, steps, guidance, negative_prompt=args.negative_prompt,
                      desc="generate", nasa_alpha=args.nasa_alpha)
    cols = min(args.num, 8)
    rows = (args.num + cols - 1) // cols
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, rows, cols, scale=args.scale).save(out)
    print(f"wrote {out} ({args.num} images, {steps} steps, guidance {guidance:g})")
    return 0
