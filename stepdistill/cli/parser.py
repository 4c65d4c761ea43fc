"""The argument parser of every subcommand (argparse only: `stepdistill --help` and argument errors load nothing
else). Each subcommand names the module and function that run it; :mod:`stepdistill.cli.entry` imports that module
when the subcommand runs."""

from __future__ import annotations

import argparse
import math

DESCRIPTION = """The ``stepdistill`` command line: distill | export | generate | eval | bench | league | demo | toy."""


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (the full usage is one ``--help`` away)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` are refused: no option here means anything at infinity)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="stepdistill", description=DESCRIPTION)
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
    g.set_defaults(func="stepdistill.cli.generate:cmd_generate")

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
    di.set_defaults(func="stepdistill.cli.distill:cmd_distill")

    rc = sub.add_parser("recipes", help="list the distillation recipes with their method and description")
    rc.add_argument("--dir", default="training", help="recipe folder (default: training/)")
    rc.set_defaults(func="stepdistill.cli.recipes:cmd_recipes")

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
    dc.set_defaults(func="stepdistill.cli.distill_cost:cmd_distill_cost")

    gs = sub.add_parser("gpu-scale", add_help=False,
                        help="the gpu-scale benchmark: the DMD2 training step at SD1.5 size, bf16, on a GPU (options: "
                             "stepdistill gpu-scale --help)")
    gs.set_defaults(func="stepdistill.cli.gpu_scale:cmd_gpu_scale", passes_options_on=True)

    ex = sub.add_parser("export", help="export a run's student as a diffusers pipeline folder")
    ex.add_argument("--run", required=True, help="a `stepdistill distill` output folder")
    ex.add_argument("--checkpoint", default="latest")
    ex.add_argument("--out", default=None, help="output folder (default <run>/student); an existing folder must be "
                                                "an exported student (or empty) unless --overwrite")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace whatever --out holds (never the run folder itself)")
    ex.set_defaults(func="stepdistill.cli.export:cmd_export")

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
    mg.set_defaults(func="stepdistill.cli.merge:cmd_merge")

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
    d.set_defaults(func="stepdistill.cli.demo:cmd_demo")

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
    ev.set_defaults(func="stepdistill.cli.eval:cmd_eval")

    bn = sub.add_parser("bench", help="run a benchmark suite (eval/*.yaml); resumable; writes the report under --out")
    bn.add_argument("--suite", required=True, help="suite YAML file, e.g. eval/toy.yaml")
    bn.add_argument("--out", default="runs/bench", help="output folder (samples, report.json, report.md, plots, grid)")
    bn.add_argument("--samples-per-prompt", type=int, default=None, help="override the suite's (recorded in the report)")
    bn.add_argument("--max-prompts", type=int, default=None, help="use this many prompts, spread over the suite's "
                                                                  "(recorded in the report)")
    bn.set_defaults(func="stepdistill.cli.bench:cmd_bench")

    lg = sub.add_parser("league", help="every method of a league file distilled under one budget of training FLOPs, "
                                       "judged at 25/50/100%% of it on a held-out seed; resumable")
    lg.add_argument("--suite", default="eval/league.yaml", help="league file (default: eval/league.yaml)")
    lg.add_argument("--budget", default="quick", help="which of the file's budgets: quick (default) or full")
    lg.add_argument("--out", default="runs/league", help="output folder (league.json, tables.md, convergence.png, "
                                                         "one folder per entry); run again to resume")
    lg.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these entries")
    lg.add_argument("--workers", type=int, default=1, help="processes sharing the entries, each with its share of "
                                                           "--threads (default 1; on 2 CPU cores, 2 workers of one "
                                                           "thread train about 1.45x as fast as 1 of two threads)")
    lg.set_defaults(func="stepdistill.cli.league:cmd_league")

    toy = sub.add_parser("toy", help="train the embedded toy teachers / evaluator").add_subparsers(dest="toy_cmd", required=True)
    tt = toy.add_parser("train-teacher", help="train the toy SD teacher and save it as a diffusers folder")
    tt.add_argument("--out", default="assets/toy-teacher")
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--vae-steps", type=int, default=1000)
    tt.add_argument("--unet-steps", type=int, default=5000)
    tt.add_argument("--batch-size", type=int, default=96)
    tt.add_argument("--lr", type=finite_float, default=6e-4)
    tt.add_argument("--vae-cache", default=None,
                    help="folder that keeps the trained VAE: reused if it holds one (a rerun skips the VAE stage)")
    tt.set_defaults(func="stepdistill.cli.toy:cmd_toy_train_teacher")
    tf = toy.add_parser("train-flow-teacher", help="train the toy flow-matching teacher (an SD3 pipeline on the toy "
                                                   "teacher's VAE and text encoder) and save it as a diffusers folder")
    tf.add_argument("--out", default="assets/toy-flow-teacher")
    tf.add_argument("--seed", type=int, default=2)
    tf.add_argument("--steps", type=int, default=6000)
    tf.add_argument("--batch-size", type=int, default=64)
    tf.add_argument("--lr", type=finite_float, default=5e-4)
    tf.add_argument("--num-latents", type=int, default=60_000, help="toy-world images encoded by the VAE once")
    tf.add_argument("--width", type=int, default=160, help="the transformer's width (attention heads of 32 channels)")
    tf.add_argument("--num-layers", type=int, default=5, help="the transformer's joint (MMDiT) blocks")
    tf.add_argument("--link-shared", action="store_true",
                    help="store the VAE and the second text encoder, byte-identical copies, as relative symbolic links "
                         "(to the toy teacher's VAE and to text_encoder); used for the folder shipped under assets/")
    tf.add_argument("--train-text-encoders", action="store_true",
                    help="train the two CLIP text encoders jointly (default: frozen, as loaded from the toy teacher)")
    tf.add_argument("--init-from", default=None,
                    help="continue from a folder this command wrote (its transformer; pass another --seed for a "
                         "fresh data draw)")
    tf.set_defaults(func="stepdistill.cli.toy:cmd_toy_train_flow_teacher")
    te = toy.add_parser("train-evaluator", help="train the toy evaluator (attribute predictor)")
    te.add_argument("--out", default="assets/toy-evaluator")
    te.add_argument("--seed", type=int, default=0)
    te.add_argument("--steps", type=int, default=3000)
    te.set_defaults(func="stepdistill.cli.toy:cmd_toy_train_evaluator")
    return parser
