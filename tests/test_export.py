"""export_student: the exported folder is a plain diffusers pipeline that reproduces the student exactly.

Tiny random SD / SDXL pipelines (tests/tiny_models.py) are the teachers; students are perturbed copies of their UNets
(full, or LoRA with alpha != rank). The exported folders are loaded in ONE subprocess that never imports stepdistill
and run with ``latents=`` fixed noise, guidance 1 and ``output_type="np"``; the results are compared with the
student's own sampling (``Generator.sample`` + ``Teacher.decode``) computed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import make_tiny_sd_pipeline, make_tiny_sdxl_pipeline  # noqa: E402

from stepdistill.pipelines import ExportError, export_student  # noqa: E402
from stepdistill.student import Generator  # noqa: E402
from stepdistill.teacher import Teacher  # noqa: E402
from stepdistill.training.ema import GeneratorEMA, attach_ema  # noqa: E402

PROMPT = "a small red circle on a blue background"
NOISE_SEED = 0
STEP_SEED = 5  # generator for the re-noising between steps (pipeline and student draw the same fresh noise)

# (name, family, timesteps, lora_rank)
CASES = [
    ("full_1", "sd", [999], None),
    ("full_4", "sd", [999, 749, 499, 249], None),
    ("lora_1", "sd", [999], 4),
    ("custom_3", "sd", [999, 800, 500], None),  # not reachable by num_inference_steps: needs timesteps=
    ("t399_1", "sd", [399], None),  # one step from pure noise conditioned at t = 399 (DMD2's SDXL one-step choice)
    ("sdxl_1", "sdxl", [999], None),
]

_RUNNER = r"""
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline, LCMScheduler

spec = json.load(open(sys.argv[1]))
latents = torch.from_numpy(np.load(spec["latents"]))
out = {}

def run(pipe, call):
    pipe.set_progress_bar_config(disable=True)
    kw = {"timesteps": call["timesteps"]} if call.get("timesteps") else {"num_inference_steps": call["steps"]}
    images = pipe(spec["prompt"], guidance_scale=1.0, latents=latents.clone(), output_type="np",
                  generator=torch.Generator().manual_seed(spec["step_seed"]), **kw).images
    return np.asarray(images, dtype=np.float32)

for case in spec["cases"]:
    pipe = DiffusionPipeline.from_pretrained(case["folder"], local_files_only=True)
    out[case["name"]] = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__}
    np.save(case["result"], run(pipe, case))
    out[case["name"]]["timesteps"] = [int(t) for t in pipe.scheduler.timesteps]

lora = spec["lora"]
base = DiffusionPipeline.from_pretrained(lora["teacher"], local_files_only=True)
base.scheduler = LCMScheduler.from_pretrained(lora["folder"], subfolder="scheduler", local_files_only=True)
np.save(lora["before"], run(base, lora))
base.load_lora_weights(lora["folder"])
np.save(lora["after"], run(base, lora))

out["stepdistill_modules"] = sorted(m for m in sys.modules if m == "stepdistill" or m.startswith("stepdistill."))
assert "stepdistill" not in sys.modules
json.dump(out, open(spec["report"], "w"))
"""


def _student(teacher: Teacher, timesteps, lora_rank, seed: int) -> Generator:
    torch.manual_seed(seed)
    gen = Generator.from_teacher(teacher, timesteps=timesteps, lora_rank=lora_rank,
                                 lora_alpha=None if lora_rank is None else 2.0 * lora_rank)
    with torch.no_grad():
        for name, p in gen.unet.named_parameters():
            if lora_rank is None or "lora_B" in name:  # LoRA B starts at zero: make the adapter do something
                p.add_(0.05 * torch.randn_like(p))
    return gen


def _reference(teacher: Teacher, gen: Generator, noise: torch.Tensor) -> np.ndarray:
    """The student's own output: its sampling chain on ``noise`` decoded by the teacher's VAE, as pipeline 'np'."""
    embeds = teacher.encode_prompt([PROMPT], with_uncond=False)
    with torch.no_grad():
        x0 = gen.sample(noise, embeds, generator=torch.Generator().manual_seed(STEP_SEED))
        image = teacher.decode(x0)
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    teachers = {
        "sd": Teacher(make_tiny_sd_pipeline(root / "teacher_sd"), source=str(root / "teacher_sd")),
        "sdxl": Teacher(make_tiny_sdxl_pipeline(root / "teacher_sdxl"), source=str(root / "teacher_sdxl")),
    }
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(NOISE_SEED))
    np.save(root / "latents.npy", noise.numpy())
    cases, refs = [], {}
    for i, (name, family, timesteps, lora_rank) in enumerate(CASES):
        teacher = teachers[family]
        gen = _student(teacher, timesteps, lora_rank, seed=10 + i)
        folder = export_student(teacher, gen, root / name, method="dmd2", steps_info={"train_steps": 123})
        info = json.loads((folder / "stepdistill_export.json").read_text())
        call = {"name": name, "folder": str(folder), "result": str(root / f"{name}.npy"), "steps": len(timesteps)}
        if not info["num_inference_steps_reproduces_timesteps"]:
            call["timesteps"] = timesteps
        cases.append(call)
        refs[name] = _reference(teacher, gen, noise)
    teacher_only = _reference(teachers["sd"], Generator.from_teacher(teachers["sd"], timesteps=[999]), noise)
    spec = {
        "prompt": PROMPT,
        "latents": str(root / "latents.npy"),
        "step_seed": STEP_SEED,
        "cases": cases,
        "lora": {"teacher": str(root / "teacher_sd"), "folder": str(root / "lora_1"), "steps": 1,
                 "before": str(root / "lora_before.npy"), "after": str(root / "lora_after.npy")},
        "report": str(root / "report.json"),
    }
    (root / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(root / "spec.json")], cwd=str(root), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((root / "report.json").read_text())
    return {"root": root, "refs": refs, "report": report, "teacher_only": teacher_only, "teachers": teachers}


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_exported_pipeline_reproduces_student(exported, name):
    report = exported["report"]
    assert report["stepdistill_modules"] == []
    assert report[name]["scheduler"] == "LCMScheduler"
    timesteps = next(c[2] for c in CASES if c[0] == name)
    assert report[name]["timesteps"] == timesteps
    got = np.load(exported["root"] / f"{name}.npy")
    ref = exported["refs"][name]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()
    if name == "full_1":  # the comparison is not vacuous: the perturbed student differs from the teacher-init one
        assert np.abs(ref - exported["teacher_only"]).max() > 1e-2


def test_lora_file_loads_on_teacher_pipeline(exported):
    root = exported["root"]
    before, after = np.load(root / "lora_before.npy"), np.load(root / "lora_after.npy")
    ref = exported["refs"]["lora_1"]
    assert np.abs(after - before).max() > 1e-3  # the LoRA changes the teacher's output ...
    assert np.abs(after - ref).max() < 1e-4  # ... into the merged student's (alpha = 2·rank survives the file)
    assert (root / "lora_1" / "pytorch_lora_weights.safetensors").is_file()
    assert not (root / "full_1" / "pytorch_lora_weights.safetensors").exists()


def test_folder_layout_and_model_card(exported):
    folder = exported["root"] / "full_4"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir(), sub
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["original_inference_steps"] == 4 and sched["prediction_type"] == "epsilon"
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == str(exported["root"] / "teacher_sd")
    assert front["library_name"] == "diffusers"
    assert front["method"] == "dmd2" and front["steps"] == 4 and front["timesteps"] == [999, 749, 499, 249]
    assert "dmd2" in front["tags"] and front["training"] == {"train_steps": 123}
    assert "num_inference_steps=4, guidance_scale=1.0" in text and "guidance_scale <= 1" in text
    custom = (exported["root"] / "custom_3" / "README.md").read_text()
    assert "timesteps=[999, 800, 500]" in custom
    lora_card = (exported["root"] / "lora_1" / "README.md").read_text()
    assert "load_lora_weights" in lora_card and "lora" in yaml.safe_load(lora_card.split("---\n")[1])["tags"]


def test_export_uses_ema_and_is_atomic(exported, monkeypatch):
    from diffusers import UNet2DConditionModel

    import stepdistill.pipelines.export as export_mod

    root = exported["root"]
    teacher = exported["teachers"]["sd"]
    gen = _student(teacher, [999], None, seed=3)
    params = list(gen.unet.parameters())
    live = [p.detach().clone() for p in params]
    ema = GeneratorEMA(params, decay=0.9)
    with torch.no_grad():
        for s in ema.shadow_params:
            s.add_(0.01)
    attach_ema(gen, ema)
    out = root / "ema_student"
    export_student(teacher, gen, out, method="dmd", steps_info=None)  # ema=True: the attached EMA
    saved = UNet2DConditionModel.from_pretrained(str(out / "unet"), local_files_only=True)
    for p, s in zip(saved.parameters(), ema.shadow_params):
        torch.testing.assert_close(p, s, atol=0, rtol=0)
    for p, v in zip(params, live):  # the generator got its trained weights back
        assert torch.equal(p, v)
    assert json.loads((out / "stepdistill_export.json").read_text())["ema"] is True

    # a failing export leaves the existing folder untouched and no temporary folder behind
    before = sorted(p.name for p in out.iterdir())
    def boom(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(export_mod, "_card", boom)
    with pytest.raises(RuntimeError, match="boom"):
        export_student(teacher, gen, out, method="other", ema=False)
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "stepdistill_export.json").read_text())["method"] == "dmd"
    assert not [p for p in root.iterdir() if p.name.startswith((".tmp_", ".old_"))]
    monkeypatch.undo()
    # a successful export replaces it; raw weights with ema=False
    export_student(teacher, gen, out, method="other", ema=False)
    assert json.loads((out / "stepdistill_export.json").read_text())["method"] == "other"
    saved = UNet2DConditionModel.from_pretrained(str(out / "unet"), local_files_only=True)
    assert all(torch.equal(p, v) for p, v in zip(saved.parameters(), live))
    with pytest.raises(ExportError, match="timesteps"):
        export_student(teacher, gen, root / "bad", method="x", steps_info={"timesteps": [999, 499]})
    assert not (root / "bad").exists()


def test_eval_calls_students_with_their_own_timesteps(exported):
    """stepdistill's generation and latency code calls a student whose timesteps num_inference_steps cannot
    reproduce with timesteps=[...] (as its model card says), and refuses another step count."""
    from stepdistill.eval.generate import load_pipeline, step_kwargs

    root = exported["root"]
    assert step_kwargs(load_pipeline(root / "full_1"), 1) == {"num_inference_steps": 1}
    assert step_kwargs(load_pipeline(root / "full_4"), 4) == {"num_inference_steps": 4}
    assert step_kwargs(load_pipeline(root / "custom_3"), 3) == {"timesteps": [999, 800, 500]}
    pipe = load_pipeline(root / "t399_1")
    assert step_kwargs(pipe, 1) == {"timesteps": [399]}
    with pytest.raises(ValueError, match="only be sampled in 1 step"):
        step_kwargs(pipe, 4)
