"""eval/results/toy-few-step/disback.png: FID_toy and adherence of the DMD default (training/toy-dmd.yaml) with and
without DisBack against generator updates, from the stepdistill eval JSONs in that folder (5,040 samples each):
``python experiments/disback-convergence/plot_disback.py``."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "eval" / "results" / "toy-few-step"


def series(prefix: str) -> tuple[list[int], list[float], list[float]]:
    points = []
    for f in sorted(RESULTS.glob(f"{prefix}-[0-9]*.json")):
        entry = json.loads(f.read_text())["entries"][0]
        points.append((int(f.stem.rsplit("-", 1)[1]), entry["fid_toy"], entry["adherence"]))
    points.sort()
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def main() -> None:
    fig, (ax_fid, ax_adh) = plt.subplots(1, 2, figsize=(9, 3.4))
    for prefix, label in (("dmd", "DMD default"), ("dmd-disback", "DMD default + DisBack")):
        steps, fid, adh = series(prefix)
        ax_fid.plot(steps, fid, marker="o", label=label)
        ax_adh.plot(steps, adh, marker="o", label=label)
    for ax in (ax_fid, ax_adh):
        ax.axvline(600, color="gray", lw=0.8, ls="--")
        for switch in (625, 650, 675):  # DisBack's target: psi_3 → psi_2 → psi_1 → the teacher
            ax.axvline(switch, color="tab:orange", lw=0.6, ls=":")
        ax.set_xlabel("generator updates")
    ax_fid.set_ylabel("FID_toy (lower is better)")
    ax_adh.set_ylabel("adherence (higher is better)")
    ax_fid.legend()
    fig.suptitle("600: end of the ODE-pair warm-up (both runs identical); dotted: DisBack target switches "
                 "(psi_3, psi_2, psi_1, then the teacher from 675)", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "disback.png", dpi=120)


if __name__ == "__main__":
    main()
