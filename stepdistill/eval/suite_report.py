"""The report files of a finished suite run: ``grid.png`` (the same prompts and seeds in every row),
``metrics.png`` (metrics other than FID against steps), and ``report.md`` / ``report.json`` / ``quality.png``
through :func:`~stepdistill.eval.report.write_report`, with the suite's notes (prompts, seeds, what this run
generated and reused)."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from stepdistill.core.outputs import atomic_file
from stepdistill.eval import generate as _gen
from stepdistill.eval.configuration_run import RunStats
from stepdistill.eval.report import steps_axis, write_report
from stepdistill.eval.run_files import uint8_to_float
from stepdistill.eval.suite import Suite

__all__ = ["plot_metrics", "write_suite_report"]


def _atomic_savefig(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def plot_metrics(entries: list[dict], path: Path) -> bool:
    """One panel per metric other than FID (adherence, diversity, CLIP score, HPS) against steps, one series per
    (name, guidance). Returns False (and writes nothing) when no such metric has a value."""
    panels = [(key, label) for key, label in (
        ("adherence", "adherence ↑"), ("adherence_all", "all attributes right ↑"), ("diversity", "diversity"),
        ("clip_score_cosine", "CLIP score (cosine) ↑"), ("hps", "HPS ↑"),
    ) if any(e.get(key) is not None for e in entries)]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    series: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        series[f"{e['name']} (w={e['guidance']:g})"].append(e)
    for ax, (key, label) in zip(axes[0], panels):
        for name, es in series.items():
            es = sorted((e for e in es if e.get(key) is not None), key=lambda e: e["steps"])
            if es:
                marker = "o-" if es[0]["role"] == "teacher" else "*"
                ax.plot([e["steps"] for e in es], [e[key] for e in es], marker, label=name, markersize=8)
        if key == "diversity":
            real = [e.get("diversity_real") for e in entries if e.get("diversity_real") is not None]
            if real:
                ax.axhline(float(np.mean(real)), color="gray", ls="--", lw=1, label="real images")
            label += f" ({entries[0].get('diversity_features') or ''})"
        ax.set(xlabel="sampling steps", title=label)
        steps_axis(ax, [e["steps"] for e in entries])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_savefig(fig, path)
    plt.close(fig)
    return True


def _other_metrics_table(entries: list[dict]) -> str:
    cols = [(k, h, f) for k, h, f in (
        ("clip_score_cosine", "CLIP cos ↑", ".4f"), ("clip_score_100", "CLIP 100·max(cos,0) ↑", ".2f"),
        ("clip_diversity", "CLIP diversity", ".4f"), ("hps", "HPS ↑", ".2f"),
    ) if any(e.get(k) is not None for e in entries)]
    if not cols:
        return ""
    head = "| name | steps | guidance | " + " | ".join(h for _, h, _ in cols) + " |"
    lines = [head, "|" + "|".join(["---"] * (3 + len(cols))) + "|"]
    for e in entries:
        vals = ["—" if e.get(k) is None else format(e[k], f) for k, _, f in cols]
        lines.append(f"| {e['name']} | {e['steps']} | {e['guidance']:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_suite_report(suite: Suite, out: Path, entries: list[dict], grid_rows: list[np.ndarray], grid_idx: list[int],
                       stats: RunStats) -> dict:
    """Write grid.png, metrics.png (when a metric other than FID has values) and report.md/json/quality.png."""
    grid_u8 = np.concatenate(grid_rows)
    side = grid_u8.shape[-1]
    scale = suite.grid_scale or max(1, min(8, 128 // side))
    grid = _gen.image_grid(uint8_to_float(grid_u8), rows=len(grid_rows), cols=len(grid_idx), scale=scale)
    with atomic_file(out / "grid.png") as tmp:
        grid.save(tmp, format="PNG")
    images = {"Samples (rows: configurations; columns: the same prompts and seeds in every row)": "grid.png"}
    if plot_metrics(entries, out / "metrics.png"):
        images["Other metrics against steps"] = "metrics.png"

    spp = suite.samples_per_prompt
    notes = []
    other = _other_metrics_table(entries)
    if other:
        notes += ["## Other metrics", "", other, ""]
    features = sorted({str(e.get("fid_features")) for e in entries if e.get("fid") is not None})
    notes += ["## Notes", ""]
    if features:
        notes.append(f"- The FID column holds the Fréchet distance in the **{', '.join(features)}** feature space"
                     + (" (the toy evaluator's features: FID_toy)" if features == ["toy"] else "") + ".")
    adherence = sorted({str(e.get("adherence_metric")) for e in entries if e.get("adherence") is not None})
    if adherence:
        notes.append(f"- Adherence: {'; '.join(adherence)}.")
    notes.append(f"- Suite file: `{suite.source}`; prompts: `{suite.prompt_source}` ({len(suite.prompts)} prompts × "
                 f"{spp} samples = {suite.num_samples} per configuration); seed of sample j of prompt i = "
                 f"{suite.seed} + i·{spp} + j.")
    if suite.overrides:
        notes.append(f"- **Overridden on the command line: {suite.overrides}** — numbers are not comparable with "
                     "the suite's defaults.")
    notes.append("- NFE = UNet evaluations per image (one per step, two with classifier-free guidance, w > 1). "
                 "Latency: median of timed full pipeline calls after warm-up (text encoder + UNet + VAE decode).")
    notes.append(f"- This run: {stats.generated_images} samples generated, {stats.reused_images} reused from "
                 f"`{out / 'samples'}`, {stats.cached_entries} configuration(s) scored earlier; wall time "
                 f"{time.strftime('%H:%M:%S', time.gmtime(stats.wall_seconds))} ({stats.wall_seconds:.0f} s).")
    notes.append("- Grid columns (prompt, seed): " + "; ".join(
        f"{k + 1}. {suite.prompts[i // spp]!r} (seed {suite.seed + i})" for k, i in enumerate(grid_idx)))
    rows = "; ".join(f"{r + 1}. {e['name']} {e['steps']} steps w={e['guidance']:g}" for r, e in enumerate(entries))
    notes.append(f"- Grid rows: {rows}.")
    return write_report(out, suite.name, entries, extra_md="\n".join(notes), images=images, front=suite.front)
