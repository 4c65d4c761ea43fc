"""Does NASA (SNOOPI's negative-away steer attention) steer a one-step toy student away from what a negative prompt
names? A measurement that can fail, on the toy evaluator:

1. calibration (seeds 100000+, 8 per prompt, no negative): the student's shape and colour confusion matrices; for each
   true shape (colour) the wrong shape (colour) it produces most often;
2. negatives: every prompt with its shape (colour) replaced by that most-confused one, e.g. "a small red cross on a
   gray background" → negative "a small red square on a gray background";
3. measurement (seeds 0+, 16 per prompt, all 144 prompts): with no negative, then NASA at several α: the rate at which
   the evaluator reads the *negative's* attribute (should fall), that attribute's accuracy, the other attributes'
   adherence (should hold) and FID_toy on these 2,304 samples (comparable across rows only: fewer samples than the
   5,040-sample protocol).

    python experiments/nasa/measure_nasa.py runs/toy-pgsb/student eval/results/snoopi/nasa.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stepdistill.eval import ToyJudge, generate_images, sample_seeds
from stepdistill.export import load_pipeline
from stepdistill.toy import world

ALPHAS = (0.05, 0.1, 0.2, 0.4)
ATTRS = {"shape": world.SHAPES, "color": tuple(world.COLORS)}


def _with(prompt: str, attr: str, value: str) -> str:
    parsed = world.parse_prompt(prompt)
    parts = {name: world.DISCRETE_ATTRIBUTES[name][parsed[name]] for name in world.DISCRETE_ATTRIBUTES}
    parts[attr] = value
    return world.make_prompt(parts["shape"], parts["color"], parts["size"], parts["background"])


def main(student: str, out: str) -> None:
    torch.set_num_threads(2)
    pipe, judge = load_pipeline(student), ToyJudge()
    steps = len(json.loads((Path(student) / "stepdistill_export.json").read_text())["timesteps"])
    prompts = world.all_prompts()
    truth = {a: np.array([world.parse_prompt(p)[a] for p in prompts]) for a in world.DISCRETE_ATTRIBUTES}

    def run(n_per: int, base_seed: int, negatives=None, alpha=None):
        ps = [p for p in prompts for _ in range(n_per)]
        negs = None if negatives is None else [n for n in negatives for _ in range(n_per)]
        imgs = generate_images(pipe, ps, sample_seeds(len(prompts), n_per, base_seed), steps, 1.0, batch_size=288,
                        negative_prompt=negs, nasa_alpha=alpha, progress=False)
        return ps, imgs, judge.analyze(imgs)

    report: dict = {"student": student, "steps": steps, "alphas": list(ALPHAS), "experiments": {}}
    t0 = time.time()
    _, _, calib = run(8, 100_000)
    for attr, values in ATTRS.items():
        true = np.repeat(truth[attr], 8)
        conf = np.zeros((len(values), len(values)), dtype=int)
        np.add.at(conf, (true, calib[attr]), 1)
        wrong = conf.copy()
        np.fill_diagonal(wrong, -1)
        confused = {values[i]: values[int(wrong[i].argmax())] for i in range(len(values))}
        negatives = [_with(p, attr, confused[values[truth[attr][k]]]) for k, p in enumerate(prompts)]
        neg_index = np.repeat([values.index(confused[values[t]]) for t in truth[attr]], 16)
        rows = []
        for alpha in (None, *ALPHAS):
            ps, imgs, pred = run(16, 0, None if alpha is None else negatives, alpha)
            score = judge.score(imgs, ps)
            true16 = np.repeat(truth[attr], 16)
            rows.append({
                "nasa_alpha": alpha, "negative_rate": float(np.mean(pred[attr] == neg_index)),
                "accuracy": float(np.mean(pred[attr] == true16)),
                "other_adherence": float(np.mean([score["adherence_per_attribute"][a]
                                                  for a in world.DISCRETE_ATTRIBUTES if a != attr])),
                "adherence": score["adherence"], "adherence_all": score["adherence_all"], "fid": score["fid"],
                "diversity": score["diversity"]})
            print(attr, rows[-1], flush=True)
        report["experiments"][attr] = {"confusion_calibration": conf.tolist(), "labels": list(values),
                                       "most_confused": confused, "rows": rows}
    report["seconds"] = round(time.time() - t0, 1)
    Path(out).write_text(json.dumps(report, indent=2))
    lines = ["| negative names | NASA α | rate of the negative's attribute ↓ | its accuracy ↑ | other attributes ↑ | "
             "all-correct | FID_toy (2,304) |", "|---|---|---|---|---|---|---|"]
    for attr, exp in report["experiments"].items():
        for r in exp["rows"]:
            a = "no negative" if r["nasa_alpha"] is None else f"{r['nasa_alpha']:g}"
            lines.append(f"| most-confused {attr} | {a} | {r['negative_rate']:.3f} | {r['accuracy']:.3f} | "
                         f"{r['other_adherence']:.3f} | {r['adherence_all']:.3f} | {r['fid']:.1f} |")
    Path(out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
