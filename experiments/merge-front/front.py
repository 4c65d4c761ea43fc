"""The merge front from its five `stepdistill eval` JSONs (the toy-quality protocol, 5,040 samples each):
θ(λ) = (1 − λ)·θ_cfg + λ·θ_diverse for λ ∈ {0, 0.25, 0.5, 0.75, 1}; λ = 0 is the CFG-distilled student, λ = 1 the
diversity-rewarded one. Writes report.json, report.md and front.png (stepdistill.eval.report.write_report) to OUT.

    .venv/bin/python experiments/merge-front/front.py OUT lambda=JSON [lambda=JSON ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stepdistill.eval import write_report


def main(out: str, pairs: list[str]) -> None:
    entries = []
    for pair in pairs:
        lam, path = pair.split("=", 1)
        entry = json.loads(Path(path).read_text(encoding="utf-8"))["entries"][0]
        entry["name"] = f"λ={float(lam):g}"
        entries.append(entry)
    report = write_report(out, "merge-front (toy CFG distillation, quality ↔ diversity)", entries)
    for e in report["entries"]:
        print(f"{e['name']}: FID_toy {e['fid']:.1f}  adherence {e['adherence']:.3f}  all {e['adherence_all']:.3f}  "
              f"diversity {e['diversity']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
