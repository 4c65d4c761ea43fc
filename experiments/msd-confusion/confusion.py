"""Shape confusion matrices of toy students from the samples `stepdistill eval` saved (toy-quality protocol: the 144
toy prompts in order, 35 samples each; the evaluator's predicted shape against the prompt's shape).

    python experiments/msd-confusion/confusion.py OUT.json NAME=SAMPLES_DIR [NAME=SAMPLES_DIR ...]

SAMPLES_DIR is the ``<out>_samples`` folder of an eval run (``samples/<configuration>/batch-*.npz``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from stepdistill.eval import ToyJudge
from stepdistill.toy import world


def confusion(samples_dir: Path, judge: ToyJudge) -> np.ndarray:
    (config_dir,) = [d for d in (samples_dir / "samples").iterdir() if d.is_dir()]
    images = []
    for batch in sorted(config_dir.glob("batch-*.npz"), key=lambda p: int(p.stem.split("-")[1])):
        with np.load(batch) as data:
            images.append(data["images"])
    u8 = np.concatenate(images)
    prompts = world.all_prompts()
    per = len(u8) // len(prompts)
    truth = np.repeat([world.parse_prompt(p)["shape"] for p in prompts], per)
    pred = judge.analyze(torch.from_numpy(u8).float() / 127.5 - 1)["shape"]
    conf = np.zeros((len(world.SHAPES),) * 2, dtype=int)
    np.add.at(conf, (truth, pred), 1)
    return conf


def main(out: str, entries: list[str]) -> None:
    judge, report, lines = ToyJudge(), {"labels": list(world.SHAPES), "rows": "prompt's shape",
                                        "columns": "evaluator's shape"}, []
    for entry in entries:
        name, folder = entry.split("=", 1)
        conf = confusion(Path(folder), judge)
        report[name] = conf.tolist()
        lines += [f"**{name}** (shape accuracy {np.trace(conf) / conf.sum():.3f})", "",
                  "| prompt \\ read as | " + " | ".join(world.SHAPES) + " |", "|---" * (len(world.SHAPES) + 1) + "|"]
        for i, s in enumerate(world.SHAPES):
            lines.append(f"| {s} | " + " | ".join(f"{v / conf[i].sum():.3f}" for v in conf[i]) + " |")
        lines.append("")
    Path(out).write_text(json.dumps(report, indent=2))
    Path(out).with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
