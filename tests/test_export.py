"""export_student: the exported folder is a plain diffusers pipeline that reproduces the student exactly.

Tiny random SD / SDXL pipelines (tests/tiny_models.py) are the teachers; students are perturbed copies of their UNets
(full, or LoRA with alpha != rank). The exported folders are loaded in ONE subprocess that never imports stepdistill
and run with ``latents=`` fixed noise, guidance 1 and ``output_type="np"``; the results are compared with the
student's own sampling (``Generator.sample`` + ``Teacher.decode``) computed here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from plain_diffusers import run_without_stepdistill
from tiny_models import make_tiny_sd_pipeline, make_tiny_sdxl_pipeline

from stepdistill.export import ExportError, export_student
from stepdistill.models.generators import Generator
from stepdistill.models.teacher import Teacher
from stepdistill.models.ema import GeneratorEMA, attach_ema

PROMPT = "a small red circle on a blue background"
NOISE_SEED = 0
STEP_SEED = 5  # generator for the re-noising between steps (pipeline and student draw the same fresh noise)

# (name, family, timesteps, lora_rank, scaled_input_noise)
CASES = [
    ("full_1", "sd", [999], None, False),
    ("full_4", "sd", [999, 749, 499, 249], None, False),
    ("lora_1", "sd", [999], 4, False),
    ("custom_3", "sd", [999, 800, 500], None, False),  # not reachable by num_inference_steps: needs timesteps=
    ("t399_1", "sd", [399], None, False),  # one step from pure noise conditioned at t = 399 (DMD2's SDXL one-step)
    ("t399_4", "sd", [399, 299, 199, 99], None, False),
    ("sid_1", "sd", [625], None, True),  # SiD-LSG: one step on σ_625·z (EulerDiscreteScheduler)
    ("sid_4", "sd", [599, 449, 299, 149], None, True),  # few-step on σ·z (the shipped ScaledNoiseLCMScheduler)
    ("sid_4_625", "sd", [625, 468, 312, 156], None, True),  # SiD's t_init = 625 schedule: needs timesteps=
    ("sdxl_1", "sdxl", [999], None, False),
]
DEFAULT_CALL = {"full_1", "full_4", "lora_1", "t399_1", "t399_4", "sid_1", "sid_4", "sdxl_1"}
SCHEDULERS = {"sid_1": "EulerDiscreteScheduler", "sid_4": "ScaledNoiseLCMScheduler",
              "sid_4_625": "ScaledNoiseLCMScheduler"}

_RUNNER = r"""
import json, logging, sys, warnings
import numpy as np, torch
from diffusers import DiffusionPipeline, LCMScheduler

spec = json.load(open(sys.argv[1]))
latents = torch.from_numpy(np.load(spec["latents"]))
out = {}


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run(pipe, kw, output_type="np"):
    pipe.set_progress_bar_config(disable=True)
    handler = Collect()
    logging.getLogger("diffusers").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = pipe(spec["prompt"], guidance_scale=1.0, latents=latents.clone(), output_type=output_type,
                      generator=torch.Generator().manual_seed(spec["step_seed"]), **kw).images
    logging.getLogger("diffusers").removeHandler(handler)
    # what a user sees: diffusers' logged warnings and Python warnings, except the Deprecation ones Python hides
    shown = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    return np.asarray(images, dtype=np.float32), handler.messages + shown


for case in spec["cases"]:
    kwargs = {"trust_remote_code": True} if case["trust_remote_code"] else {}
    handler = Collect()
    logging.getLogger("diffusers").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = DiffusionPipeline.from_pretrained(case["folder"], local_files_only=True, **kwargs)
    logging.getLogger("diffusers").removeHandler(handler)
    load_warnings = handler.messages + [str(w.message) for w in caught
                                        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    rec = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "calls": {},
           "load_warnings": load_warnings}
    calls = {"timesteps": {"timesteps": case["timesteps"]}}
    if case["default"]:
        calls["default"] = {"num_inference_steps": len(case["timesteps"])}
    for name, kw in calls.items():
        images, messages = run(pipe, kw)
        lat, _ = run(pipe, kw, output_type="latent")
        np.save(case["result"] + f".{name}.npy", images)
        np.save(case["result"] + f".{name}.latent.npy", lat)
        rec["calls"][name] = {"timesteps": [int(t) for t in pipe.scheduler.timesteps], "warnings": messages}
    out[case["name"]] = rec

lora = spec["lora"]
base = DiffusionPipeline.from_pretrained(lora["teacher"], local_files_only=True)
base.scheduler = LCMScheduler.from_pretrained(lora["folder"], subfolder="scheduler", local_files_only=True)
np.save(lora["before"], run(base, {"num_inference_steps": 1})[0])
base.load_lora_weights(lora["folder"])
np.save(lora["after"], run(base, {"num_inference_steps": 1})[0])

json.dump(out, open(spec["report"], "w"))
"""


def _student(teacher: Teacher, timesteps, lora_rank, seed: int, scaled: bool = False) -> Generator:
    torch.manual_seed(seed)
    gen = Generator.from_teacher(teacher, timesteps=timesteps, lora_rank=lora_rank,
                                 lora_alpha=None if lora_rank is None else 2.0 * lora_rank, scaled_input_noise=scaled)
    with torch.no_grad():
        for name, p in gen.unet.named_parameters():
            if lora_rank is None or "lora_B" in name:  # LoRA B starts at zero: make the adapter do something
                p.add_(0.05 * torch.randn_like(p))
    return gen


def _reference(teacher: Teacher, gen: Generator, noise: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The student's own output: its sampling chain on ``noise`` (latents), and decoded by the teacher's VAE as
    the pipeline's 'np' output."""
    embeds = teacher.encode_prompt([PROMPT], with_uncond=False)
    with torch.no_grad():
        x0 = gen.sample(noise, embeds, generator=torch.Generator().manual_seed(STEP_SEED))
        image = teacher.decode(x0)
    return x0.float().numpy(), (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    teachers = {
        "sd": Teacher(make_tiny_sd_pipeline(root / "teacher_sd"), source=str(root / "teacher_sd")),
        "sdxl": Teacher(make_tiny_sdxl_pipeline(root / "teacher_sdxl"), source=str(root / "teacher_sdxl")),
    }
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(NOISE_SEED))
    np.save(root / "latents.npy", noise.numpy())
    cases, refs, infos = [], {}, {}
    for i, (name, family, timesteps, lora_rank, scaled) in enumerate(CASES):
        teacher = teachers[family]
        gen = _student(teacher, timesteps, lora_rank, seed=10 + i, scaled=scaled)
        folder = export_student(teacher, gen, root / name, method="dmd2", steps_info={"train_steps": 123},
                                example_prompt=PROMPT)
        info = json.loads((folder / "stepdistill_export.json").read_text())
        infos[name] = info
        cases.append({"name": name, "folder": str(folder), "result": str(root / name), "timesteps": timesteps,
                      "default": info["num_inference_steps_reproduces_timesteps"],
                      "trust_remote_code": info["trust_remote_code"]})
        refs[name] = _reference(teacher, gen, noise)
    teacher_only = _reference(teachers["sd"], Generator.from_teacher(teachers["sd"], timesteps=[999]), noise)[1]
    spec = {
        "prompt": PROMPT,
        "latents": str(root / "latents.npy"),
        "step_seed": STEP_SEED,
        "cases": cases,
        "lora": {"teacher": str(root / "teacher_sd"), "folder": str(root / "lora_1"),
                 "before": str(root / "lora_before.npy"), "after": str(root / "lora_after.npy")},
        "report": str(root / "report.json"),
    }
    report = run_without_stepdistill(_RUNNER, spec, root)
    return {"root": root, "refs": refs, "report": report, "teacher_only": teacher_only, "teachers": teachers,
            "infos": infos}


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_exported_pipeline_reproduces_student(exported, name):
    """Both calls — the natural ``num_inference_steps=n`` (where the scheduler reproduces the timesteps) and
    ``timesteps=[...]`` — equal the generator's own sampler, in a process without stepdistill."""
    report = exported["report"]
    assert report["stepdistill_modules"] == []
    assert report[name]["scheduler"] == SCHEDULERS.get(name, "LCMScheduler")
    timesteps = next(c[2] for c in CASES if c[0] == name)
    assert exported["infos"][name]["num_inference_steps_reproduces_timesteps"] == (name in DEFAULT_CALL)
    assert report[name]["load_warnings"] == [], report[name]["load_warnings"]  # loading as the card says is quiet
    calls = report[name]["calls"]
    assert set(calls) == ({"default", "timesteps"} if name in DEFAULT_CALL else {"timesteps"})
    ref_latent, ref_image = exported["refs"][name]
    for call, rec in calls.items():
        assert rec["timesteps"] == timesteps, call
        assert rec["warnings"] == [], (call, rec["warnings"])  # the model card's call prints nothing
        latent = np.load(exported["root"] / f"{name}.{call}.latent.npy")
        # to 1e-5 of the latents' magnitude (x0 = (x_t − σ·ε̂)/a_t reaches |30| at t = 999 on this random UNet)
        err = np.abs(latent - ref_latent).max() / max(1.0, np.abs(ref_latent).max())
        assert err < 1e-5, (call, err)
        got = np.load(exported["root"] / f"{name}.{call}.npy")
        assert got.shape == ref_image.shape
        assert np.abs(got - ref_image).max() < 1e-4, (call, np.abs(got - ref_image).max())
    if name == "full_1":  # the comparison is not vacuous: the perturbed student differs from the teacher-init one
        assert np.abs(ref_image - exported["teacher_only"]).max() > 1e-2


def test_scaled_input_students_really_start_from_scaled_noise(exported):
    """The SiD export is not vacuous: the same UNet on unscaled noise gives a different image."""
    root = exported["root"]
    teacher = exported["teachers"]["sd"]
    gen = _student(teacher, [625], None, seed=10 + [c[0] for c in CASES].index("sid_1"), scaled=False)
    unscaled = _reference(teacher, gen, torch.from_numpy(np.load(root / "latents.npy")))[0]
    assert np.abs(unscaled - exported["refs"]["sid_1"][0]).max() > 1e-2


def test_lora_file_loads_on_teacher_pipeline(exported):
    root = exported["root"]
    before, after = np.load(root / "lora_before.npy"), np.load(root / "lora_after.npy")
    ref = exported["refs"]["lora_1"][1]
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
    assert sched["num_train_timesteps"] == 1000
    t399 = json.loads((exported["root"] / "t399_1" / "scheduler" / "scheduler_config.json").read_text())
    assert t399["num_train_timesteps"] == 400 and len(t399["trained_betas"]) == 400
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "teacher_sd"  # the folder's name, not the exporting machine's absolute path
    assert front["library_name"] == "diffusers"
    assert front["method"] == "dmd2" and front["steps"] == 4 and front["timesteps"] == [999, 749, 499, 249]
    assert "dmd2" in front["tags"] and front["training"] == {"train_steps": 123}
    assert "num_inference_steps=4, guidance_scale=1.0" in text and "guidance_scale <= 1" in text
    assert f'pipe("{PROMPT}"' in text  # the example prompt the caller gave
    assert "On the CPU:" in text and '.to("cuda")' in text
    custom = (exported["root"] / "custom_3" / "README.md").read_text()
    assert "timesteps=[999, 800, 500]" in custom
    lora_card = (exported["root"] / "lora_1" / "README.md").read_text()
    assert "load_lora_weights" in lora_card and "lora" in yaml.safe_load(lora_card.split("---\n")[1])["tags"]
    # the few-step SiD student ships its scheduler's code and says how to load it
    sid4 = exported["root"] / "sid_4"
    assert json.loads((sid4 / "model_index.json").read_text())["scheduler"] == ["scheduling_scaled_lcm",
                                                                                  "ScaledNoiseLCMScheduler"]
    assert (sid4 / "scheduler" / "scheduling_scaled_lcm.py").is_file()
    assert "trust_remote_code=True" in (sid4 / "README.md").read_text()
    card = (exported["root"] / "sid_1" / "README.md").read_text()
    # the main usage needs no remote code; only the optional NASA custom pipeline (its own section) does
    assert "trust_remote_code" not in card.split("## Negative prompts without CFG")[0].replace(
        "trust_remote_code: false", "")
    assert 'custom_pipeline=' in card and (exported["root"] / "sid_1" / "pipeline_nasa.py").is_file()


def test_toy_teacher_students_get_a_toy_prompt_in_their_card(tmp_path):
    from stepdistill.workflows.single_run import default_example_prompt
    from stepdistill.toy import world

    teacher = Teacher.load("toy")
    prompt = default_example_prompt(teacher)
    world.parse_prompt(prompt)  # raises for a prompt outside the toy vocabulary
    assert default_example_prompt(exported_teacher := Teacher(make_tiny_sd_pipeline(seed=1))) != prompt
    del exported_teacher


def test_export_uses_ema_and_is_atomic(exported, monkeypatch):
    from diffusers import UNet2DConditionModel

    import stepdistill.export.students as export_mod

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

    monkeypatch.setattr(export_mod, "model_card", boom)
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
    assert step_kwargs(load_pipeline(root / "t399_1"), 1) == {"num_inference_steps": 1}
    assert step_kwargs(load_pipeline(root / "sid_4"), 4) == {"num_inference_steps": 4}  # trust_remote_code read
    pipe = load_pipeline(root / "custom_3")
    assert step_kwargs(pipe, 3) == {"timesteps": [999, 800, 500]}
    with pytest.raises(ValueError, match="only be sampled in 3 step"):
        step_kwargs(pipe, 4)
