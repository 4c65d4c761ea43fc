"""A routed four-student folder of *full-size* UNets for the latency comparison with the smaller MSD students: four
copies of one exported full-size one-step student behind the toy's shape router. Latency does not depend on the
weights, so this times what a full-size MSD folder costs per image without retraining one (its samples are not
meaningful as MSD samples: every route runs the same student).

    .venv/bin/python experiments/latency-ab/full_size_routed.py runs/toy-dmd2/student runs/msd-full-size-latency
"""

from __future__ import annotations

import sys
from pathlib import Path

from stepdistill.export import export_multi_student
from stepdistill.models import KeywordRouter


def main(student: str, out: str) -> None:
    router = KeywordRouter(["circle", "square", "triangle", "cross"])
    folders = [Path(student)] * 4
    info = [{"student": k, "prompts": 36, "example_prompt": f"a small red {s} on a gray background"}
            for k, s in enumerate(["circle", "square", "triangle", "cross"])]
    path = export_multi_student(Path(out), router, folders, info)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
