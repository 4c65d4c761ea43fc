"""The toy evaluation path and a tiny end-to-end distill -> export -> load run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO
from tiny_models import make_tiny_teacher_spec

from stepdistill.eval.report import REQUIRED_KEYS, markdown_table, nfe, write_report
from stepdistill.toy import world
from stepdistill.toy.assets import TOY_EVALUATOR


@pytest.mark.skipif(not TOY_EVALUATOR.is_dir(), reason="toy evaluator asset not present")
def test_toy_judge_scores_real_images_as_perfect_and_noise_as_bad():
    from stepdistill.eval.toy_metrics import ToyJudge

    judge = ToyJudge(reference_size=2000)
    prompts = [p for p in world.all_prompts()[:24] for _ in range(4)]
    real, _ = world.sample(77, len(prompts), prompts=prompts)
    good = judge.score(torch.from_numpy(real), prompts)
    assert good["adherence"] == 1.0 and good["adherence_all"] == 1.0
    # same prompts' real images: spread equals the real spread up to sampling noise
    assert all(0.6 < v < 1.6 for v in good["coverage"].values())
    collapsed = torch.from_numpy(np.repeat(real[::4], 4, axis=0))  # one image per prompt, repeated: mode collapse
    bad = judge.score(collapsed, prompts)
    assert bad["diversity"] < 1e-6 and max(bad["coverage"].values()) < 1e-3
    # FID_toy: fresh real images drawn like the reference are close to it; noise is far
    uniform, attrs = world.sample(78, 600)
    real_fid = judge.score(torch.from_numpy(uniform), attrs.prompts())["fid"]
    noise = torch.rand(600, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    worse = judge.score(noise, attrs.prompts())
    assert worse["fid"] > 10 * real_fid and worse["adherence"] < 0.6


def test_report_format(tmp_path):
    entry = {"name": "teacher", "role": "teacher", "steps": 4, "guidance": 3.0, "nfe": nfe(4, 3.0), "fid": 12.5,
             "fid_features": "toy", "adherence": 0.9, "diversity": 0.05, "num_samples": 10,
             "latency_ms": {"batch1": 20.0, "batchN": 5.0, "n": 64}}
    assert entry["nfe"] == 8 and nfe(1, 1.0) == 1
    report = write_report(tmp_path, "unit", [entry, {**entry, "name": "dmd2", "role": "student", "steps": 1,
                                                     "guidance": 1.0, "nfe": 1}])
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report)) and on_disk["suite"] == "unit"
    assert set(REQUIRED_KEYS) <= set(on_disk["entries"][0])
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert "| dmd2 | student | 1 |" in markdown_table(on_disk["entries"])
    with pytest.raises(ValueError, match="lacks"):
        write_report(tmp_path / "bad", "unit", [{"name": "x"}])


def test_distill_export_and_plain_diffusers_load(tmp_path):
    from stepdistill.eval.generate import generate, load_pipeline
    from stepdistill.workflows.distill import distill, export_run

    spec = make_tiny_teacher_spec(tmp_path)
    summary = distill(spec, REPO / "training" / "toy-dmd2.yaml", tmp_path / "run",
                      overrides=["train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=1",
                                 "train.sample_every=0", "objective_config.aux_updates_per_generator_update=1",
                                 "objective_config.gan_enabled=false", "objective_config.regression_pairs=4"])
    assert summary["steps"] == 2 and Path(summary["student"]).is_dir()
    again = export_run(tmp_path / "run", tmp_path / "student2")
    pipe = load_pipeline(again)
    images = generate(pipe, ["a red circle"] * 2, [0, 1], steps=1, guidance=1.0, progress=False)
    assert images.shape[0] == 2 and images.min() >= -1 and images.max() <= 1
    with pytest.raises(ValueError, match="unknown key"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("teacher: toy\nteachr: x\n")
        distill(bad, REPO / "training" / "toy-dmd2.yaml", tmp_path / "run2")


@pytest.mark.parametrize("recipe", ["dmd.yaml", "dmd2.yaml", "vsd.yaml", "sid-lsg.yaml", "toy-dmd.yaml", "toy-dmd2.yaml",
                                    "toy-vsd.yaml", "toy-sid.yaml", "toy-sid-4step.yaml", "toy-dmd2-4step.yaml",
                                    "phased-dmd.yaml", "toy-phased-dmd.yaml"])
def test_every_shipped_recipe_runs_a_step(tmp_path, recipe):
    """The SD1.5 and toy recipes run end to end on a tiny teacher (DMD with its regression pairs wired in by run.py)."""
    from stepdistill.workflows.distill import distill

    spec = make_tiny_teacher_spec(tmp_path)
    overrides = ["train.max_steps=1", "train.batch_size=2", "train.sample_every=0", "train.checkpoint_every=1",
                 "train.mixed_precision=no", "train.gradient_checkpointing=false",
                 "objective_config.aux_updates_per_generator_update=1"]
    if recipe.endswith("vsd.yaml"):
        overrides.append("objective_config.fake_lora_rank=4")
    if recipe == "sid-lsg.yaml":  # 32 accumulation rounds, and LAION captions this checkout does not ship
        overrides += ["train.grad_accum=1", "prompts.source=toy"]
    if recipe in ("toy-dmd.yaml", "toy-dmd2.yaml"):  # both warm up on teacher ODE pairs: make only a few
        overrides.append("objective_config.regression_pairs=4")
    if recipe in ("toy-dmd2.yaml", "toy-dmd2-4step.yaml"):  # the tiny teacher has no real images for the GAN term
        overrides.append("objective_config.gan_enabled=false")
    steps = 1
    if "phased" in recipe:  # every one of the 4 phases must run: one update each
        steps = 4
        overrides += ["train.max_steps=4", "objective_config.updates_per_phase=1"]
    summary = distill(spec, REPO / "training" / recipe, tmp_path / "run", overrides=overrides, export=False)
    assert summary["steps"] == steps
    rows = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()
    assert len(rows) >= 2 and "loss/generator" in rows[0]


@pytest.mark.parametrize("method", ["dmd", "dmd2"])
def test_ode_warmup_phase_then_distribution_matching(tmp_path, method):
    """``stepdistill distill`` makes the teacher ODE pairs for a warm-up, runs the warm-up updates without fake-score
    updates, then switches to distribution matching (metrics.csv shows both phases)."""
    import csv

    from stepdistill.workflows.distill import distill

    spec = make_tiny_teacher_spec(tmp_path)
    overrides = ["train.max_steps=3", "train.batch_size=2", "train.sample_every=0", "train.checkpoint_every=1",
                 "train.log_every=1", "objective_config.aux_updates_per_generator_update=1",
                 "objective_config.ode_warmup_steps=2", "objective_config.regression_pairs=4",
                 "objective_config.regression_steps=2", "generator.timesteps=[399]"]
    if method == "dmd2":
        overrides.append("objective_config.gan_enabled=false")
    summary = distill(spec, REPO / "training" / f"toy-{method}.yaml", tmp_path / "run", overrides=overrides,
                      export=False)
    assert summary["steps"] == 3 and summary["regression_pairs_seconds"] >= 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    assert [r["gen/ode_warmup"] for r in rows] == ["1.0", "1.0", ""]
    assert [bool(r["aux/loss_fake"]) for r in rows] == [False, False, True]
    assert rows[2]["gen/loss_dm"] != ""
    # resumed past the warm-up: DMD2 no longer uses the pairs and does not make them again; DMD's regression term does
    again = distill(spec, REPO / "training" / f"toy-{method}.yaml", tmp_path / "run",
                    overrides=[*overrides, "train.max_steps=4"], resume="step_000003", export=False)
    assert again["steps"] == 4
    assert ("regression_pairs_seconds" in again) == (method == "dmd")
    # a run's checkpoint can be named without its path
    from stepdistill.workflows.distill import export_run

    student = export_run(tmp_path / "run", tmp_path / "student_at_3", checkpoint="step_000003")
    info = json.loads((student / "stepdistill_export.json").read_text())
    assert info["steps_info"]["steps"] == 3 and info["steps_info"]["checkpoint"].endswith("step_000003")


def test_regression_pairs_follow_the_batch_to_the_training_device():
    """The trainer makes noise on the CPU and ``build_batch`` moves the batch to the training device; the teacher
    pairs must land on that device too, not on the CPU noise's (this broke every warm-up run on a GPU). The ``meta``
    device stands in for a GPU here."""
    from stepdistill.objectives.dmd import RegressionPairs
    from stepdistill.models.conditioning import PromptEmbeds
    from stepdistill.workflows.distill import with_regression_pairs

    class FakeTeacher:
        def encode_prompt(self, prompts, with_uncond=True):
            return PromptEmbeds(cond=torch.zeros(len(prompts), 3, 8))

    pairs = RegressionPairs(torch.randn(5, 4, 8, 8), PromptEmbeds(cond=torch.randn(5, 3, 8)), torch.randn(5, 4, 8, 8))
    from stepdistill.training.batches import build_batch

    batch = with_regression_pairs(pairs, build_batch)(FakeTeacher(), ["a", "b"], torch.randn(2, 4, 8, 8),
                                                      device="meta")
    assert batch.noise.device.type == "meta"
    assert {batch.pairs.noise.device.type, batch.pairs.latents.device.type, batch.pairs.embeds.cond.device.type} == {"meta"}
    assert batch.pairs.noise.shape == (2, 4, 8, 8)


def test_demo_distillation_line_reports_pairs_and_total():
    from stepdistill.workflows.demo import distill_line as _distill_line

    line = _distill_line({"steps": 660, "wall_time_s": 301.4, "steps_per_s": 2.19, "regression_pairs_seconds": 80.2,
                          "total_seconds": 395.0})
    assert line == ("660 generator steps: training loop 301 s (2.19 steps/s); teacher ODE pairs 80 s; "
                    "395 s in all with set-up")
    assert "pairs" not in _distill_line({"steps": 3, "wall_time_s": 1.0, "steps_per_s": 3.0})


def test_demo_is_a_suite_of_its_configurations(tmp_path):
    """The demo evaluates through the suite runner: its suite holds the teacher without CFG at the student's step
    count, the CFG teacher at 1/4/25 steps, then the student, on the demo's prompts, batching, device and latency
    settings; impossible options are refused before anything is written."""
    from stepdistill.eval.suite import LatencySpec
    from stepdistill.workflows.demo import DemoOptions, demo_prompts, demo_suite, run_demo

    options = DemoOptions(out=tmp_path / "demo", max_prompts=8, samples_per_prompt=3, latency_batch=4,
                          latency_repeats=2, latency_warmup=0, guidance=2.5)
    suite = demo_suite(options)  # no student folder: the teacher rows only, the student's NFE taken as 1
    assert [(c.name, c.role, c.steps, c.guidance) for c in suite.configurations()] == [
        ("teacher", "teacher", 1, 1.0), ("teacher", "teacher", 1, 2.5), ("teacher", "teacher", 4, 2.5),
        ("teacher", "teacher", 25, 2.5)]
    assert suite.prompts == demo_prompts(8) == world.all_prompts()[::18][:8]
    assert suite.metrics == ("toy",) and suite.samples_per_prompt == 3 and suite.seed == 0
    assert suite.batch_size == 256 and suite.device == "cpu" and suite.latency == LatencySpec(4, 2, 0)
    assert len(demo_prompts()) == 144
    for bad in (dict(samples_per_prompt=1), dict(max_prompts=0)):
        with pytest.raises(ValueError, match="must be"):
            run_demo(DemoOptions(out=tmp_path / "bad", skip_distill=True, **bad))
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(not TOY_EVALUATOR.is_dir(), reason="toy evaluator asset not present")
def test_demo_evaluates_a_few_step_student_at_its_own_steps(tmp_path):
    """`stepdistill demo --skip-distill` on a 4-step SiD-style student (the teacher's weights, no training): the student
    is scored at 4 steps, and the teacher runs at 4 steps without CFG, so the end-to-end latency ideal exists."""
    from stepdistill.cli import main
    from stepdistill.export.students import export_student
    from stepdistill.models.generators import Generator
    from stepdistill.models.teacher import Teacher
    from stepdistill.toy.assets import TOY_TEACHER

    teacher = Teacher.load(TOY_TEACHER)
    generator = Generator.from_teacher(teacher, timesteps=[599, 449, 299, 149], scaled_input_noise=True)
    export_student(teacher, generator, tmp_path / "demo" / "student", method="sid", ema=None)
    assert main(["demo", "--out", str(tmp_path / "x"), "--skip-distill", "--samples-per-prompt", "1"]) == 2
    assert not (tmp_path / "x").exists()
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--skip-distill", "--samples-per-prompt", "2", "--max-prompts", "8",
               "--latency-batch", "4", "--latency-repeats", "1", "--latency-warmup", "0"])
    assert rc == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    configs = {(e["role"], e["steps"], e["guidance"]) for e in report["entries"]}
    assert ("student", 4, 1.0) in configs and ("teacher", 4, 1.0) in configs and ("teacher", 1, 1.0) not in configs
    student = next(e for e in report["entries"] if e["role"] == "student")
    assert student["name"] == "sid" and student["nfe"] == 4 and student["num_samples"] == 16
    (speedup,) = report["speedups"]
    assert speedup["end_to_end_ideal"] is not None and speedup["nfe_ratio"] == 12.5  # vs the 25-step CFG teacher


