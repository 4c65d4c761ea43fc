"""Latency per image of several one-step student folders, measured in one process, alternating A B C A B C … so that
drifts of a shared machine hit every folder alike (the bench's own protocol per call: batch 64, 2 warm-up, 5 timed
repeats, the median; the toy's first prompt).

    .venv/bin/python experiments/latency-ab/latency_ab.py [--rounds N] OUT.json NAME=FOLDER[@STEPS,GUIDANCE] [...]

FOLDER may be ``toy`` (the embedded teacher); STEPS and GUIDANCE default to 1 and 1.0; ``--rounds`` (default 3) is the
number of A B C … rounds.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

from stepdistill.eval import measure_pipeline_latency
from stepdistill.export import load_pipeline
from stepdistill.toy import world


def main(out: str, entries: list[str], rounds: int = 3) -> None:
    torch.set_num_threads(2)
    pipes, calls = {}, {}
    for entry in entries:
        name, spec = entry.split("=", 1)
        folder, _, call = spec.partition("@")
        steps, guidance = (call.split(",") if call else ("1", "1.0"))
        pipes[name], calls[name] = load_pipeline(folder), (int(steps), float(guidance))
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    prompt = world.all_prompts()[0]
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(rounds):
        for name, pipe in pipes.items():
            times[name].append(measure_pipeline_latency(pipe, prompt, *calls[name], batch=64)["batchN"])
    report = {name: {"steps": calls[name][0], "guidance": calls[name][1], "batch64_ms_per_image": [round(t, 2) for t in ts], "median": round(statistics.median(ts), 2)}
              for name, ts in times.items()}
    json.dump({"prompt": prompt, "rounds": rounds, "results": report}, open(out, "w"), indent=2)
    for name, r in report.items():
        print(f"{name}: median {r['median']} ms/img (rounds {r['batch64_ms_per_image']})")


if __name__ == "__main__":
    args = sys.argv[1:]
    rounds = 3
    if args[:1] == ["--rounds"]:
        rounds, args = int(args[1]), args[2:]
    main(args[0], args[1:], rounds=rounds)
