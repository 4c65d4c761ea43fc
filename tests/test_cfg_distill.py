"""CFG distillation (stepdistill/objectives/cfg_distill.py) and its guidance-distilled student
(student.TeacherSamplerGenerator): the gradient against the formula computed by hand, LoRA on the teacher's shared base
(adapters off = the teacher exactly), the run and the export (a DDIM folder; the LoRA file loads on the teacher in plain
diffusers)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO
from plain_diffusers import run_without_stepdistill
from tiny_models import make_tiny_sd_pipeline, make_tiny_teacher_spec

PROMPTS = ["a small red cross on a gray background", "a large blue circle on a white background",
           "a small green triangle on a black background"]


def _setup(steps: int = 4, **kw):
    from stepdistill.objectives import Batch, build_objective
    from stepdistill.models.generators import TeacherSamplerGenerator
    from stepdistill.models.teacher import Teacher

    teacher = Teacher(make_tiny_sd_pipeline())
    torch.manual_seed(1)
    gen = TeacherSamplerGenerator.from_teacher(teacher, steps, **kw)
    with torch.no_grad():  # make the student differ from the teacher (LoRA B starts at zero)
        for name, p in gen.unet.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    obj = build_objective("cfg_distill", teacher, gen, {"guidance_scale": 3.0})
    embeds = teacher.encode_prompt(PROMPTS, with_uncond=True)
    noise = torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(2))
    return teacher, gen, obj, Batch(embeds=embeds, noise=noise)


def test_on_policy_gradient_matches_ddim_rollout_and_cfg_target_by_hand():
    """L = mean ‖ε_θ(x_k, t_k, c) − [ε(x_k, t_k, ∅) + w·(ε(x_k, t_k, c) − ε(x_k, t_k, ∅))]‖², x_k the student's own
    DDIM state before step k (η = 0: x' = √ᾱ'·x̂₀ + √(1−ᾱ')·ε̂, x̂₀ = (x − √(1−ᾱ)·ε̂)/√ᾱ), computed with raw UNet calls."""
    teacher, gen, obj, batch = _setup(steps=4)
    stop = torch.tensor([0, 2, 3])
    loss, _ = obj.generator_loss(batch, stop=stop)
    params = [p for p in gen.unet.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)

    acp = teacher.pipeline.scheduler.alphas_cumprod.double()
    T = acp.shape[0]
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(teacher.pipeline.scheduler.config)
    ddim.set_timesteps(4)
    ts = [int(t) for t in ddim.timesteps]  # the tiny teacher's "leading" spacing, steps_offset 1: 751, 501, 251, 1
    assert ts == gen.timesteps == [751, 501, 251, 1]
    cond, uncond = batch.embeds.cond, batch.embeds.uncond
    x = batch.noise.double()
    states = {}
    with torch.no_grad():
        for i, t in enumerate(ts):
            states[i] = x.clone()
            eps = gen.unet(x.float(), t, encoder_hidden_states=cond).sample.double()
            x0 = (x - (1 - acp[t]).sqrt() * eps) / acp[t].sqrt()
            prev = acp[t - T // 4] if t - T // 4 >= 0 else acp[0]  # set_alpha_to_one=False: ᾱ_0 at the end
            x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    x_k = torch.stack([states[int(k)][i] for i, k in enumerate(stop)]).float()
    t_k = torch.tensor([ts[int(k)] for k in stop])
    with torch.no_grad():
        e_c = teacher.unet(x_k, t_k, encoder_hidden_states=cond).sample
        e_u = teacher.unet(x_k, t_k, encoder_hidden_states=uncond).sample
    student = gen.unet(x_k, t_k, encoder_hidden_states=cond).sample
    want_loss = ((student - (e_u + 3.0 * (e_c - e_u))) ** 2).mean()
    want = torch.autograd.grad(want_loss, params)
    assert abs(loss.item() - want_loss.item()) < 1e-5 * max(1.0, want_loss.item())
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-3)


def test_noised_real_states_use_the_sampling_timesteps():
    from stepdistill.objectives import Batch, RealImages, build_objective

    teacher, gen, _, batch = _setup(steps=4)
    obj = build_objective("cfg_distill", teacher, gen, {"states": "noised_real"})
    with pytest.raises(ValueError, match="Batch.real "):
        obj.generator_loss(batch)
    real = torch.randn_like(batch.noise)
    x_t, t = obj.states(Batch(embeds=batch.embeds, noise=batch.noise, real=RealImages(real)), stop=torch.tensor([0, 1, 3]),
                        noise=batch.noise)
    assert t.tolist() == [751, 501, 1]
    assert torch.allclose(x_t, teacher.schedule.add_noise(real, batch.noise, t))


def test_shared_base_lora_is_the_teacher_with_adapters_off_and_one_unet_in_memory():
    teacher, gen, obj, batch = _setup(steps=2, lora_rank=4, share_base=True)
    reference = make_tiny_sd_pipeline().unet.eval()
    assert gen.unet is teacher.unet
    x, t = batch.noise, torch.tensor([500, 500, 500])
    with torch.no_grad():
        with gen.teacher_unet_mode():
            off = teacher.unet(x, t, encoder_hidden_states=batch.embeds.cond).sample
        on = teacher.unet(x, t, encoder_hidden_states=batch.embeds.cond).sample
        ref = reference(x, t, encoder_hidden_states=batch.embeds.cond).sample
    assert torch.equal(off, ref)  # adapters disabled: exactly the teacher
    assert (on - ref).abs().max() > 1e-4  # enabled: the student
    trainable = {id(p) for p in gen.trainable_parameters()}
    assert trainable and all(id(p) in trainable for n, p in teacher.unet.named_parameters() if "lora_" in n)
    loss, _ = obj.generator_loss(batch, stop=torch.tensor([0, 1, 1]))
    loss.backward()
    base = [p for n, p in teacher.unet.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in base) and all(p.grad is not None for p in gen.trainable_parameters())


def test_recipes_validate_and_refuse_a_missing_sampler(tmp_path):
    from stepdistill.training.config import ConfigError
    from stepdistill.workflows.distill import validate_run

    spec = make_tiny_teacher_spec(tmp_path)
    for name in ("cfg-distill.yaml", "lora-cfg-distill.yaml", "toy-cfg-distill.yaml", "toy-lora-cfg-distill.yaml",
                 "toy-cfg-distill-diverse.yaml"):
        validate_run(spec, REPO / "training" / name)
    with pytest.raises(ConfigError, match="teacher_sampler_steps"):
        validate_run(spec, REPO / "training" / "toy-cfg-distill.yaml", ["generator.teacher_sampler_steps=null"])
    with pytest.raises(ConfigError, match="share_teacher_base"):
        validate_run(spec, REPO / "training" / "toy-lora-cfg-distill.yaml", ["generator.lora_rank=null"])
    with pytest.raises(ConfigError, match="teacher_sampler_steps"):
        validate_run(spec, REPO / "training" / "toy-dmd.yaml", ["generator.teacher_sampler_steps=25"])


_RUNNER = r"""
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
spec = json.loads(open(sys.argv[1]).read())
latents = torch.from_numpy(np.load(spec["latents"]))
def run(pipe, guidance):
    pipe.set_progress_bar_config(disable=True)
    return pipe(spec["prompts"], num_inference_steps=spec["steps"], guidance_scale=guidance, latents=latents,
                output_type="latent").images.numpy()
student = DiffusionPipeline.from_pretrained(spec["folder"], local_files_only=True)
np.save(spec["student"], run(student, 1.0))
base = DiffusionPipeline.from_pretrained(spec["teacher"], local_files_only=True)
base.scheduler = type(student.scheduler).from_config(student.scheduler.config)
base.load_lora_weights(spec["folder"])
np.save(spec["lora"], run(base, 1.0))
json.dump({"scheduler": type(student.scheduler).__name__}, open(spec["report"], "w"))
"""


def test_lora_cfg_distill_run_exports_a_ddim_student_and_a_lora_file_plain_diffusers_loads(tmp_path):
    from stepdistill.models.generators import TeacherSamplerGenerator  # noqa: F401
    from stepdistill.workflows.distill import distill, load_pipeline_spec, load_teacher

    spec = make_tiny_teacher_spec(tmp_path)
    overrides = ["train.max_steps=2", "train.batch_size=2", "train.sample_every=0", "train.checkpoint_every=1",
                 "generator.teacher_sampler_steps=4", "optimizer.generator_lr=1.0e-2"]
    summary = distill(spec, REPO / "training" / "toy-lora-cfg-distill.yaml", tmp_path / "run", overrides=overrides)
    folder = Path(summary["student"])
    info = json.loads((folder / "stepdistill_export.json").read_text())
    assert info["method"] == "cfg_distill" and info["steps"] == 4 and info["lora"] is True
    assert info["num_inference_steps_reproduces_timesteps"] is True and info["scheduler"] == "DDIMScheduler"
    assert "guidance-distilled" in (folder / "README.md").read_text()

    latents = torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "latents.npy", latents.numpy())
    run_spec = {"folder": str(folder), "teacher": str(tmp_path / "teacher"), "prompts": PROMPTS, "steps": 4,
                "latents": str(tmp_path / "latents.npy"), "student": str(tmp_path / "student.npy"),
                "lora": str(tmp_path / "lora.npy"), "report": str(tmp_path / "report.json")}
    report = run_without_stepdistill(_RUNNER, run_spec, tmp_path)
    assert report["stepdistill_modules"] == [] and report["scheduler"] == "DDIMScheduler"
    merged, lora = np.load(tmp_path / "student.npy"), np.load(tmp_path / "lora.npy")
    assert np.abs(merged - lora).max() < 1e-4  # the LoRA file on the teacher = the merged student folder

    # the generator's own sampler is what the exported folder computes
    teacher = load_teacher(load_pipeline_spec(spec))
    from stepdistill.eval.generate import load_pipeline

    pipe = load_pipeline(folder)
    gen = TeacherSamplerGenerator(copy.deepcopy(pipe.unet), teacher.schedule, pipe.scheduler, 4)
    embeds = teacher.encode_prompt(PROMPTS, with_uncond=False)
    mine = gen.sample(latents, embeds).numpy()
    assert np.abs(mine - merged).max() < 1e-4


def test_diversity_reward_pathwise_gradient_matches_a_hand_written_sampler_and_cosine():
    """r_i = 1 − cos(E(x_i), E(x'_i)), x from the student's DDIM sampler with autograd through its last K = 2 steps only;
    checked against a hand-written DDIM loop (earlier steps detached) and torch's own cosine formula."""
    from stepdistill.objectives import Batch, build_objective

    teacher, gen, _, batch = _setup(steps=4)
    obj = build_objective("cfg_distill", teacher, gen, {"diversity_weight": 0.5, "diversity_prompts": 2,
                                                        "diversity_grad_steps": 2})
    proj = torch.randn(4 * 16 * 16, 8, generator=torch.Generator().manual_seed(7))
    object.__setattr__(obj, "embedder", lambda x: x.flatten(1) @ proj)  # a fixed embedding E
    noise = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    b = Batch(embeds=batch.embeds.select(torch.tensor([0, 1, 2, 0])), noise=noise)
    params = [p for p in gen.unet.parameters() if p.requires_grad]
    r = obj.diversity(b)
    got = torch.autograd.grad(r.mean(), params)

    acp = teacher.pipeline.scheduler.alphas_cumprod.double()
    ts, T = gen.timesteps, acp.shape[0]
    cond = batch.embeds.cond[[0, 1, 0, 1]]
    x = noise.clone()
    for i, t in enumerate(ts):
        if i == 2:  # K = 2 of 4 steps: what steps 0 and 1 made is a constant
            x = x.detach()
        eps = gen.unet(x, t, encoder_hidden_states=cond).sample
        a_t, a_prev = acp[t].float(), (acp[t - T // 4] if t - T // 4 >= 0 else acp[0]).float()
        x = a_prev.sqrt() * (x - (1 - a_t).sqrt() * eps) / a_t.sqrt() + (1 - a_prev).sqrt() * eps
    f = x.flatten(1) @ proj
    want_r = 1 - (f[:2] * f[2:]).sum(1) / (f[:2].norm(dim=1) * f[2:].norm(dim=1))
    want = torch.autograd.grad(want_r.mean(), params)
    assert torch.allclose(r, want_r, atol=1e-5)
    for a, w in zip(got, want):
        assert torch.allclose(a, w, atol=1e-6, rtol=1e-3)
    loss, logs = obj.generator_loss(b, stop=torch.tensor([0, 1, 2, 3]))
    assert abs(loss.item() - (logs["cfg_mse"] - 0.5 * logs["diversity_reward"])) < 1e-6


def test_training_state_counts_a_shared_base_once():
    """weights + gradients + AdamW moments: LoRA on the shared base ≈ one UNet, the full copy = two UNets + grads + 2
    moments (the LoRA-enhanced distillation memory claim, without the process overhead of max RSS)."""
    from stepdistill.models.generators import TeacherSamplerGenerator
    from stepdistill.models.teacher import Teacher
    from stepdistill.training.progress import training_state_bytes

    sizes = {}
    for name, kw in (("shared", {"lora_rank": 4, "share_base": True}), ("full", {})):
        teacher = Teacher(make_tiny_sd_pipeline())
        gen = TeacherSamplerGenerator.from_teacher(teacher, 2, **kw)
        opt = torch.optim.AdamW(gen.trainable_parameters())
        loss = sum(p.sum() for p in gen.trainable_parameters())
        loss.backward()
        opt.step()
        sizes[name] = training_state_bytes([teacher.unet, gen], [opt])
    unet = sum(p.numel() * 4 for n, p in make_tiny_sd_pipeline().unet.named_parameters())
    assert sizes["full"]["weights"] == 2 * unet and sizes["full"]["total"] == 5 * unet
    assert unet < sizes["shared"]["weights"] < 1.1 * unet and sizes["shared"]["total"] < 1.3 * unet
