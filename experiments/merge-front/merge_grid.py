"""Pictures of the merge front: the same noise (seeds 0–7) and prompts through θ(λ) for λ ∈ {0, 0.5, 1}, 25 steps, no
CFG — λ = 0 the CFG-distilled student, λ = 1 the diversity-rewarded one.

    .venv/bin/python experiments/merge-front/merge_grid.py OUT.png lambda=FOLDER [lambda=FOLDER ...]
"""

from __future__ import annotations

import sys

import numpy as np

from stepdistill.eval import generate_images, image_grid
from stepdistill.export import load_pipeline

PROMPTS = ["a small red square on a white background", "a large blue triangle on a gray background",
           "a large green cross on a black background"]
SEEDS = list(range(8))


def main(out: str, pairs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), len(PROMPTS), figsize=(4.2 * len(PROMPTS), 1.0 + 0.75 * len(pairs)),
                             squeeze=False)
    for r, pair in enumerate(pairs):
        lam, folder = pair.split("=", 1)
        pipe = load_pipeline(folder)
        for c, prompt in enumerate(PROMPTS):
            images = generate_images(pipe, [prompt] * len(SEEDS), SEEDS, 25, 1.0, desc=f"λ={lam}")
            axes[r][c].imshow(np.asarray(image_grid(images, 1, len(SEEDS), scale=2)))
            axes[r][c].set_xticks([]), axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(prompt, fontsize=8)
            if c == 0:
                axes[r][c].set_ylabel(f"λ = {lam}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
