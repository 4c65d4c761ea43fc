"""``stepdistill demo``: the main job on the embedded toy default, end to end, with the same evaluation engine as
``stepdistill eval`` and ``stepdistill bench``.

1. Distil the toy teacher with a recipe (:func:`~stepdistill.workflows.distill.distill`, resumable in
   ``<out>/run``) and export the student to ``<out>/student`` (skipped with ``skip_distill``, which evaluates an
   existing ``<out>/student`` if there is one).
2. Build a suite (:func:`demo_suite`) — the teacher without CFG at the student's step count (the end-to-end latency
   ideal), the teacher with CFG at :data:`DEMO_TEACHER_STEPS`, and the student at its own step count, on the toy
   prompts with the toy metrics — and run it through :func:`~stepdistill.eval.runner.run_suite`. Its samples stay
   in ``<out>/eval``, so a rerun generates only what changed (a new student); every run scores and times every
   configuration anew, as the demo always has.
3. Write the report: ``report.md``, ``report.json`` and ``quality.png``
   (:func:`~stepdistill.eval.report.write_report`) and ``grid.png``: eight hand-picked prompts (every shape twice,
   six colours, both sizes, all backgrounds), one row per configuration, the same seeds in every row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stepdistill.eval.generate import (
    export_info,
    generate,
    image_grid,
    load_pipeline,
    sample_seeds,
)
from stepdistill.eval.report import write_report
from stepdistill.eval.runner import run_suite
from stepdistill.eval.suite import EntrySpec, LatencySpec, Suite
from stepdistill.eval.toy_metrics import REFERENCE_SIZE
from stepdistill.toy import world
from stepdistill.workflows.distill import distill, export_run

__all__ = ["DEMO_TEACHER_STEPS", "DemoOptions", "DemoProgress", "demo_prompts", "demo_suite", "distill_line",
           "grid_prompts", "run_demo"]

# Teacher steps with the demo's CFG scale. 50 steps (41.7 / 0.976 against 25 steps' 42.5 / 0.975 in the demo) would
# add about 4 minutes on 2 CPU cores and push the demo past its 10-minute budget.
DEMO_TEACHER_STEPS = (1, 4, 25)
# Samples generated per pipeline call: what the demo has always used (the figures in the README were measured with
# it; another batching can move them in the last digits through floating-point summation order).
DEMO_BATCH_SIZE = 256
GRID_SEED = 10_000


@dataclass(frozen=True)
class DemoOptions:
    """What ``stepdistill demo`` is asked to do (its command-line options)."""

    out: Path
    pipeline: str = "pipelines/toy.yaml"
    recipe: str = "training/toy-sid-4step.yaml"
    teacher: str = "toy"
    evaluator: str | None = None
    guidance: float = 3.0
    samples_per_prompt: int = 4
    max_prompts: int | None = None
    seed: int = 0
    latency_batch: int = 32
    latency_repeats: int = 3
    latency_warmup: int = 1
    skip_distill: bool = False
    overwrite: bool = False

    def check(self) -> None:
        """Refuse impossible settings before anything is loaded or written."""
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"--max-prompts must be ≥ 1, got {self.max_prompts}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"--samples-per-prompt must be ≥ 2 (diversity compares samples of one prompt), got "
                             f"{self.samples_per_prompt}")

    @property
    def student_dir(self) -> Path:
        return Path(self.out) / "student"


class DemoProgress:
    """What :func:`run_demo` reports as it goes; every method does nothing here (the CLI prints)."""

    def distilling(self, options: DemoOptions) -> None:
        """Distillation is about to start (into ``<out>/run``, exported to ``options.student_dir``)."""

    def distilled(self, options: DemoOptions, summary: dict) -> None:
        """Distillation and export are done; ``summary`` is :func:`~stepdistill.workflows.distill.distill`'s."""

    def log(self, message: str) -> None:
        """A progress line of the suite runner."""

    def entry(self, entry: dict) -> None:
        """One configuration is evaluated: its report entry."""


def demo_prompts(max_prompts: int | None = None) -> list[str]:
    """The 144 toy prompts, or ``max_prompts`` of them evenly spread (a quick look, not the benchmark)."""
    prompts = world.all_prompts()
    if max_prompts is not None:
        prompts = prompts[:: max(1, len(prompts) // max_prompts)][:max_prompts]
    return prompts


def grid_prompts() -> list[str]:
    """The grid's eight prompts: every shape twice, six colours, both sizes, all backgrounds."""
    return [
        world.make_prompt(world.SHAPES[i % 4], tuple(world.COLORS)[(i * 5) % 6], tuple(world.SIZES)[(i // 2) % 2],
                          tuple(world.BACKGROUNDS)[i % 3])
        for i in range(8)
    ]


def _pipeline_path(path: str | Path) -> str:
    return "toy" if str(path) == "toy" else str(Path(path).resolve())


def demo_suite(options: DemoOptions, student: Path | None = None) -> Suite:
    """The demo as a suite: the teacher at the student's step count without CFG, the teacher with
    ``options.guidance`` at :data:`DEMO_TEACHER_STEPS`, then the ``student`` folder (an exported student, if given)
    at its own step count; toy metrics on :func:`demo_prompts`, on the CPU."""
    info = export_info(student) if student is not None else {}
    student_steps = len(info.get("timesteps", ())) or 1
    teacher = _pipeline_path(options.teacher)
    entries = [
        EntrySpec("teacher", "teacher", teacher, (student_steps,), (1.0,)),
        EntrySpec("teacher", "teacher", teacher, DEMO_TEACHER_STEPS, (float(options.guidance),)),
    ]
    if student is not None:
        entries.append(EntrySpec(info.get("method", "student"), "student", _pipeline_path(student), (student_steps,),
                                 (1.0,)))
    prompts = demo_prompts(options.max_prompts)
    return Suite(
        name="toy-demo",
        description="stepdistill demo: the toy teacher with and without CFG against the distilled student",
        metrics=("toy",),
        prompt_source="toy" if options.max_prompts is None else f"toy ({len(prompts)} of the 144 prompts)",
        prompts=prompts,
        entries=entries,
        samples_per_prompt=options.samples_per_prompt,
        seed=options.seed,
        batch_size=DEMO_BATCH_SIZE,
        device="cpu",  # as the demo has always run; the figures above were measured there
        latency=LatencySpec(batch=options.latency_batch, repeats=options.latency_repeats,
                            warmup=options.latency_warmup),
        toy_evaluator=None if options.evaluator is None else str(Path(options.evaluator).resolve()),
        toy_reference_size=REFERENCE_SIZE,
        source="stepdistill demo",
    )


def _grid(suite: Suite, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
    """One row of ``prompts`` per configuration (seeds from :data:`GRID_SEED`) and the rows' names."""
    seeds = sample_seeds(len(prompts), 1, GRID_SEED)
    pipes: dict[str, Any] = {}
    rows, names = [], []
    for config in suite.configurations():
        if config.pipeline not in pipes:
            pipes[config.pipeline] = load_pipeline(config.pipeline, device=suite.device)
        rows.append(generate(pipes[config.pipeline], prompts, seeds, config.steps, config.guidance, progress=False))
        names.append(f"{config.name} {config.steps} step(s), w={config.guidance:g}")
    return torch.cat(rows), names


def run_demo(options: DemoOptions, progress: DemoProgress | None = None) -> dict:
    """Distil (unless ``options.skip_distill``), export, evaluate through the suite runner and write the report under
    ``options.out``. Returns ``{"report": report.json's object, "distill_summary": distill's summary or None,
    "wall_seconds", "files": [report.md, report.json, grid.png]}``."""
    progress = progress or DemoProgress()
    options.check()
    t_start = time.time()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    distill_summary = None
    if not options.skip_distill:
        progress.distilling(options)
        distill_summary = distill(options.pipeline, options.recipe, out / "run",
                                  resume=None if options.overwrite else "latest", export=False,
                                  overwrite=options.overwrite)
        export_run(out / "run", options.student_dir)
        progress.distilled(options, distill_summary)

    suite = demo_suite(options, options.student_dir if options.student_dir.is_dir() else None)
    result = run_suite(suite, out / "eval", log=progress.log, write_files=False, on_entry=progress.entry,
                       remeasure=True)  # every demo run scores and times anew; unchanged samples are reused

    prompts = grid_prompts()
    images, row_names = _grid(suite, prompts)
    image_grid(images, rows=len(row_names), cols=len(prompts), scale=4).save(out / "grid.png")
    extra = ("Grid rows, top to bottom: " + "; ".join(row_names) + ".\n\nGrid prompts, left to right: "
             + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(prompts)))
    if distill_summary is not None:
        extra += f"\n\nDistillation ({options.recipe}): {distill_line(distill_summary)}."
    extra += (f"\n\nEvaluation: the suite runner ({len(suite.prompts)} prompts × {suite.samples_per_prompt} samples, "
              f"seed of sample j of prompt i = {suite.seed} + i·{suite.samples_per_prompt} + j); samples in "
              f"`{out / 'eval' / 'samples'}`, reused by a rerun while their pipeline is unchanged.")
    extra += f"\n\nTotal demo wall time: {time.time() - t_start:.0f} s."
    report = write_report(out, suite.name, result["entries"], extra_md=extra,
                          images={"Samples (same prompts and seeds in every row)": "grid.png"})
    return {"report": report, "distill_summary": distill_summary, "wall_seconds": time.time() - t_start,
            "files": [out / "report.md", out / "report.json", out / "grid.png"]}


def distill_line(summary: dict) -> str:
    """``N generator steps: training loop X s (R steps/s)[; teacher ODE pairs P s]; Y s in all with set-up``."""
    line = (f"{summary['steps']} generator steps: training loop {summary['wall_time_s']:.0f} s "
            f"({summary['steps_per_s']:.2f} steps/s)")
    if summary.get("regression_pairs_seconds") is not None:
        line += f"; teacher ODE pairs {summary['regression_pairs_seconds']:.0f} s"
    if summary.get("total_seconds") is not None:
        line += f"; {summary['total_seconds']:.0f} s in all with set-up"
    return line
