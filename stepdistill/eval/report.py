"""The report format (eval/README.md): report.json, report.md, a quality-vs-steps/latency plot.

``report.json`` = ``{"suite", "device", "entries": [...]}``; each entry has at least ``name``, ``role``, ``steps``,
``guidance``, ``nfe``, ``fid``, ``fid_features``, ``adherence``, ``diversity``, ``latency_ms``
(``{"batch1", "batchN", "n"}``) and ``num_samples``. Files are written atomically.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from stepdistill.core.outputs import atomic_file, write_text_atomic

REQUIRED_KEYS = ("name", "role", "steps", "guidance", "nfe", "fid", "fid_features", "adherence", "diversity",
                 "latency_ms", "num_samples")


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def nfe(steps: int, guidance: float, guidance_embedded: bool = False) -> int:
    """UNet evaluations per image: one per step, two when classifier-free guidance is on (w > 1) — except for a
    student that embeds the guidance scale (an LCM student's guidance embedding: no CFG pass)."""
    return steps * (2 if guidance > 1.0 and not guidance_embedded else 1)


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


#: below this many samples a Fréchet distance carries a warning (its bias and spread grow as the sample shrinks)
FID_MIN_SAMPLES = 2000


def measurement_warnings(entry: dict) -> list[str]:
    """What makes an entry's figures weak: FID from fewer than :data:`FID_MIN_SAMPLES` samples, a latency from a
    single timed call."""
    out = []
    n = entry.get("num_samples") or 0
    if entry.get("fid") is not None and n < FID_MIN_SAMPLES:
        out.append(f"FID from {n} samples: biased upward and noisy at this size (the toy-quality protocol uses 5,040); "
                   "compare it only with figures from the same number of samples")
    lat = entry.get("latency_ms") or {}
    if lat and int(lat.get("repeats") or 0) == 1:
        out.append("latency from one timed call: no spread to judge its noise (use 3 or more repeats)")
    return out


def warnings_markdown(entries: list[dict]) -> str:
    """A "Warnings" list naming each entry's :func:`measurement_warnings` ("" when there are none)."""
    rows = [f"- {e['name']} ({e['steps']} step{'s' if e['steps'] != 1 else ''}, w={e['guidance']:g}): {w}"
            for e in entries for w in measurement_warnings(e)]
    return "" if not rows else "\n".join(["**Warnings**", "", *rows])


def _spread_text(lat: dict) -> str:
    spread = lat.get("batchN_spread")
    return "" if spread is None else f" ±{50 * spread:.0f}%"


def markdown_table(entries: list[dict]) -> str:
    features = entries[0].get("fid_features", "toy") if entries else "toy"
    fid_name = "FID_toy" if features == "toy" else f"FID ({features})"
    head = (f"| name | role | steps | guidance | NFE | {fid_name} ↓ | adherence ↑ | all-correct ↑ | diversity | coverage (x/y/r) "
            "| latency b1 (ms) | latency/img bN (ms) | samples |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for e in entries:
        cov = e.get("coverage") or {}
        cov_s = "/".join(f"{cov[k]:.2f}" for k in ("x", "y", "radius") if k in cov) or "—"
        lat = e.get("latency_ms") or {}
        lines.append(
            f"| {e['name']} | {e['role']} | {e['steps']} | {e['guidance']:g} | {e['nfe']} | {_fmt(e.get('fid'), '.2f')} "
            f"| {_fmt(e.get('adherence'), '.3f')} | {_fmt(e.get('adherence_all'), '.3f')} | {_fmt(e.get('diversity'), '.4f')} "
            f"| {cov_s} | {_fmt(lat.get('batch1'), '.1f')} | {_fmt(lat.get('batchN'), '.2f')}{_spread_text(lat)} "
            f"(n={lat.get('n', '—')}) "
            f"| {e['num_samples']} |"
        )
    return "\n".join(lines)


#: a speed-up whose timed repeats spread by more than this (max − min over median) is marked unreliable
SPREAD_LIMIT = 0.10


def _spread_range(e: dict) -> tuple[float, float] | None:
    """(min, max) per-image time of an entry's large-batch repeats, when they were recorded."""
    times = (e.get("latency_ms") or {}).get("batchN_times")
    return (min(times), max(times)) if times else None


def latency_warnings(student: dict, reference: dict, same_nfe: dict | None) -> list[str]:
    """Why a measured speed-up cannot be trusted (empty when nothing says so):

    - the timed repeats of the student or of the reference teacher spread by more than :data:`SPREAD_LIMIT`;
    - a physical inconsistency: the teacher at the student's NFE (e.g. 1 step without CFG) runs the same networks as
      a same-architecture one-step student, so their times must agree within their repeats' spread; when the gap is
      larger, the machine's load changed between the two measurements."""
    out = []
    for who, e in (("student", student), ("reference teacher", reference)):
        spread = (e.get("latency_ms") or {}).get("batchN_spread")
        if spread is not None and spread > SPREAD_LIMIT:
            out.append(f"the {who}'s repeats spread by {100 * spread:.0f}% (> {100 * SPREAD_LIMIT:.0f}%)")
    if same_nfe is not None and same_nfe is not student:
        a, b = _spread_range(student), _spread_range(same_nfe)
        ts = (student.get("latency_ms") or {}).get("batchN")
        tt = (same_nfe.get("latency_ms") or {}).get("batchN")
        if a and b and ts and tt:
            tolerance = (a[1] - a[0]) + (b[1] - b[0]) + 0.02 * max(ts, tt)
            if abs(ts - tt) > tolerance:
                out.append(f"the teacher at the student's NFE ({same_nfe['steps']} step(s), w={same_nfe['guidance']:g}) "
                           f"timed {tt:.2f} ms/img and the student {ts:.2f} ms/img: a gap of {abs(ts - tt):.2f} ms beyond "
                           f"their repeats' spread ({tolerance:.2f} ms), though both run the same networks")
    return out


def speedups(entries: list[dict]) -> list[dict]:
    """Each student's latency speed-up over the slowest teacher entry (the 50-step CFG teacher in our suites).

    ``measured = T_teacher / T_student`` (per image at the large batch). Two ideals: ``nfe_ratio`` =
    NFE_teacher / NFE_student (what a pipeline whose every cost scales with the UNet calls would reach), and
    ``end_to_end`` = T_teacher / T_teacher_at_student_nfe, measured on a teacher entry with the student's NFE (e.g. the
    teacher at 1 step without CFG): the best a student can do when the text encoder and the VAE decode, which run once
    per image in both pipelines, are counted. ``measured / ideal`` is reported for both (None where no such entry)."""

    def lat(e: dict) -> float | None:
        return (e.get("latency_ms") or {}).get("batchN")

    teachers = [e for e in entries if e["role"] == "teacher" and lat(e)]
    if not teachers:
        return []
    ref = _reference_teacher(teachers)
    rows = []
    for e in entries:
        if e["role"] != "student" or not lat(e):
            continue
        same_nfe = [t for t in teachers if t["nfe"] == e["nfe"]]
        measured = lat(ref) / lat(e)
        nfe_ratio = ref["nfe"] / e["nfe"]
        end_to_end = lat(ref) / lat(same_nfe[0]) if same_nfe else None
        warnings = latency_warnings(e, ref, same_nfe[0] if same_nfe else None)
        rows.append({
            "name": e["name"], "steps": e["steps"], "reference": f"teacher {ref['steps']} steps, w={ref['guidance']:g}",
            "measured": measured, "nfe_ratio": nfe_ratio, "of_nfe_ratio": measured / nfe_ratio,
            "end_to_end_ideal": end_to_end, "of_end_to_end_ideal": measured / end_to_end if end_to_end else None,
            "reliable": not warnings, "unreliable_because": warnings,
        })
    return rows


def speedup_table(rows: list[dict]) -> str:
    lines = ["| student | steps | vs | measured speed-up | ideal: NFE ratio (share reached) "
             "| ideal: end to end (share reached) | trustworthy? |", "|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        e2e = "—" if r["end_to_end_ideal"] is None else f"{r['end_to_end_ideal']:.1f}× ({r['of_end_to_end_ideal']:.2f})"
        trust = "yes"
        if r.get("unreliable_because"):
            notes.append(f"- **{r['name']} ({r['steps']} step(s)): unreliable** — " + "; ".join(r["unreliable_because"])
                         + ". Re-measure on an idle machine (`stepdistill bench` re-times every entry).")
            trust = "**no** (see below)"
        elif "reliable" not in r:
            trust = "—"
        lines.append(f"| {r['name']} | {r['steps']} | {r['reference']} | {r['measured']:.1f}× "
                     f"| {r['nfe_ratio']:.0f}× ({r['of_nfe_ratio']:.2f}) | {e2e} | {trust} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def _reference_teacher(entries: list[dict]) -> dict | None:
    """The teacher entry students are compared with: the one with the most NFE (then the slowest)."""
    teachers = [e for e in entries if e["role"] == "teacher"]
    if not teachers:
        return None
    return max(teachers, key=lambda e: (e["nfe"], (e.get("latency_ms") or {}).get("batchN") or 0.0))


def quality_gaps(entries: list[dict]) -> list[dict]:
    """Each student's quality against the reference teacher (most NFE: the 50-step CFG teacher in our suites).

    ``fid_gap = FID_student - FID_teacher`` (negative: the student beats its teacher), ``adherence_gap_points =
    100 (adherence_teacher - adherence_student)`` (positive: the student follows prompts less well) and
    ``diversity_ratio = diversity_student / diversity_teacher``. A metric either entry lacks gives None."""
    ref = _reference_teacher(entries)
    if ref is None:
        return []

    def diff(a: Any, b: Any, scale: float = 1.0) -> float | None:
        return None if a is None or b is None else scale * (a - b)

    rows = []
    for e in entries:
        if e["role"] != "student":
            continue
        div_s, div_t = e.get("diversity"), ref.get("diversity")
        rows.append({
            "name": e["name"], "steps": e["steps"], "reference": f"teacher {ref['steps']} steps, w={ref['guidance']:g}",
            "fid": e.get("fid"), "teacher_fid": ref.get("fid"), "fid_gap": diff(e.get("fid"), ref.get("fid")),
            "adherence": e.get("adherence"), "teacher_adherence": ref.get("adherence"),
            "adherence_gap_points": diff(ref.get("adherence"), e.get("adherence"), 100.0),
            "diversity_ratio": div_s / div_t if div_s is not None and div_t else None,
        })
    return rows


def quality_gap_table(rows: list[dict]) -> str:
    lines = ["| student | steps | vs | FID (teacher) | FID gap | adherence (teacher) | adherence gap, points "
             "| diversity / teacher's |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['steps']} | {r['reference']} | {_fmt(r['fid'], '.2f')} "
                     f"({_fmt(r['teacher_fid'], '.2f')}) | {_fmt(r['fid_gap'], '+.2f')} | {_fmt(r['adherence'], '.3f')} "
                     f"({_fmt(r['teacher_adherence'], '.3f')}) | {_fmt(r['adherence_gap_points'], '+.1f')} "
                     f"| {_fmt(r['diversity_ratio'], '.2f')} |")
    return "\n".join(lines)


def _save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically (a temporary file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def steps_axis(ax, steps) -> None:
    """A log x axis labelled only at the step counts plotted, as plain integers (no 2×10⁰ minor labels, which
    overlap on short ranges)."""
    from matplotlib.ticker import FixedLocator, NullLocator, StrMethodFormatter

    ticks = sorted({int(s) for s in steps})
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)


def plain_log_axis(ax) -> None:
    """A log x axis labelled at 1, 2 and 5 of each decade in plain numbers, minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_quality(entries: list[dict], path: Path) -> None:
    """FID_toy against steps and against latency per image, one series per (name, guidance): quality.png."""
    _save_figure(quality_figure(entries), path)


def quality_figure(entries: list[dict]):
    """The figure of :func:`plot_quality` (not saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, list[dict]] = {}
    for e in entries:
        if e.get("fid") is None:
            continue
        series.setdefault(f"{e['name']} (w={e['guidance']:g})", []).append(e)
    for label, es in series.items():
        es = sorted(es, key=lambda e: e["steps"])
        marker = "o-" if es[0]["role"] == "teacher" else "*"
        axes[0].plot([e["steps"] for e in es], [e["fid"] for e in es], marker, label=label, markersize=9)
        lat = [(e["latency_ms"] or {}).get("batchN") for e in es]
        if all(v is not None for v in lat):
            axes[1].plot(lat, [e["fid"] for e in es], marker, label=label, markersize=9)
    axes[0].set(xlabel="sampling steps", ylabel=f"FID ({entries[0].get('fid_features', '')}) ↓", title="quality vs steps")
    steps_axis(axes[0], [e["steps"] for es in series.values() for e in es] or [1])
    axes[1].set(xlabel="latency per image, large batch (ms)", ylabel="FID ↓", title="quality vs latency")
    plain_log_axis(axes[1])
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_front(entries: list[dict], path: Path) -> bool:
    """The quality–diversity front: diversity (x) against adherence and against FID (y), one labelled point per
    entry (e.g. the λ of a ``stepdistill merge --sweep``). Written when at least two entries have both; returns
    whether it was."""
    points = [e for e in entries if e.get("diversity") is not None and e.get("adherence") is not None]
    if len(points) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "adherence", "adherence ↑"), (axes[1], "fid", "FID ↓")):
        pts = [e for e in points if e.get(key) is not None]
        ax.plot([e["diversity"] for e in pts], [e[key] for e in pts], "o-", color="tab:blue")
        for e in pts:
            ax.annotate(e["name"], (e["diversity"], e[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="diversity (1 − cos, same prompt) →", ylabel=label, title=f"{label.split()[0]} vs diversity")
        ax.grid(alpha=0.3)
    _save_figure(fig, path)
    return True


def write_report(out_dir: str | Path, suite: str, entries: list[dict], extra_md: str = "",
                 images: dict[str, str] | None = None, front: bool = False) -> dict:
    """Write report.json, report.md and quality.png under ``out_dir`` (and front.png when ``front``: the suite is a
    merge sweep, whose entries are points on one quality-diversity front); returns the JSON object."""
    out = Path(out_dir)
    for e in entries:
        missing = [k for k in REQUIRED_KEYS if k not in e]
        if missing:
            raise ValueError(f"report entry {e.get('name')!r} lacks {missing}")
    report = {"suite": suite, "device": device_description(), "entries": entries}
    rows = speedups(entries)
    if rows:
        report["speedups"] = rows
    gaps = quality_gaps(entries)
    if gaps:
        report["quality_gaps"] = gaps
    plot_quality(entries, out / "quality.png")
    has_front = front and plot_front(entries, out / "front.png")
    md = [f"# stepdistill report — {suite}", "", f"Device: {report['device']}", "", markdown_table(entries), ""]
    warned = warnings_markdown(entries)
    if warned:
        md += [warned, ""]
    if rows:
        md += ["Latency speed-ups (per image at the large batch; the end-to-end ideal divides by the teacher at the "
               "student's NFE, so the text encoder and VAE decode that both run once are counted):", "",
               speedup_table(rows), ""]
    if gaps:
        md += ["Quality against the teacher (FID gap < 0: the student beats it; adherence gap > 0: the student follows "
               "prompts less well, in points of accuracy):", "", quality_gap_table(gaps), ""]
    md += ["![quality vs steps and latency](quality.png)", ""]
    if has_front:
        md += ["![quality-diversity front](front.png)", ""]
    for title, fname in (images or {}).items():
        md += [f"## {title}", "", f"![{title}]({fname})", ""]
    if extra_md:
        md += [extra_md, ""]
    write_text_atomic(out / "report.md", "\n".join(md))
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    return report
