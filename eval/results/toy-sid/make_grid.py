"""The comparison grid of grid.png: two samples per prompt (seed 100 + prompt index, the same noise in every row) from
the 4-step CFG-3 teacher and the two SiD students. Run from the repository root after distilling both:
``python eval/results/toy-sid/make_grid.py``."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from stepdistill.eval.generate import load_pipeline

PROMPTS = ["a large green cross on a black background", "a small red triangle on a white background",
           "a large yellow square on a white background", "a small blue circle on a gray background",
           "a large purple triangle on a black background", "a small orange cross on a gray background"]
ROWS = [("teacher, 4 steps, CFG 3 (8 NFE)", "toy", 4, 3.0),
        ("4-step SiD student (4 NFE)", "runs/toy-sid-4step/student", 4, 1.0),
        ("1-step SiD-LSG student", "runs/toy-sid/student", 1, 1.0)]
SIDE, SCALE, LABEL_H = 32, 3, 14


def main() -> None:
    strips = []
    for label, path, steps, guidance in ROWS:
        pipe = load_pipeline(path)
        images = []
        for i, prompt in enumerate(PROMPTS):
            generator = torch.Generator().manual_seed(100 + i)
            images += pipe([prompt] * 2, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images
        cell = SIDE * SCALE
        strip = Image.new("RGB", (len(images) * cell, cell + LABEL_H), "white")
        for j, image in enumerate(images):
            strip.paste(image.resize((cell, cell), Image.NEAREST), (j * cell, LABEL_H))
        ImageDraw.Draw(strip).text((2, 1), label, fill="black")
        strips.append(strip)
    grid = Image.new("RGB", (strips[0].width, sum(s.height for s in strips)), "white")
    y = 0
    for strip in strips:
        grid.paste(strip, (0, y))
        y += strip.height
    grid.save("eval/results/toy-sid/grid.png")


if __name__ == "__main__":
    main()
