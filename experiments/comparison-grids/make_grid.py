"""Comparison grids for the grid.png files under eval/results/: two samples per prompt (seed 100 + prompt index, the same noise in
every row) from each pipeline named on the command line. Run from the repository root after distilling the students:

    python experiments/comparison-grids/make_grid.py --out eval/results/toy-sid/grid.png \\
        "teacher, 4 steps, CFG 3 (8 NFE)=toy:4:3" \\
        "4-step SiD student (4 NFE)=runs/toy-sid-4step/student:4:1" \\
        "1-step SiD-LSG student=runs/toy-sid/student:1:1"

Each row is ``label=pipeline:steps:guidance``; exported students load as ``stepdistill eval`` loads them (their
own scheduler, or their shipped pipeline class).
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image, ImageDraw

from stepdistill.export import load_pipeline, step_kwargs

PROMPTS = ["a large green cross on a black background", "a small red triangle on a white background",
           "a large yellow square on a white background", "a small blue circle on a gray background",
           "a large purple triangle on a black background", "a small orange cross on a gray background"]
SIDE, SCALE, LABEL_H = 32, 3, 14


def parse_row(text: str) -> tuple[str, str, int, float]:
    label, _, spec = text.rpartition("=")
    path, steps, guidance = spec.rsplit(":", 2)
    return label, path, int(steps), float(guidance)


def strip(label: str, path: str, steps: int, guidance: float) -> Image.Image:
    pipe = load_pipeline(path)
    images = []
    for i, prompt in enumerate(PROMPTS):
        generator = torch.Generator().manual_seed(100 + i)
        images += pipe([prompt] * 2, **step_kwargs(pipe, steps), guidance_scale=guidance, generator=generator).images
    cell = SIDE * SCALE
    out = Image.new("RGB", (len(images) * cell, cell + LABEL_H), "white")
    for j, image in enumerate(images):
        out.paste(image.resize((cell, cell), Image.NEAREST), (j * cell, LABEL_H))
    ImageDraw.Draw(out).text((2, 1), label, fill="black")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", help="label=pipeline:steps:guidance")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    strips = [strip(*parse_row(r)) for r in args.rows]
    grid = Image.new("RGB", (strips[0].width, sum(s.height for s in strips)), "white")
    y = 0
    for s in strips:
        grid.paste(s, (0, y))
        y += s.height
    grid.save(args.out)


if __name__ == "__main__":
    main()
