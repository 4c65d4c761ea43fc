"""The league's tables and convergence plot, from its result rows (one per method and budget fraction; see
:mod:`stepdistill.workflows.league` for how they are made and ``docs/benchmarks.md`` for where they are shown).

A row holds at least ``name``, ``recipe``, ``group`` (the table it belongs to: "1 step", "4 steps", ...), ``steps``,
``budget_unit``, ``budget`` (the amount used up to that checkpoint), ``budget_fraction``, ``eval_seed``,
``num_samples``, ``fid``, ``adherence``, ``all_correct``, ``diversity``, ``coverage``, ``nfe``, ``latency_ms`` and
``wall_s``; rows also carry ``updates``, the generator updates run by then (0: the budget ended before the first).

The evaluation's own noise is measured per group: one entry of the group judged at the full budget on two
evaluation seeds (``name``, ``group``, ``eval_seeds``, ``fid`` and ``adherence`` on each, ``num_samples``); its
|difference| is the margin below which two figures of that group are not told apart.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from stepdistill.eval.report import _save_figure

ROW_KEYS = ("name", "recipe", "group", "steps", "budget_unit", "budget", "budget_fraction", "eval_seed",
            "num_samples", "fid", "adherence", "all_correct", "diversity", "coverage", "nfe", "latency_ms", "wall_s")


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def _groups(rows: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["group"] not in seen:
            seen.append(row["group"])
    return seen


def trained(row: dict) -> bool:
    """Whether the row's student had run at least one update (a row without the count is taken to have)."""
    return row.get("updates") != 0


def ranking(rows: Iterable[dict], fraction: float) -> list[dict]:
    """The rows at ``fraction`` of the budget, best FID_toy first (ties: higher adherence first); a student that had
    not run an update yet (the teacher copy it starts from) is not ranked."""
    at = [r for r in rows if math.isclose(r["budget_fraction"], fraction) and r.get("fid") is not None and trained(r)]
    return sorted(at, key=lambda r: (r["fid"], -(r.get("adherence") or 0.0)))


def ranks(rows: Sequence[dict], group: str, fractions: Sequence[float]) -> dict[str, list[int | None]]:
    """Each method's rank (1 = lowest FID_toy) within ``group`` at every fraction of the budget; None where the method
    has no score at that fraction or had run no update yet."""
    members = [r for r in rows if r["group"] == group]
    names = dict.fromkeys(r["name"] for r in members)
    out: dict[str, list[int | None]] = {name: [None] * len(fractions) for name in names}
    for i, fraction in enumerate(fractions):
        for place, row in enumerate(ranking(members, fraction), start=1):
            out[row["name"]][i] = place
    return out


def noise_measurements(noise: dict | Sequence[dict] | None, rows: Sequence[dict]) -> list[dict]:
    """The league's noise measurements as a list, each with its ``group``: a league file written when the league
    measured the noise on one student only holds one mapping without a group, which is the group of that student's
    rows."""
    if not noise:
        return []
    found = [noise] if isinstance(noise, dict) else list(noise)
    groups = {r["name"]: r["group"] for r in rows}
    return [m if "group" in m else {**m, "group": groups.get(m["name"])} for m in found]


def noise_for(group: str, noise: Sequence[dict]) -> dict | None:
    """The noise measured in ``group``; where the group has none, the measurement with the largest FID_toy difference
    (the most cautious); None when nothing was measured."""
    own = [m for m in noise if m.get("group") == group]
    if own:
        return own[0]
    return max(noise, key=lambda m: abs(m["fid"][0] - m["fid"][1]), default=None)


def noise_sentence(measurement: dict) -> str:
    """``name`` scores FID_toy a and b on seeds s and t (adherence ...), n samples each: the evaluation's noise."""
    fid, adherence, seeds = measurement["fid"], measurement["adherence"], measurement["eval_seeds"]
    return (f"`{measurement['name']}` at {measurement['budget_fraction']:.0%} of the budget scores FID_toy "
            f"{fid[0]:.1f} on eval seed {seeds[0]} and {fid[1]:.1f} on seed {seeds[1]} (adherence {adherence[0]:.3f} / "
            f"{adherence[1]:.3f}), {measurement['num_samples']:,} samples each: FID_toy differences smaller than "
            f"{abs(fid[0] - fid[1]):.1f} are within the evaluation's own noise")


#: the figures a claim may compare, and whether higher is better
CLAIM_METRICS = {"fid": False, "adherence": True, "all_correct": True, "diversity": True}


def judge_claims(rows: Sequence[dict], claims: Sequence[dict], noise: dict | Sequence[dict] | None = None
                 ) -> list[dict]:
    """Each claim (``text``, ``metric``, ``better``, ``than``, optional ``fractions``: "entry ``better`` scores better
    than entry ``than`` on ``metric``") judged at every fraction where both entries have a row.

    The margin is ``than − better`` for FID_toy and ``better − than`` for the others (positive: the claim holds).
    The noise is the evaluation's own, where the league measured it for that metric: |difference| of one student's
    FID_toy (or adherence) on two evaluation seeds, measured in the group of ``better``'s rows (:func:`noise_for`:
    another group's largest where that group has none; the claim's ``noise_entry`` names the student). Verdicts:
    ``holds``; ``does not hold``; ``within noise`` (|margin| ≤ noise); ``equal`` (the same figure: e.g. two runs
    still in a warm-up they share, without a noise measure to set it against); ``not testable`` when either student had
    not run an update yet (the teacher copy it starts from)."""
    measurements = noise_measurements(noise, rows)
    judged = []
    for claim in claims:
        metric, higher = claim["metric"], CLAIM_METRICS[claim["metric"]]
        group = next((r["group"] for r in rows if r["name"] == claim["better"]), None)
        source = noise_for(group, measurements) if group is not None else None
        measured = abs(source[metric][0] - source[metric][1]) if source and metric in source else None
        found = sorted({float(r["budget_fraction"]) for r in rows if r["name"] in (claim["better"], claim["than"])})
        at = []
        for fraction in claim.get("fractions") or found:
            pair = [next((r for r in rows if r["name"] == name and math.isclose(r["budget_fraction"], fraction)), None)
                    for name in (claim["better"], claim["than"])]
            if None in pair or any(r.get(metric) is None for r in pair):
                continue
            a, b = (float(r[metric]) for r in pair)
            margin = a - b if higher else b - a
            idle = [r["name"] for r in pair if not trained(r)]
            if idle:
                verdict = f"not testable: {' and '.join(idle)} had run no update"
            elif measured is not None and abs(margin) <= measured:
                verdict = "within noise"
            elif margin == 0:
                verdict = "equal"
            else:
                verdict = "holds" if margin > 0 else "does not hold"
            at.append({"fraction": fraction, "better_value": a, "than_value": b, "margin": margin, "noise": measured,
                       "verdict": verdict})
        judged.append({**{k: claim[k] for k in ("text", "metric", "better", "than")},
                       "noise_entry": source["name"] if measured is not None else None, "at": at})
    return judged


def claims_markdown(judged: Sequence[dict]) -> list[list[str]]:
    """One table row per claim: the claim, the metric, and ``better vs than: verdict`` at each fraction judged."""
    out = []
    for claim in judged:
        digits = ".1f" if claim["metric"] == "fid" else ".4f" if claim["metric"] == "diversity" else ".3f"
        cells = [f"{a['fraction']:.0%}: {_num(a['better_value'], digits)} vs {_num(a['than_value'], digits)}, "
                 f"{a['verdict']}" for a in claim["at"]]
        out.append([claim["text"], f"{claim['metric']} ({claim['better']} vs {claim['than']})",
                    "; ".join(cells) or "no rows"])
    return out


def league_tables(rows: Sequence[dict], fractions: Sequence[float], noise: dict | Sequence[dict] | None = None,
                  claims: Sequence[dict] = ()) -> str:
    """Per group: one Markdown table at the full budget (methods ranked by FID_toy), one with every fraction side by
    side (FID_toy / adherence) and the evaluation's own noise measured in that group; then the judged claims
    (:func:`judge_claims`) when given."""
    measurements = noise_measurements(noise, rows)
    out: list[str] = []
    full = max(fractions)
    for group in _groups(rows):
        members = [r for r in rows if r["group"] == group]
        ranked = ranking(members, full)
        idle = [r for r in members if math.isclose(r["budget_fraction"], full) and not trained(r)]
        if not ranked and not idle:
            continue
        first = (ranked + idle)[0]
        out.append(f"### {group}: {first['num_samples']:,} samples, eval seed {first['eval_seed']}, "
                   f"{full:.0%} of the budget\n")
        out.append("| rank | method | FID_toy | adherence | all-correct | diversity | coverage (x / y / r) | NFE | "
                   "latency ms/img (b64) | budget used | updates | training wall s |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for i, r in [*enumerate(ranked, start=1), *(("no update", r) for r in idle)]:
            cov = r.get("coverage") or {}
            cov_text = " / ".join(_num(cov.get(k), ".2f") for k in ("x", "y", "radius")) if cov else "—"
            lat = (r.get("latency_ms") or {}).get("batchN")
            out.append(f"| {i} | {r['name']} | {_num(r['fid'], '.1f')} | {_num(r['adherence'], '.3f')} | "
                       f"{_num(r.get('all_correct'), '.3f')} | {_num(r.get('diversity'), '.4f')} | {cov_text} | "
                       f"{r['nfe']} | {_num(lat, '.2f')} | {_num(r['budget'], '.3g')} | "
                       f"{_num(r.get('updates'), 'd')} | {_num(r.get('wall_s'), '.0f')} |")
        out.append("")
        out.append(f"{group}, FID_toy / adherence (rank) at each fraction of the budget:\n")
        header = " | ".join(f"{f:.0%}" for f in fractions)
        out.append(f"| method | {header} |")
        out.append("|---|" + "---|" * len(fractions))
        for name, places in ranks(rows, group, fractions).items():
            cells = []
            for f, place in zip(fractions, places):
                hit = [r for r in members if r["name"] == name and math.isclose(r["budget_fraction"], f)]
                cells.append(f"{_num(hit[0]['fid'], '.1f')} / {_num(hit[0]['adherence'], '.3f')} ({_num(place, 'd')})"
                             if hit else "—")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
        own = [m for m in measurements if m.get("group") == group]
        if own:
            out.append(f"Evaluation noise in this group: {noise_sentence(own[0])}.\n")
    if claims:
        out.append("Claims of the methods' papers, judged on these rows:\n")
        out.append("| claim | compared | at each fraction of the budget |")
        out.append("|---|---|---|")
        out += ["| " + " | ".join(cells) + " |" for cells in claims_markdown(claims)]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def plot_convergence(rows: Sequence[dict], path: str | Path, noise: dict | Sequence[dict] | None = None) -> Path:
    """FID_toy against the training TFLOP used, one line per method, one panel per group (log FID axis, two panels
    a row); a student that had not run an update yet is drawn as a cross and named so in the legend. With ``noise``
    (a student's FID_toy on two evaluation seeds, per group), the title of each panel whose group was measured states
    the FID_toy difference that is within the evaluation's own noise there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measurements = noise_measurements(noise, rows)
    groups = _groups(rows)
    ncols = min(2, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.4 * nrows), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        members = [r for r in rows if r["group"] == group and r.get("fid") is not None]
        for name in dict.fromkeys(r["name"] for r in members):
            line = sorted((r for r in members if r["name"] == name), key=lambda r: r["budget"])
            idle = not any(trained(r) for r in line)
            ax.plot([r["budget"] / 1e12 for r in line], [r["fid"] for r in line], marker="x" if idle else "o",
                    linestyle=":" if idle else "-", label=f"{name} (no update)" if idle else name)
        own = next((m for m in measurements if m.get("group") == group), None)
        ax.set_title(group if own is None else f"{group}\n(evaluation noise: {abs(own['fid'][0] - own['fid'][1]):.1f} "
                                               f"FID_toy between two seeds, {own['name']} at {own['fid'][0]:.0f})",
                     fontsize=10)
        ax.set_xlabel("training TFLOP used")
        ax.set_ylabel("FID_toy (lower is better)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    path = Path(path)
    _save_figure(fig, path)  # lays it out, writes it atomically, closes it
    return path


def plot_samples(rows: Sequence[dict], samples: dict[str, np.ndarray], prompts: Sequence[str],
                 path: str | Path) -> Path:
    """Each method's student at the full budget, one row of samples each, grouped as the tables (best FID_toy first,
    students with no update last) and labelled with its group and FID_toy; every row shows the same prompts and seeds
    (``prompts``: the column titles). ``samples`` maps an entry name to its images (uint8, N×3×H×W); entries
    without samples are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = max(float(r["budget_fraction"]) for r in rows)
    order = []
    for group in _groups(rows):
        members = [r for r in rows if r["group"] == group]
        idle = [r for r in members if math.isclose(r["budget_fraction"], full) and not trained(r)]
        order += [r for r in ranking(members, full) + idle if r["name"] in samples]
    if not order:
        raise ValueError("plot_samples: no row at the full budget has samples")
    count, _, height, width = samples[order[0]["name"]].shape
    fig, axes = plt.subplots(len(order), 1, figsize=(0.95 * count + 2.4, 0.95 * len(order) + 0.9), squeeze=False)
    for ax, row in zip(axes[:, 0], order):
        strip = np.full((height, count * (width + 2) - 2, 3), 255, dtype=np.uint8)
        for k, image in enumerate(samples[row["name"]]):
            strip[:, k * (width + 2): k * (width + 2) + width] = image.transpose(1, 2, 0)
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        note = "no update" if not trained(row) else f"FID_toy {row['fid']:.1f}"
        ax.set_ylabel(f"{row['name']}\n{row['group']}\n{note}", rotation=0, ha="right", va="center", fontsize=7)
    for k, prompt in enumerate(prompts):
        axes[0, 0].text(k * (width + 2) + width / 2, -3, textwrap.fill(prompt, 14), ha="center", va="bottom",
                        fontsize=5)
    path = Path(path)
    _save_figure(fig, path)
    return path
