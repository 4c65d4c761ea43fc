"""The ``stepdistill`` command line: distill | export | generate | eval | bench | demo | toy."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` are refused: no option here means anything at infinity)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from stepdistill.eval.generate import (
        check_student_call,
        export_info,
        generate,
        image_grid,
        load_pipeline,
        student_call_defaults,
    )
    from stepdistill.toy.assets import check_toy_vocabulary, is_toy_model

    for name in ("num", "scale"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be ≥ 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {args.steps}")
    if args.guidance is not None and args.guidance < 0:
        raise ValueError(f"--guidance must be ≥ 0 (values ≤ 1 disable classifier-free guidance), got {args.guidance}")
    if Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {args.out}")
    if is_toy_model(args.pipeline):
        check_toy_vocabulary([args.prompt, *([args.negative_prompt] if args.negative_prompt else [])], "--prompt")
    info = export_info(args.pipeline) if args.pipeline != "toy" and Path(args.pipeline).is_dir() else {}
    default_steps, default_guidance = student_call_defaults(info)
    steps = default_steps if args.steps is None else args.steps
    guidance = default_guidance if args.guidance is None else args.guidance
    check_student_call(info, steps, guidance, args.pipeline)  # before loading anything
    pipe = load_pipeline(args.pipeline)
    prompts = [args.prompt] * args.num
    seeds = list(range(args.seed, args.seed + args.num))
    images = generate(pipe, prompts, seeds, steps, guidance, negative_prompt=args.negative_prompt,
                      desc="generate", nasa_alpha=args.nasa_alpha)
    cols = min(args.num, 8)
    rows = (args.num + cols - 1) // cols
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, rows, cols, scale=args.scale).save(out)
    print(f"wrote {out} ({args.num} images, {steps} steps, guidance {guidance:g})")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# distill / export
# ---------------------------------------------------------------------------------------------------------------
def cmd_distill(args: argparse.Namespace) -> int:
    from stepdistill.training.run import distill

    summary = distill(args.pipeline, args.recipe, args.out, overrides=args.set or (), resume=args.resume,
                      export=not args.no_export, overwrite=args.overwrite,
                      allow_config_change=args.allow_config_change, dry_run=args.dry_run)
    if args.dry_run and summary.get("multi_student"):
        import yaml

        print("# stepdistill distill --dry-run (multi-student recipe): nothing was loaded or written")
        for s in summary["students"]:
            print(f"# student {s['student']} of {s['of']} ({s['folder']}): {s['status']}"
                  + (f", {s['why']}" if s["why"] else "") + f"; prompts: {s['prompts']}")
        print(yaml.safe_dump({"router": summary["router"], **summary["config"]}, sort_keys=False).rstrip())
        return 0
    if args.dry_run:
        import yaml

        print(f"# stepdistill distill --dry-run: nothing was loaded or written. Run fingerprint {summary['fingerprint']}")
        if summary["resume_from"]:
            print(f"# would resume from {summary['resume_from']} (step {summary['start_step']})")
        else:
            print(f"# would start a fresh run in {summary['out']}")
        for note in summary["notes"]:
            print(f"# {note}")
        print(yaml.safe_dump({"pipeline": summary["pipeline"], **summary["config"]}, sort_keys=False).rstrip())
        return 0
    print(json.dumps({k: summary[k] for k in ("steps", "wall_time_s", "steps_per_s", "student") if k in summary},
                     indent=2, default=str))
    return 0


def recipe_description(text: str, width: int) -> str:
    """The first paragraph of a recipe's header comment on one line, shortened to ``width`` characters at a word
    boundary (with "…") when longer."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if not body:
            if lines:
                break
            continue
        lines.append(body)
    summary = " ".join(" ".join(lines).split())
    if len(summary) <= width:
        return summary
    cut = summary.rfind(" ", 0, max(width - 1, 1))
    return (summary[:cut] if cut > 0 else summary[: width - 1]).rstrip(" ,;:(") + "…"


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the recipes under --dir with their method and the start of their header comment."""
    import shutil

    from stepdistill.yaml_io import YAMLFileError, load_yaml_file

    folder = Path(args.dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"recipe folder {folder} not found (run from the repository root or pass --dir)")
    rows, broken = [], []
    for path in sorted(folder.glob("*.yaml")):
        try:
            data = load_yaml_file(path)
        except YAMLFileError as err:
            broken.append(str(err))
            continue
        if not isinstance(data, dict) or "objective" not in data:
            continue
        rows.append((path.name, str(data["objective"]), path.read_text(encoding="utf-8")))
    if not rows:
        raise FileNotFoundError(f"no recipes (YAML files with an 'objective' key) in {folder}")
    width = max(len(r[0]) for r in rows)
    mwidth = max(len(r[1]) for r in rows)
    columns = shutil.get_terminal_size((160, 24)).columns if sys.stdout.isatty() else 160
    room = max(40, columns - width - mwidth - 4)
    for name, method, text in rows:
        print(f"{name:<{width}}  {method:<{mwidth}}  {recipe_description(text, room)}")
    for problem in broken:
        print(f"skipped {problem}", file=sys.stderr)
    return 0


def cmd_distill_cost(args: argparse.Namespace) -> int:
    from stepdistill.eval.distill_cost import markdown_table, run_distill_cost

    def run() -> int:
        report = run_distill_cost(args.pipeline, args.recipes, args.out, steps=args.steps, warmup=args.warmup,
                                  overrides=args.set or (), threads=args.threads)
        print(markdown_table(report["entries"]))
        print(f"wrote {Path(args.out) / 'report.md'} and report.json")
        return 0

    return run()


def cmd_export(args: argparse.Namespace) -> int:
    from stepdistill.training.run import export_run

    path = export_run(args.run, args.out, args.checkpoint, overwrite=args.overwrite)
    print(f"exported the student to {path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from stepdistill.pipelines.merge import merge_students, merge_sweep

    if (args.alpha is None) == (args.sweep is None):
        raise ValueError("give exactly one of --alpha λ or --sweep λ1,λ2,...")
    if args.alpha is not None:
        path = merge_students(args.a, args.b, args.alpha, args.out, overwrite=args.overwrite)
        print(f"wrote the merged student (λ = {args.alpha}) to {path}")
        return 0
    try:
        alphas = [finite_float(x) for x in args.sweep.split(",") if x.strip()]
    except argparse.ArgumentTypeError:
        raise ValueError(f"--sweep takes comma-separated finite numbers, got {args.sweep!r}") from None
    template = args.suite if args.suite else ("eval/toy-students.yaml" if Path("eval/toy-students.yaml").is_file()
                                              else None)
    result = merge_sweep(args.a, args.b, alphas, args.out, suite_template=template, overwrite=args.overwrite)
    print(f"wrote {len(result['folders'])} merged students under {args.out}; score the front with\n"
          f"  stepdistill bench --suite {result['suite']} --out {Path(args.out) / 'bench'}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# toy
# ---------------------------------------------------------------------------------------------------------------
def cmd_toy_train_teacher(args: argparse.Namespace) -> int:
    from stepdistill.toy.train import train_teacher

    info = train_teacher(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                         batch_size=args.batch_size, lr=args.lr, vae_cache=args.vae_cache)
    print(json.dumps(info, indent=2))
    return 0


def cmd_toy_train_evaluator(args: argparse.Namespace) -> int:
    from stepdistill.toy.train import train_evaluator

    info = train_evaluator(args.out, seed=args.seed, steps=args.steps)
    print(json.dumps(info, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------------------------
# Teacher steps with the demo's CFG scale. 50 steps (41.7 / 0.976 against 25 steps' 42.5 / 0.975 in the demo) would
# add about 4 minutes on 2 CPU cores and push the demo past its 10-minute budget.
DEMO_TEACHER_STEPS = (1, 4, 25)
# The teacher at the student's NFE (its steps, no CFG) gives the end-to-end ideal speed-up (see eval.report.speedups).


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: distil the toy teacher into a few-step student (unless --skip-distill),
    export it to <out>/student, evaluate teacher (1/4/25 steps with CFG; without CFG at the student's NFE, the
    end-to-end latency ideal) and the student at its own step count with the toy evaluator, and report."""
    import torch

    from stepdistill.eval.bench import evaluate_configuration
    from stepdistill.eval.generate import export_info, generate, image_grid, load_pipeline, sample_seeds
    from stepdistill.eval.report import write_report
    from stepdistill.eval.toy_metrics import ToyJudge
    from stepdistill.toy import world

    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError(f"--max-prompts must be ≥ 1, got {args.max_prompts}")
    if args.samples_per_prompt < 2:
        raise ValueError(f"--samples-per-prompt must be ≥ 2 (diversity compares samples of one prompt), got "
                         f"{args.samples_per_prompt}")
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    student_dir = out / "student"
    distill_summary = None
    if not args.skip_distill:
        from stepdistill.training.run import distill

        print(f"[demo] distilling the toy teacher with {args.recipe} into {student_dir}", flush=True)
        distill_summary = distill(args.pipeline, args.recipe, out / "run", resume=None if args.overwrite else "latest",
                                  export=False, overwrite=args.overwrite)
        from stepdistill.training.run import export_run

        export_run(out / "run", student_dir)
        print(f"[demo] distillation: {_distill_line(distill_summary)}; student exported to {student_dir}", flush=True)

    teacher_pipe = load_pipeline(args.teacher)
    judge = ToyJudge(args.evaluator)
    prompts = world.all_prompts()
    if args.max_prompts is not None:  # an even spread over the 144 prompts (a quick look, not the benchmark)
        prompts = prompts[:: max(1, len(prompts) // args.max_prompts)][: args.max_prompts]
    entries = []
    grid_prompts = [  # every shape twice, six colours, both sizes, all backgrounds
        world.make_prompt(world.SHAPES[i % 4], tuple(world.COLORS)[(i * 5) % 6], tuple(world.SIZES)[(i // 2) % 2],
                          tuple(world.BACKGROUNDS)[i % 3])
        for i in range(8)
    ]
    grid_seeds = sample_seeds(len(grid_prompts), 1, 10_000)
    grid_rows, row_names = [], []

    def run(pipe, name, role, steps, guidance):
        entry, _ = evaluate_configuration(pipe, judge, name, role, steps, guidance, prompts, args.samples_per_prompt,
                                          seed=args.seed, latency_batch=args.latency_batch,
                                          latency_repeats=args.latency_repeats, latency_warmup=args.latency_warmup)
        entries.append(entry)
        print(f"[demo] {name:>8} {steps:>2} step(s) w={guidance:g}: FID_toy {entry['fid']:.2f}  adherence "
              f"{entry['adherence']:.3f}  diversity {entry['diversity']:.4f}  latency/img "
              f"{entry['latency_ms']['batchN']:.2f} ms (batch 1: {entry['latency_ms']['batch1']:.1f} ms)", flush=True)
        grid_rows.append(generate(pipe, grid_prompts, grid_seeds, steps, guidance, progress=False))
        row_names.append(f"{name} {steps} step(s), w={guidance:g}")

    student_info = export_info(student_dir) if student_dir.is_dir() else {}
    student_steps = len(student_info.get("timesteps", ())) or 1
    run(teacher_pipe, "teacher", "teacher", student_steps, 1.0)
    for steps in DEMO_TEACHER_STEPS:
        run(teacher_pipe, "teacher", "teacher", steps, args.guidance)
    if student_dir.is_dir():
        run(load_pipeline(student_dir), student_info.get("method", "student"), "student", student_steps, 1.0)
    grid = image_grid(torch.cat(grid_rows), rows=len(grid_rows), cols=len(grid_prompts), scale=4)
    grid.save(out / "grid.png")
    legend = ("Grid rows, top to bottom: " + "; ".join(row_names) + ".\n\nGrid prompts, left to right: "
              + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(grid_prompts)))
    extra = legend
    if distill_summary is not None:
        extra += f"\n\nDistillation ({args.recipe}): {_distill_line(distill_summary)}."
    extra += f"\n\nTotal demo wall time: {time.time() - t_start:.0f} s."
    write_report(out, "toy-demo", entries, extra_md=extra, images={"Samples (same prompts and seeds in every row)": "grid.png"})
    print(f"[demo] wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'grid.png'} in {time.time() - t_start:.0f} s")
    return 0


def _distill_line(summary: dict) -> str:
    """``N generator steps: training loop X s (R steps/s)[; teacher ODE pairs P s]; Y s in all with set-up``."""
    line = (f"{summary['steps']} generator steps: training loop {summary['wall_time_s']:.0f} s "
            f"({summary['steps_per_s']:.2f} steps/s)")
    if summary.get("regression_pairs_seconds") is not None:
        line += f"; teacher ODE pairs {summary['regression_pairs_seconds']:.0f} s"
    if summary.get("total_seconds") is not None:
        line += f"; {summary['total_seconds']:.0f} s in all with set-up"
    return line


# ---------------------------------------------------------------------------------------------------------------
# eval / bench
# ---------------------------------------------------------------------------------------------------------------
def _one_line(err: BaseException, command: str = "") -> str:
    """The error's message on one line (library messages sometimes span several), without a leading
    ``stepdistill <command>:`` that the caller prints itself."""
    text = " ".join(str(err).split()) or type(err).__name__
    prefix = f"stepdistill {command}: " if command else None
    while prefix and text.startswith(prefix):
        text = text[len(prefix):]
    return text


def _quiet_libraries() -> None:
    """Keep stderr for stepdistill's own lines: diffusers/transformers advisory warnings and their model-loading
    progress bars off (STEPDISTILL_DEBUG=1 keeps them)."""
    if os.environ.get("STEPDISTILL_DEBUG"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        dlogging.disable_progress_bar()
        from transformers.utils import logging as tlogging

        tlogging.set_verbosity_error()
        tlogging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def _guarded(command: str, fn) -> int:
    """Run ``fn()``; any failure is one clear line on stderr and a non-zero exit (2: invalid input, a missing or
    damaged file, an unavailable metric; 1: anything else; 130: interrupted). STEPDISTILL_DEBUG=1 adds the
    traceback."""
    from stepdistill.eval.errors import MetricUnavailable
    from stepdistill.training.checkpoint import CheckpointError

    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"stepdistill {command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (MetricUnavailable, ValueError, OSError, CheckpointError) as err:
        if os.environ.get("STEPDISTILL_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"stepdistill {command}: error: {_one_line(err, command)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one clear line instead of a traceback
        if os.environ.get("STEPDISTILL_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"stepdistill {command}: error: {type(err).__name__}: {_one_line(err, command)} (set STEPDISTILL_DEBUG=1 for "
              "the traceback)", file=sys.stderr)
        return 1


def cmd_eval(args: argparse.Namespace) -> int:
    """One pipeline, one prompt set, one (steps, guidance): the bench engine with a single entry -> a JSON file."""

    def run() -> int:
        from stepdistill.eval.report import atomic_write_text, markdown_table, warnings_markdown
        from stepdistill.eval.runner import run_suite
        from stepdistill.eval.suite import suite_from_dict

        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give the JSON file to write, e.g. {out / 'eval.json'}")
        if out.suffix.lower() != ".json":
            raise ValueError(f"--out must name a .json file, got {out}")

        data: dict = {
            "suite": args.name if args.suite_name is None else args.suite_name,
            "metrics": args.metrics,
            "prompts": args.prompts,
            "samples_per_prompt": args.samples_per_prompt,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "latency": {"batch": args.latency_batch, "repeats": args.latency_repeats, "warmup": args.latency_warmup}
            if args.latency_batch > 0 else False,
            "entries": [{"name": args.name, "role": args.role, "pipeline": args.pipeline, "steps": args.steps,
                         "guidance": args.guidance, "scheduler": args.scheduler,
                         "negative_prompt": args.negative_prompt}],
        }
        optional = {
            "max_prompts": args.max_prompts, "resolution": args.resolution, "device": args.device,
            "dtype": args.dtype, "toy_evaluator": args.toy_evaluator, "toy_reference_size": args.toy_reference_size,
            "inception": args.inception, "reference_images": args.reference_images,
            "reference_stats": args.reference_stats, "fid_resize": args.fid_resize, "clip_model": args.clip_model,
            "clip_backend": args.clip_backend, "clip_arch": args.clip_arch, "hps_checkpoint": args.hps_checkpoint,
            "hps_version": args.hps_version,
        }
        data.update({k: v for k, v in optional.items() if v is not None})
        suite = suite_from_dict(data, base_dir=Path.cwd(), source="the eval options")
        work = Path(args.work_dir) if args.work_dir else out.parent / f"{out.stem}_samples"
        report = run_suite(suite, work, write_files=False)
        atomic_write_text(out, json.dumps(report, indent=2))
        print(markdown_table(report["entries"]))
        warned = warnings_markdown(report["entries"])
        if warned:
            print(f"\n{warned}")
        print(f"wrote {out} (samples under {work}) in {report['run']['wall_seconds']:.0f} s")
        return 0

    return run()


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark suite file and write report.json, report.md, quality.png, metrics.png and grid.png."""

    def run() -> int:
        from stepdistill.eval.report import markdown_table, warnings_markdown
        from stepdistill.eval.runner import run_suite
        from stepdistill.eval.suite import load_suite

        suite = load_suite(args.suite)
        if args.samples_per_prompt is not None or args.max_prompts is not None:
            suite = suite.with_overrides(args.samples_per_prompt, args.max_prompts)
        out = Path(args.out)
        report = run_suite(suite, out)
        print()
        print(markdown_table(report["entries"]))
        warned = warnings_markdown(report["entries"])
        if warned:
            print(f"\n{warned}")
        wall = report["run"]["wall_seconds"]
        print(f"\nwrote {out / 'report.json'}, {out / 'report.md'}, {out / 'quality.png'}, {out / 'grid.png'} "
              f"in {wall:.0f} s ({time.strftime('%H:%M:%S', time.gmtime(wall))})")
        return 0

    return run()


# ---------------------------------------------------------------------------------------------------------------
class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (the full usage is one ``--help`` away)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="stepdistill", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an image grid from a diffusers pipeline folder (or 'toy')")
    g.add_argument("--pipeline", required=True, help="diffusers pipeline folder, or 'toy' for the shipped teacher")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--nasa-alpha", type=finite_float, default=None,
                   help="apply --negative-prompt by SNOOPI's NASA attention with this alpha (0.1 for SD1.5) instead of "
                        "CFG; for one-/few-step students at --guidance 1")
    g.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: an exported student's own; 25 for a teacher)")
    g.add_argument("--guidance", type=finite_float, default=None,
                   help="CFG scale (default: an exported student's own, 1; 3 for a teacher)")
    g.add_argument("--num", type=int, default=8, help="number of images (seeds seed..seed+num-1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--scale", type=int, default=1, help="enlarge each image this many times in the grid")
    g.add_argument("--out", required=True, help="output PNG path")
    g.set_defaults(func=cmd_generate)

    di = sub.add_parser("distill", help="distil a teacher into a student with a recipe; exports <out>/student")
    di.add_argument("--pipeline", required=True, help="model choice, e.g. pipelines/toy.yaml")
    di.add_argument("--recipe", required=True, help="method and hyper-parameters, e.g. training/dmd2.yaml")
    di.add_argument("--out", required=True, help="run folder (checkpoints, logs, samples, student)")
    di.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                    help="override recipe values, e.g. --set train.max_steps=50 train.seed=1 (repeatable)")
    di.add_argument("--resume", default=None,
                    help="continue a run: 'latest' (the newest loadable checkpoint), a checkpoint's name "
                         "(step_000600) or a checkpoint folder")
    di.add_argument("--overwrite", action="store_true",
                    help="replace the run already in --out (deletes its checkpoints, logs, samples and student)")
    di.add_argument("--allow-config-change", action="store_true",
                    help="resume a checkpoint although its recipe/pipeline fingerprint differs from this run's")
    di.add_argument("--dry-run", action="store_true",
                    help="validate, print the resolved config and what would happen, and exit (writes nothing)")
    di.add_argument("--no-export", action="store_true", help="skip exporting the student pipeline")
    di.set_defaults(func=cmd_distill)

    rc = sub.add_parser("recipes", help="list the distillation recipes with their method and description")
    rc.add_argument("--dir", default="training", help="recipe folder (default: training/)")
    rc.set_defaults(func=cmd_recipes)

    dc = sub.add_parser("distill-cost", help="the distill-cost benchmark: steps/s and peak memory of each recipe's "
                                             "training step, one process per recipe")
    dc.add_argument("--pipeline", default="pipelines/toy.yaml")
    dc.add_argument("--recipes", nargs="+", default=["training/toy-dmd.yaml", "training/toy-dmd2.yaml",
                                                      "training/toy-vsd.yaml", "training/toy-sid.yaml",
                                                      "training/toy-sid-4step.yaml"])
    dc.add_argument("--steps", type=int, default=20, help="generator steps measured per recipe")
    dc.add_argument("--warmup", type=int, default=3, help="steps left out of the rate")
    dc.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                    help="overrides applied to every recipe, e.g. --set train.batch_size=16 train.seed=1 (repeatable)")
    dc.add_argument("--out", default="runs/distill-cost")
    dc.set_defaults(func=cmd_distill_cost)

    ex = sub.add_parser("export", help="export a run's student as a diffusers pipeline folder")
    ex.add_argument("--run", required=True, help="a `stepdistill distill` output folder")
    ex.add_argument("--checkpoint", default="latest")
    ex.add_argument("--out", default=None, help="output folder (default <run>/student); an existing folder must be "
                                                "an exported student (or empty) unless --overwrite")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace whatever --out holds (never the run folder itself)")
    ex.set_defaults(func=cmd_export)

    mg = sub.add_parser("merge", help="interpolate two students' weights: θ = (1 − λ)·θ_a + λ·θ_b (same base and "
                                      "architecture), one folder, or a --sweep of folders plus a bench suite")
    mg.add_argument("--a", required=True, help="student folder a (λ = 0)")
    mg.add_argument("--b", required=True, help="student folder b (λ = 1)")
    mg.add_argument("--alpha", type=finite_float, default=None, help="λ in [0, 1]")
    mg.add_argument("--sweep", default=None, metavar="L1,L2,...", help="several λ, e.g. 0,0.25,0.5,0.75,1")
    mg.add_argument("--suite", default=None, help="bench suite whose protocol the sweep's front.yaml copies "
                                                  "(default eval/toy-students.yaml)")
    mg.add_argument("--out", required=True, help="output folder (a student folder, or the sweep's folder); an "
                                                 "existing folder must be an exported student (or empty) unless "
                                                 "--overwrite")
    mg.add_argument("--overwrite", action="store_true", help="replace whatever --out holds (never --a or --b)")
    mg.set_defaults(func=cmd_merge)

    d = sub.add_parser("demo", help="the main job on the embedded toy default; writes a report under --out")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--guidance", type=finite_float, default=3.0, help="teacher CFG scale")
    d.add_argument("--samples-per-prompt", type=int, default=4,
                   help="samples for each of the 144 toy prompts (4: 576 per configuration, about 3.7 minutes of "
                        "evaluation on 2 CPU cores; `stepdistill bench --suite eval/toy.yaml` uses 35)")
    d.add_argument("--max-prompts", type=int, default=None,
                   help="evaluate on this many of the 144 toy prompts, evenly spread (a quick look; default: all)")
    d.add_argument("--latency-batch", type=int, default=32)
    d.add_argument("--latency-repeats", type=int, default=3,
                   help="timed calls per configuration (median; the bench uses 5)")
    d.add_argument("--latency-warmup", type=int, default=1, help="untimed calls before the timed ones")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--teacher", default="toy", help="teacher pipeline folder (default: the shipped toy teacher)")
    d.add_argument("--pipeline", default="pipelines/toy.yaml", help="model choice for the distillation")
    d.add_argument("--recipe", default="training/toy-sid-4step.yaml",
                   help="distillation recipe (default: 4-step SiD, which distils in about 2 minutes on 2 CPU cores and "
                        "beats the 4-step CFG teacher; training/toy-dmd.yaml is the one-step DMD student, about 9 "
                        "minutes)")
    d.add_argument("--skip-distill", action="store_true", help="evaluate only (uses <out>/student if present)")
    d.add_argument("--overwrite", action="store_true",
                   help="replace a distillation run of another recipe left in <out>/run")
    d.add_argument("--evaluator", default=None, help="toy evaluator folder (default: the shipped one)")
    d.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="score one pipeline on one prompt set (the bench engine, one entry) -> JSON")
    ev.add_argument("--pipeline", required=True, help="diffusers pipeline folder, or 'toy'")
    ev.add_argument("--prompts", required=True,
                    help="'toy' (the 144 toy prompts), 'hpsv2' (the HPSv2 benchmark prompts), or a .txt / .jsonl / "
                         ".json prompt file")
    ev.add_argument("--steps", type=int, required=True)
    ev.add_argument("--guidance", type=finite_float, required=True)
    ev.add_argument("--metrics", default="toy", help="comma-separated subset of toy,fid,clip,hpsv2 (default: toy)")
    ev.add_argument("--out", required=True, help="output JSON file ({suite, device, entries: [one entry], run})")
    ev.add_argument("--work-dir", default=None, help="where samples are kept for resuming (default: <out stem>_samples "
                                                     "next to --out)")
    ev.add_argument("--name", default="eval", help="entry name in the JSON (e.g. the student's method)")
    ev.add_argument("--suite-name", default=None, help="the JSON's suite field (default: --name)")
    ev.add_argument("--role", choices=("teacher", "student"), default="student")
    ev.add_argument("--samples-per-prompt", type=int, default=4)
    ev.add_argument("--max-prompts", type=int, default=None, help="use this many prompts, spread over the prompt list")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--resolution", type=int, default=None, help="image side passed to the pipeline (default: its own)")
    ev.add_argument("--scheduler", default=None, help="diffusers scheduler class to swap in (from_config)")
    ev.add_argument("--negative-prompt", default=None)
    ev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ev.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    ev.add_argument("--latency-batch", type=int, default=64, help="large batch for the latency; 0 = no latency")
    ev.add_argument("--latency-repeats", type=int, default=5)
    ev.add_argument("--latency-warmup", type=int, default=2)
    ev.add_argument("--toy-evaluator", default=None, help="toy evaluator folder (default: the shipped one)")
    ev.add_argument("--toy-reference-size", type=int, default=None)
    ev.add_argument("--inception", default=None, help="Inception weights file or folder (or $STEPDISTILL_INCEPTION)")
    ev.add_argument("--reference-images", default=None, help="folder of real images for FID")
    ev.add_argument("--reference-stats", default=None, help=".npz reference statistics (cache path with "
                                                            "--reference-images)")
    ev.add_argument("--fid-resize", type=int, default=None, help="resize both sides to this square size before "
                                                                 "Inception (COCO protocol: 256)")
    ev.add_argument("--clip-model", default=None, help="transformers CLIP folder, or open_clip checkpoint file")
    ev.add_argument("--clip-backend", default=None, choices=("transformers", "open_clip"))
    ev.add_argument("--clip-arch", default=None, help="open_clip architecture (default ViT-g-14)")
    ev.add_argument("--hps-checkpoint", default=None)
    ev.add_argument("--hps-version", default=None, choices=("2.0", "2.1"))
    ev.set_defaults(func=cmd_eval)

    bn = sub.add_parser("bench", help="run a benchmark suite (eval/*.yaml); resumable; writes the report under --out")
    bn.add_argument("--suite", required=True, help="suite YAML file, e.g. eval/toy.yaml")
    bn.add_argument("--out", default="runs/bench", help="output folder (samples, report.json, report.md, plots, grid)")
    bn.add_argument("--samples-per-prompt", type=int, default=None, help="override the suite's (recorded in the report)")
    bn.add_argument("--max-prompts", type=int, default=None, help="use this many prompts, spread over the suite's "
                                                                  "(recorded in the report)")
    bn.set_defaults(func=cmd_bench)

    toy = sub.add_parser("toy", help="train the embedded toy teacher / evaluator").add_subparsers(dest="toy_cmd", required=True)
    tt = toy.add_parser("train-teacher", help="train the toy SD teacher and save it as a diffusers folder")
    tt.add_argument("--out", default="assets/toy-teacher")
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--vae-steps", type=int, default=1000)
    tt.add_argument("--unet-steps", type=int, default=5000)
    tt.add_argument("--batch-size", type=int, default=96)
    tt.add_argument("--lr", type=finite_float, default=6e-4)
    tt.add_argument("--vae-cache", default=None,
                    help="folder that keeps the trained VAE: reused if it holds one (a rerun skips the VAE stage)")
    tt.set_defaults(func=cmd_toy_train_teacher)
    te = toy.add_parser("train-evaluator", help="train the toy evaluator (attribute predictor)")
    te.add_argument("--out", default="assets/toy-evaluator")
    te.add_argument("--seed", type=int, default=0)
    te.add_argument("--steps", type=int, default=3000)
    te.set_defaults(func=cmd_toy_train_evaluator)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command if args.command != "toy" else f"toy {args.toy_cmd}"

    def run() -> int:
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
        _set_threads(args.threads)
        _quiet_libraries()
        return int(args.func(args) or 0)

    return _guarded(command, run)


if __name__ == "__main__":
    sys.exit(main())
