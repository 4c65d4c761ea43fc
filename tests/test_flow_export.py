"""Students of flow-matching teachers exported as plain StableDiffusion3Pipeline / FluxPipeline folders: the model
card's call reproduces the generator's own samples in a process that never imports stepdistill, and a LoRA student's
file loads on the teacher pipeline with ``load_lora_weights``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from plain_diffusers import run_without_stepdistill
from tiny_models import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

from stepdistill.export import export_student
from stepdistill.models.generators import Generator
from stepdistill.models.teacher import Teacher

PROMPT = "a small red circle"
STEP_SEED = 5
# name, teacher, timesteps (table indices), lora rank; the SD3 teacher's table is shifted by 3, FLUX's is not
CASES = [
    ("sd3_1", "sd3", [999], None),
    ("sd3_4_uniform", "sd3", [999, 499, 249, 99], None),  # σ = shift₃((i+1)/1000) = 1, .75, .5, .25
    ("sd3_4_shifted", "sd3", [999, 749, 499, 249], None),  # σ = 1, .9, .75, .5: only sigmas=[...] reaches it
    ("sd3_lora_2", "sd3", [999, 499], 4),
    ("flux_1", "flux", [999], None),
]
DEFAULT_CALL = {"sd3_1", "sd3_4_uniform", "sd3_lora_2", "flux_1"}

_RUNNER = r"""
import json, sys
import numpy as np, torch
from diffusers import FlowMatchLCMScheduler, FluxPipeline, StableDiffusion3Pipeline

spec = json.load(open(sys.argv[1]))
noise = torch.from_numpy(np.load(spec["latents"]))
out = {}

def run(pipe, kw):
    pipe.set_progress_bar_config(disable=True)
    latents, size = noise.clone(), {}
    if isinstance(pipe, FluxPipeline):  # FLUX takes its latents packed into 2x2 patches
        latents = FluxPipeline._pack_latents(latents, *latents.shape)
        size = dict(height=spec["image_size"], width=spec["image_size"])
    torch.manual_seed(spec["step_seed"])  # the SD3 / FLUX pipelines give the scheduler's step no generator
    res = pipe(spec["prompt"], latents=latents, output_type="latent", **size, **kw).images
    if isinstance(pipe, FluxPipeline):
        res = FluxPipeline._unpack_latents(res, spec["image_size"], spec["image_size"], pipe.vae_scale_factor)
    return res.float().numpy(), [round(float(s), 6) for s in pipe.scheduler.sigmas[:-1]]

for case in spec["cases"]:
    cls = FluxPipeline if case["teacher"] == "flux" else StableDiffusion3Pipeline
    absent = {name: None for name in case["absent"]}
    pipe = cls.from_pretrained(case["folder"], local_files_only=True, **absent)
    rec = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "calls": {}}
    calls = {"sigmas": {"sigmas": case["sigmas"]}}
    if case["default"]:
        calls["default"] = {"num_inference_steps": len(case["sigmas"])}
    for name, kw in calls.items():
        lat, sig = run(pipe, dict(kw, guidance_scale=case["guidance_scale"]))
        np.save(case["result"] + f".{name}.npy", lat)
        rec["calls"][name] = sig
    out[case["name"]] = rec

lora = spec["lora"]
base = StableDiffusion3Pipeline.from_pretrained(lora["teacher"], local_files_only=True, text_encoder_3=None, tokenizer_3=None)
base.scheduler = FlowMatchLCMScheduler.from_pretrained(lora["folder"], subfolder="scheduler", local_files_only=True)
np.save(lora["before"], run(base, {"num_inference_steps": 2, "guidance_scale": 1.0})[0])
base.load_lora_weights(lora["folder"])
np.save(lora["after"], run(base, {"num_inference_steps": 2, "guidance_scale": 1.0})[0])
json.dump(out, open(spec["report"], "w"))
"""


def _student(teacher: Teacher, timesteps, lora_rank, seed: int) -> Generator:
    torch.manual_seed(seed)
    gen = Generator.from_teacher(teacher, timesteps=timesteps, lora_rank=lora_rank)
    with torch.no_grad():
        for name, p in gen.unet.named_parameters():
            if lora_rank is None or "lora_B" in name:  # LoRA B starts at zero: make the adapter do something
                p.add_(0.02 * torch.randn_like(p))
    return gen


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-export")
    make_tiny_sd3_pipeline(root / "teacher_sd3")
    make_tiny_flux_pipeline(root / "teacher_flux")
    teachers = {"sd3": Teacher.load(root / "teacher_sd3"), "flux": Teacher.load(root / "teacher_flux", resolution=16)}
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    np.save(root / "latents.npy", noise.numpy())
    cases, refs, infos = [], {}, {}
    for i, (name, kind, timesteps, rank) in enumerate(CASES):
        teacher = teachers[kind]
        gen = _student(teacher, timesteps, rank, seed=20 + i)
        folder = export_student(teacher, gen, root / name, method="dmd2", example_prompt=PROMPT)
        info = json.loads((folder / "stepdistill_export.json").read_text())
        infos[name] = info
        cases.append({"name": name, "teacher": kind, "folder": str(folder), "result": str(root / name),
                      "sigmas": info["sigmas"], "default": info["num_inference_steps_reproduces_timesteps"],
                      "guidance_scale": info["guidance_scale"], "absent": info["loading_kwargs"]})
        embeds = teacher.encode_prompt([PROMPT], with_uncond=False)
        torch.manual_seed(STEP_SEED)  # the re-noising draws from the global generator, as the pipelines' steps do
        with torch.no_grad():
            refs[name] = gen.sample(noise, embeds).numpy()
    spec = {"prompt": PROMPT, "latents": str(root / "latents.npy"), "step_seed": STEP_SEED, "cases": cases,
            "image_size": 16, "report": str(root / "report.json"),
            "lora": {"teacher": str(root / "teacher_sd3"), "folder": str(root / "sd3_lora_2"),
                     "before": str(root / "lora_before.npy"), "after": str(root / "lora_after.npy")}}
    report = run_without_stepdistill(_RUNNER, spec, root)
    return {"root": root, "refs": refs, "report": report, "infos": infos, "teachers": teachers}


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_exported_flow_pipeline_reproduces_the_student(exported, name):
    report = exported["report"]
    info = exported["infos"][name]
    kind = next(c[1] for c in CASES if c[0] == name)
    assert report[name]["pipeline"] == ("FluxPipeline" if kind == "flux" else "StableDiffusion3Pipeline")
    assert report[name]["scheduler"] == "FlowMatchLCMScheduler"
    assert info["num_inference_steps_reproduces_timesteps"] == (name in DEFAULT_CALL)
    teacher = exported["teachers"][kind]
    timesteps = next(c[2] for c in CASES if c[0] == name)
    expected = [round(float(s), 6) for s in teacher.schedule.sigmas[timesteps].float()]
    calls = report[name]["calls"]
    assert set(calls) == ({"default", "sigmas"} if name in DEFAULT_CALL else {"sigmas"})
    ref = exported["refs"][name]
    for call, sigmas in calls.items():
        assert sigmas == pytest.approx(expected, abs=1e-6), call
        got = np.load(exported["root"] / f"{name}.{call}.npy")
        err = np.abs(got - ref).max() / max(1.0, np.abs(ref).max())
        assert err < 1e-5, (call, err)


def test_the_comparison_is_not_vacuous(exported):
    """Another student (the teacher-initialised one) gives different latents on the same noise."""
    teacher = exported["teachers"]["sd3"]
    gen = Generator.from_teacher(teacher, timesteps=[999])
    noise = torch.from_numpy(np.load(exported["root"] / "latents.npy"))
    with torch.no_grad():
        other = gen.sample(noise, teacher.encode_prompt([PROMPT], with_uncond=False)).numpy()
    assert np.abs(other - exported["refs"]["sd3_1"]).max() > 1e-2


def test_flow_lora_file_loads_on_the_teacher_pipeline(exported):
    root = exported["root"]
    before, after = np.load(root / "lora_before.npy"), np.load(root / "lora_after.npy")
    ref = exported["refs"]["sd3_lora_2"]
    assert np.abs(before - ref).max() > 1e-3  # the base alone is not the student
    assert np.abs(after - ref).max() / max(1.0, np.abs(ref).max()) < 1e-4


def test_flow_model_card_prints_the_call(exported):
    card = (exported["root"] / "sd3_4_shifted" / "README.md").read_text()
    assert "StableDiffusion3Pipeline.from_pretrained(" in card and "text_encoder_3=None, tokenizer_3=None" in card
    assert "sigmas=[1.0, 0.9, 0.75, 0.5]" in card and "guidance_scale=1.0" in card
    card = (exported["root"] / "flux_1" / "README.md").read_text()
    assert "FluxPipeline.from_pretrained(" in card and "num_inference_steps=1, guidance_scale=3.5, height=16, width=16" in card


def test_a_teachers_call_arguments_reach_the_student_folder_and_card(tmp_path):
    """A teacher folder's recorded call arguments (the toy flow teacher's max_sequence_length) are the student's too."""
    make_tiny_sd3_pipeline(tmp_path / "teacher")
    (tmp_path / "teacher" / "stepdistill_pipeline.json").write_text(json.dumps({"call_kwargs": {"max_sequence_length": 16}}))
    teacher = Teacher.load(tmp_path / "teacher")
    assert teacher.call_kwargs == {"max_sequence_length": 16}
    folder = export_student(teacher, Generator.from_teacher(teacher, timesteps=[999]), tmp_path / "student",
                            method="sid", example_prompt=PROMPT)
    assert json.loads((folder / "stepdistill_pipeline.json").read_text()) == {"call_kwargs": {"max_sequence_length": 16}}
    assert "guidance_scale=1.0, max_sequence_length=16)" in (folder / "README.md").read_text()


def test_latency_of_a_flow_pipeline_times_its_transformer(exported):
    """The eval harness's latency measurement on an SD3 pipeline folder: the denoiser it times is the transformer."""
    from stepdistill.eval.bench import measure_pipeline_latency
    from stepdistill.export.loading import load_pipeline

    pipe = load_pipeline(exported["root"] / "sd3_1")
    lat = measure_pipeline_latency(pipe, PROMPT, 1, 1.0, batch=2, warmup=0, repeats=1)
    assert lat["batch1"] > 0 and lat["batchN"] > 0 and 0 < lat["unet_share"] < 1
