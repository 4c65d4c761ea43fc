"""Multi-student distillation (stepdistill/workflows/multi_student.py): one run trains a student per router subset, the
export routes a mixed batch in plain diffusers (a process that never imports stepdistill), resume skips finished
students and a resumed run equals an uninterrupted one; smaller students through TSM; the SD1.5 recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import PAIRS, QUICK, REPO, cli, trainable_states
from plain_diffusers import run_without_stepdistill
from tiny_models import make_tiny_sd_pipeline, make_tiny_teacher_spec

PROMPTS = ["a small red cross on a gray background", "a large blue circle on a white background",
           "a small green triangle on a black background", "a large yellow square on a gray background",
           "a small purple circle on a black background"]

_RUNNER = r"""
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
spec = json.loads(open(sys.argv[1]).read())
pipe = DiffusionPipeline.from_pretrained(spec["folder"], trust_remote_code=True, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
latents = torch.from_numpy(np.load(spec["latents"]))
embeds, _ = pipe.encode_prompt(spec["prompts"], "cpu", 1, False)
routes = pipe.route(spec["prompts"], embeds)
images = pipe(spec["prompts"], num_inference_steps=1, guidance_scale=1.0, latents=latents, output_type="np").images
np.save(spec["images"], images)
try:
    pipe(spec["prompts"][:1], num_inference_steps=4)
    wrong = ""
except ValueError as e:
    wrong = str(e)
json.dump({"class": type(pipe).__name__, "routes": routes, "students": len(pipe.students), "wrong_steps": wrong},
          open(spec["report"], "w"))
"""


def test_msd_trains_one_student_per_shape_exports_a_routed_folder_and_resumes(tmp_path):
    from stepdistill.eval.generate import load_pipeline
    from stepdistill.models.router import load_router
    from stepdistill.workflows.distill import distill

    spec = make_tiny_teacher_spec(tmp_path)
    overrides = ["train.max_steps=2", "train.batch_size=2", "train.sample_every=0", "train.checkpoint_every=1",
                 "objective_config.aux_updates_per_generator_update=1", "objective_config.ode_warmup_steps=1",
                 "objective_config.regression_pairs=4", "objective_config.regression_steps=2",
                 "objective_config.gan_enabled=false"]
    summary = distill(spec, REPO / "training" / "toy-msd.yaml", tmp_path / "run", overrides=overrides)
    run = tmp_path / "run"
    assert [s["prompts"] for s in summary["students"]] == [36, 36, 36, 36]
    for k, shape in enumerate(["circle", "square", "triangle", "cross"]):
        subset = (run / f"student_{k}" / "prompts.txt").read_text().split("\n")[:-1]
        assert subset and all(shape in p for p in subset)
        assert summary["students"][k]["steps"] == 2
        assert {"loss/generator", "loss/aux"} <= set(summary["students"][k]["final_losses"])
    folder = Path(summary["student"])
    assert "trust_remote_code=True" in (folder / "README.md").read_text()

    latents = torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "latents.npy", latents.numpy())
    spec_run = {"folder": str(folder), "prompts": PROMPTS, "latents": str(tmp_path / "latents.npy"),
                "images": str(tmp_path / "images.npy"), "report": str(tmp_path / "report.json")}
    report = run_without_stepdistill(_RUNNER, spec_run, tmp_path)
    assert report["stepdistill_modules"] == [] and report["class"] == "MultiStudentPipeline"
    assert report["students"] == 4 and "one-step" in report["wrong_steps"]
    router = load_router(run / "router.json")
    assert report["routes"] == router.route(PROMPTS) == [3, 0, 2, 1, 0]
    # each row equals its own student's exported single-student pipeline on the same noise
    got = np.load(tmp_path / "images.npy")
    for i, (prompt, k) in enumerate(zip(PROMPTS, report["routes"])):
        single = load_pipeline(run / f"student_{k}" / "student")
        want = single([prompt], timesteps=[399], guidance_scale=1.0, latents=latents[i:i + 1],
                      output_type="np").images
        assert np.abs(got[i] - want[0]).max() < 1e-4, (i, k)

    logs: list[str] = []
    again = distill(spec, REPO / "training" / "toy-msd.yaml", run, overrides=overrides, resume="latest",
                    log=logs.append)
    assert sum("finished earlier" in line for line in logs) == 4
    assert [s["steps"] for s in again["students"]] == [2, 2, 2, 2]
    assert json.loads((run / "msd_summary.json").read_text())["students"][0]["prompts"] == 36


def test_tsm_loss_gradient_matches_the_formula_computed_by_hand():
    """L_TSM = mean ‖ε_θ(x_t, t, c) − ε_teacher(x_t, t, c)‖², x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε: the gradient on a tiny
    narrower UNet equals the one computed from the scheduler's ᾱ and raw UNet calls."""
    from stepdistill.models.teacher import Teacher
    from stepdistill.training.tsm import narrow_unet, tsm_loss

    teacher = Teacher(make_tiny_sd_pipeline())
    student = narrow_unet(teacher.unet, {"block_out_channels": [32, 32]})
    assert list(student.config.block_out_channels) == [32, 32]
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500, 990])
    embeds = teacher.encode_prompt(PROMPTS[:3], with_uncond=False)
    loss = tsm_loss(student, teacher, x0, noise, t, embeds)
    got = torch.autograd.grad(loss, list(student.parameters()))

    acp = teacher.pipeline.scheduler.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    x_t = (acp.sqrt() * x0.double() + (1 - acp).sqrt() * noise.double()).float()
    with torch.no_grad():
        target = teacher.unet(x_t, t, encoder_hidden_states=embeds.cond).sample
    pred = student(x_t, t, encoder_hidden_states=embeds.cond).sample
    want = torch.autograd.grad(((pred - target) ** 2).mean(), list(student.parameters()))
    assert abs(loss.item() - ((pred - target) ** 2).mean().item()) < 1e-5
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_narrow_unet_refuses_a_config_that_cannot_be_built():
    import pytest

    from stepdistill.models.teacher import Teacher
    from stepdistill.training.tsm import narrow_unet

    unet = Teacher(make_tiny_sd_pipeline()).unet
    with pytest.raises(ValueError, match="norm_num_groups"):
        narrow_unet(unet, {"block_out_channels": [16, 32]})
    with pytest.raises(ValueError, match="not a key"):
        narrow_unet(unet, {"block_channels": [32, 32]})


def test_smaller_students_run_tsm_then_dmd2_from_their_own_narrow_unet(tmp_path):
    """student_unet + tsm: each student is a narrower UNet, trained by TSM (saved as tsm_unet), then distilled from it
    (generator.init_unet); the routed export holds the narrow UNets and runs; a rerun reuses the TSM stage."""
    import yaml

    from stepdistill.workflows.distill import distill

    spec = make_tiny_teacher_spec(tmp_path)
    recipe = yaml.safe_load((REPO / "training" / "toy-msd-small.yaml").read_text())
    recipe["multi_student"]["student_unet"] = {"block_out_channels": [32, 32]}
    recipe["multi_student"]["tsm"] = {"steps": 3, "batch_size": 2, "data": "teacher", "teacher_samples": 4,
                                      "teacher_steps": 2}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(recipe))
    overrides = ["train.max_steps=2", "train.batch_size=2", "train.sample_every=0", "train.checkpoint_every=1",
                 "objective_config.aux_updates_per_generator_update=1", "objective_config.ode_warmup_steps=1",
                 "objective_config.regression_pairs=4", "objective_config.regression_steps=2",
                 "objective_config.gan_enabled=false"]
    summary = distill(spec, tmp_path / "small.yaml", tmp_path / "run", overrides=overrides)
    run = tmp_path / "run"
    for k, s in enumerate(summary["students"]):
        assert s["tsm"]["steps"] == 3 and s["tsm"]["data"] == "teacher"
        assert s["tsm"]["parameters"] < s["tsm"]["teacher_parameters"]
        config = json.loads((run / f"student_{k}" / "student" / "unet" / "config.json").read_text())
        assert config["block_out_channels"] == [32, 32]
        run_config = yaml.safe_load((run / f"student_{k}" / "run_config.yaml").read_text())
        assert run_config["generator"]["init_unet"] == str(run / f"student_{k}" / "tsm_unet")
    latents = torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "latents.npy", latents.numpy())
    spec_run = {"folder": summary["student"], "prompts": PROMPTS, "latents": str(tmp_path / "latents.npy"),
                "images": str(tmp_path / "images.npy"), "report": str(tmp_path / "report.json")}
    report = run_without_stepdistill(_RUNNER, spec_run, tmp_path)
    assert report["students"] == 4 and np.isfinite(np.load(tmp_path / "images.npy")).all()

    (run / "student_2" / "distill_summary.json").unlink()  # student 2 was interrupted after its TSM stage
    logs: list[str] = []
    distill(spec, tmp_path / "small.yaml", run, overrides=overrides, resume="latest", log=logs.append)
    assert sum("TSM done earlier" in line for line in logs) == 1


def test_sd15_msd_recipe_trains_a_step_per_kmeans_student(tmp_path):
    """training/msd.yaml (SD1.5 DMD2 values, k-means router) runs end to end on a tiny teacher."""
    from stepdistill.workflows.distill import distill

    spec = make_tiny_teacher_spec(tmp_path)
    overrides = ["train.max_steps=1", "train.batch_size=2", "train.sample_every=0", "train.checkpoint_every=1",
                 "train.mixed_precision=no", "train.gradient_checkpointing=false", "prompts.source=toy",
                 "objective_config.aux_updates_per_generator_update=1"]
    summary = distill(spec, REPO / "training" / "msd.yaml", tmp_path / "run", overrides=overrides, export=False)
    assert summary["router"] == {"kind": "kmeans", "num_students": 4}
    assert len(summary["students"]) == 4 and all(s["steps"] == 1 for s in summary["students"])
    assert sum(s["prompts"] for s in summary["students"]) == 144


# --- a resumed MSD run equals an uninterrupted one; a dry run writes nothing ------------------------------------------
MSD = [*QUICK, *PAIRS, "objective_config.gan_enabled=false", "train.checkpoint_every=1", "train.keep_checkpoints=5"]


def test_msd_resume_continues_started_students_checks_finished_ones_and_equals_one_run(spec, tmp_path, monkeypatch):
    import torch

    from stepdistill.training import trainer as trainer_module
    from stepdistill.workflows.distill import distill
    from stepdistill.training.runfolder import RunFolderError

    recipe = REPO / "training" / "toy-msd.yaml"
    distill(spec, recipe, tmp_path / "whole", overrides=[*MSD, "train.max_steps=2"], export=False, log=lambda *a: None)

    # interrupted: students 0-1 finish one update, student 2 dies before its first checkpoint, student 3 never starts
    run = tmp_path / "killed"
    original = trainer_module.Trainer._update

    def dies_in_student_2(self, turn, update):
        if self.out_dir.name == "student_2":
            raise KeyboardInterrupt("killed")
        return original(self, turn, update)

    monkeypatch.setattr(trainer_module.Trainer, "_update", dies_in_student_2)
    with pytest.raises(KeyboardInterrupt):
        distill(spec, recipe, run, overrides=[*MSD, "train.max_steps=1"], export=False, log=lambda *a: None)
    monkeypatch.setattr(trainer_module.Trainer, "_update", original)
    assert (run / "student_2" / "run.json").is_file() and not (run / "student_3").exists()

    # a finished student trained with another configuration is not skipped silently
    with pytest.raises(RunFolderError, match="real_guidance_scale"):
        distill(spec, recipe, run, overrides=[*MSD, "train.max_steps=2", "objective_config.real_guidance_scale=5"],
                resume="latest", export=False, log=lambda *a: None)
    # --resume latest: students 0-1 continue from update 1 to 2, student 2 starts (it had no checkpoint), 3 starts
    lines = []
    distill(spec, recipe, run, overrides=[*MSD, "train.max_steps=2"], resume="latest", export=False, log=lines.append)
    assert any(line.startswith("[msd] student 1 of 4") for line in lines)
    assert not any("student 0 of" in line or "student 5 of" in line for line in lines)
    whole, resumed = trainable_states(tmp_path / "whole"), trainable_states(run)
    final = [k for k in whole if k.endswith("step_000002/trainable_state.pt")]
    assert len(final) == 4
    for where in final:
        for key in whole[where]:
            assert torch.equal(whole[where][key], resumed[where][key]), f"{where} {key}"


def test_msd_dry_run_writes_nothing(spec, tmp_path):
    proc = cli("distill", "--pipeline", str(spec), "--recipe", str(REPO / "training" / "toy-msd.yaml"), "--out",
               str(tmp_path / "msd"), "--dry-run", "--set", *MSD, "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "student 1 of 4" in proc.stdout and "student 4 of 4" in proc.stdout and "fresh" in proc.stdout
    assert not (tmp_path / "msd").exists()
