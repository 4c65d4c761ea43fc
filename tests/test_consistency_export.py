"""Consistency students (LCM with a guidance embedding, LCM-LoRA on the teacher's shared base, TCD) exported as
plain StableDiffusionPipeline folders: in a process that never imports stepdistill, the model card's call with
diffusers' own LCMScheduler / TCDScheduler reproduces the generator's samples at 1, 2 and 4 steps, and the LoRA
file loads on the teacher pipeline with ``LCMScheduler.from_config(pipe.scheduler.config)``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from plain_diffusers import run_without_stepdistill
from reference_maths import perturb_
from tiny_models import make_tiny_sd_pipeline

from stepdistill.export import export_student
from stepdistill.export.loading import check_student_call
from stepdistill.models.generators import ConsistencyGenerator
from stepdistill.models.teacher import Teacher

PROMPT = "a small red circle"
STEP_SEED = 5
STEPS = (1, 2, 4)
CASES = ("lcm", "lcm_lora", "tcd")

_RUNNER = r"""
import json, sys
import numpy as np, torch
from diffusers import LCMScheduler, StableDiffusionPipeline

spec = json.load(open(sys.argv[1]))
noise = torch.from_numpy(np.load(spec["latents"]))

def run(pipe, steps, guidance, extra):
    pipe.set_progress_bar_config(disable=True)
    return pipe(spec["prompt"], latents=noise.clone(), num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(spec["step_seed"]), output_type="latent", **extra).images.numpy()

out = {}
for case in spec["cases"]:
    pipe = StableDiffusionPipeline.from_pretrained(case["folder"], local_files_only=True)
    out[case["name"]] = {"scheduler": type(pipe.scheduler).__name__,
                         "time_cond_proj_dim": pipe.unet.config.time_cond_proj_dim}
    for steps in spec["steps"]:
        np.save(case["result"] + f".{steps}.npy", run(pipe, steps, case["guidance_scale"], case["extra"]))

lora = spec["lora"]
base = StableDiffusionPipeline.from_pretrained(lora["teacher"], local_files_only=True)
base.scheduler = LCMScheduler.from_config(base.scheduler.config)
np.save(lora["before"], run(base, 2, 1.0, {}))
base.load_lora_weights(lora["folder"])
np.save(lora["after"], run(base, 2, 1.0, {}))
json.dump(out, open(spec["report"], "w"))
"""


def _student(teacher: Teacher, case: str) -> ConsistencyGenerator:
    torch.manual_seed(1)
    if case == "lcm_lora":
        gen = ConsistencyGenerator.from_teacher(teacher, 4, lora_rank=4, share_teacher_base=True)
        perturb_(gen.unet, std=0.05, only="lora_B")  # LoRA B starts at zero: make the adapter do something
        return gen
    gen = ConsistencyGenerator.from_teacher(teacher, 4, sampler="tcd" if case == "tcd" else "lcm",
                                            gamma=0.3, guidance_scale=3.0, guidance_embedding_dim=32)
    perturb_(gen.unet, std=0.01)
    return gen


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency-export")
    make_tiny_sd_pipeline(root / "teacher", seed=0)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    np.save(root / "latents.npy", noise.numpy())
    cases, refs, infos, students = [], {}, {}, {}
    for case in CASES:
        teacher = Teacher.load(root / "teacher")  # each its own: the LoRA student's adapter sits on its UNet
        gen = _student(teacher, case)
        folder = export_student(teacher, gen, root / case, method=case.replace("_", "-"), example_prompt=PROMPT)
        info = json.loads((folder / "stepdistill_export.json").read_text())
        infos[case], students[case] = info, (teacher, gen)
        cases.append({"name": case, "folder": str(folder), "result": str(root / case),
                      "guidance_scale": info["guidance_scale"], "extra": info["call_kwargs"]})
        embeds = teacher.encode_prompt([PROMPT], with_uncond=False)
        for steps in STEPS:
            refs[case, steps] = gen.sample(noise, embeds, generator=torch.Generator().manual_seed(STEP_SEED),
                                           num_inference_steps=steps).numpy()
    spec = {"prompt": PROMPT, "latents": str(root / "latents.npy"), "step_seed": STEP_SEED, "steps": list(STEPS),
            "cases": cases, "report": str(root / "report.json"),
            "lora": {"teacher": str(root / "teacher"), "folder": str(root / "lcm_lora"),
                     "before": str(root / "lora_before.npy"), "after": str(root / "lora_after.npy")}}
    report = run_without_stepdistill(_RUNNER, spec, root)
    return {"root": root, "refs": refs, "report": report, "infos": infos, "students": students}


@pytest.mark.parametrize("case", CASES)
def test_exported_consistency_pipeline_reproduces_the_student_at_any_step_count(exported, case):
    report = exported["report"][case]
    assert report["scheduler"] == ("TCDScheduler" if case == "tcd" else "LCMScheduler")
    assert report["time_cond_proj_dim"] == (None if case == "lcm_lora" else 32)
    for steps in STEPS:
        ref = exported["refs"][case, steps]
        got = np.load(exported["root"] / f"{case}.{steps}.npy")
        err = np.abs(got - ref).max() / max(1.0, np.abs(ref).max())
        assert err < 1e-5, (steps, err)


def test_the_comparison_is_not_vacuous(exported):
    """The step count, the guidance embedding and TCD's γ each change the sample."""
    refs = exported["refs"]
    assert np.abs(refs["lcm", 1] - refs["lcm", 4]).max() > 1e-3
    teacher, gen = exported["students"]["lcm"]
    noise = torch.from_numpy(np.load(exported["root"] / "latents.npy"))
    embeds = teacher.encode_prompt([PROMPT], with_uncond=False)
    gen.guidance_scale = 6.0
    other = gen.sample(noise, embeds, generator=torch.Generator().manual_seed(STEP_SEED), num_inference_steps=4)
    gen.guidance_scale = 3.0
    assert np.abs(other.numpy() - refs["lcm", 4]).max() > 1e-4
    teacher, tcd = exported["students"]["tcd"]
    tcd.gamma = 0.0
    other = tcd.sample(noise, embeds, generator=torch.Generator().manual_seed(STEP_SEED), num_inference_steps=4)
    tcd.gamma = 0.3
    assert np.abs(other.numpy() - refs["tcd", 4]).max() > 1e-4


def test_lcm_lora_file_loads_on_the_teacher_pipeline_with_lcm_scheduler(exported):
    root = exported["root"]
    before, after = np.load(root / "lora_before.npy"), np.load(root / "lora_after.npy")
    ref = exported["refs"]["lcm_lora", 2]
    assert np.abs(before - ref).max() > 1e-3  # the base alone is not the student
    assert np.abs(after - ref).max() / max(1.0, np.abs(ref).max()) < 1e-4


def test_consistency_model_cards_and_records(exported):
    root, infos = exported["root"], exported["infos"]
    card = (root / "lcm" / "README.md").read_text()
    assert "StableDiffusionPipeline.from_pretrained(" in card and "guidance_scale=3.0" in card
    assert "num_inference_steps=4" in card and "LCMScheduler" in card
    card = (root / "tcd" / "README.md").read_text()
    assert "eta=0.3" in card and "TCDScheduler" in card
    card = (root / "lcm_lora" / "README.md").read_text()
    assert "LCMScheduler.from_config(pipe.scheduler.config)" in card and "load_lora_weights" in card
    assert infos["tcd"]["call_kwargs"] == {"eta": 0.3}
    assert infos["lcm"]["any_step_count"] and infos["lcm"]["guidance_embedded"]
    check_student_call(infos["lcm"], 8, 6.0)  # any step count, any embedded guidance
    from stepdistill.eval.report import nfe

    assert nfe(4, 3.0, infos["lcm"]["guidance_embedded"]) == 4  # the embedded guidance costs no CFG pass
    assert nfe(4, 3.0, infos["lcm_lora"]["guidance_embedded"]) == 8
    with pytest.raises(ValueError, match="guidance"):
        check_student_call(infos["lcm_lora"], 8, 3.0)  # no embedding: CFG on top would be applied twice


_FLOW_RUNNER = r"""
import json, sys
import numpy as np, torch
from diffusers import StableDiffusion3Pipeline

spec = json.load(open(sys.argv[1]))
noise = torch.from_numpy(np.load(spec["latents"]))
pipe = StableDiffusion3Pipeline.from_pretrained(spec["folder"], local_files_only=True,
                                                **{name: None for name in spec["absent"]})
pipe.set_progress_bar_config(disable=True)
out = {"scheduler": type(pipe.scheduler).__name__}
for steps in spec["steps"]:
    torch.manual_seed(spec["step_seed"])  # the SD3 pipeline gives the scheduler's step no generator
    res = pipe(spec["prompt"], latents=noise.clone(), num_inference_steps=steps, guidance_scale=1.0,
               output_type="latent").images
    np.save(spec["result"] + f".{steps}.npy", res.float().numpy())
json.dump(out, open(spec["report"], "w"))
"""


def test_lcm_student_of_a_flow_teacher_exports_with_flow_match_lcm_scheduler(tmp_path):
    from tiny_models import make_tiny_sd3_pipeline

    make_tiny_sd3_pipeline(tmp_path / "teacher")
    teacher = Teacher.load(tmp_path / "teacher")
    torch.manual_seed(1)
    gen = ConsistencyGenerator.from_teacher(teacher, 4)
    perturb_(gen.unet, std=0.02)
    folder = export_student(teacher, gen, tmp_path / "student", method="lcm", example_prompt=PROMPT)
    info = json.loads((folder / "stepdistill_export.json").read_text())
    assert info["any_step_count"] and info["scheduler"] == "FlowMatchLCMScheduler"
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "latents.npy", noise.numpy())
    embeds = teacher.encode_prompt([PROMPT], with_uncond=False)
    refs = {}
    for steps in STEPS:
        torch.manual_seed(STEP_SEED)
        refs[steps] = gen.sample(noise, embeds, num_inference_steps=steps).numpy()
    spec = {"prompt": PROMPT, "latents": str(tmp_path / "latents.npy"), "step_seed": STEP_SEED, "steps": list(STEPS),
            "folder": str(folder), "absent": info["loading_kwargs"], "result": str(tmp_path / "out"),
            "report": str(tmp_path / "report.json")}
    report = run_without_stepdistill(_FLOW_RUNNER, spec, tmp_path)
    assert report["scheduler"] == "FlowMatchLCMScheduler"
    for steps in STEPS:
        got = np.load(tmp_path / f"out.{steps}.npy")
        err = np.abs(got - refs[steps]).max() / max(1.0, np.abs(refs[steps]).max())
        assert err < 1e-5, (steps, err)
    assert np.abs(refs[1] - refs[4]).max() > 1e-3
