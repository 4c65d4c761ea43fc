"""Phased DMD (Fan et al. 2025, arXiv:2510.27684): subinterval score matching, phase experts, progressive training,
export of a multi-expert student to plain diffusers.

Independent references: the subinterval target and weight are recomputed from ``alphas_cumprod`` by hand; the 1-D toy
compares trained score networks with the closed-form denoiser of the 4-point mixture; the generator and fake-score
gradients are assembled from direct UNet calls and hand-written schedule arithmetic (no ``NoiseSchedule``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from helpers import REPO, cli, one_error_line, reset_accelerate_state
from plain_diffusers import run_without_stepdistill
from tiny_models import SD_BETAS

from stepdistill.objectives import Batch, ObjectiveConfigError, build_objective
from stepdistill.core.schedule import NoiseSchedule
from stepdistill.models.generators import PhasedGenerator


def _schedule() -> NoiseSchedule:
    return NoiseSchedule(DDPMScheduler(**SD_BETAS).alphas_cumprod)


# --- the subinterval target -------------------------------------------------------------------------------------------
def test_subinterval_target_and_weight_match_the_formulas():
    sch = _schedule()
    ac = DDPMScheduler(**SD_BETAS).alphas_cumprod.double()
    eps = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([301, 600, 999])
    # s = clean data: σ_{t|s} = σ_t, the target is ε itself, the transition is add_noise
    torch.testing.assert_close(sch.subinterval_eps_target(eps, t, None), eps, rtol=0, atol=1e-12)
    x = torch.randn_like(eps)
    torch.testing.assert_close(sch.add_noise_from(x, eps, t, None), sch.add_noise(x, eps, t))
    # s = 300: x_t = (a_t/a_s)·x_s + σ_{t|s}·ε, σ²_{t|s} = (1 − ᾱ_t) − (ᾱ_t/ᾱ_s)(1 − ᾱ_s), target (σ_t/σ_{t|s})·ε
    s = 300
    var = (1 - ac[t]) - ac[t] / ac[s] * (1 - ac[s])
    want_target = ((1 - ac[t]).sqrt() / var.sqrt()).reshape(-1, 1, 1, 1) * eps
    torch.testing.assert_close(sch.subinterval_eps_target(eps, t, s), want_target)
    want_xt = (ac[t] / ac[s]).sqrt().reshape(-1, 1, 1, 1) * x + var.sqrt().reshape(-1, 1, 1, 1) * eps
    torch.testing.assert_close(sch.add_noise_from(x, eps, t, s), want_xt)
    want_w = torch.clamp(10.0 * var, max=1.0).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(sch.subinterval_weight(t, s, 10.0, eps), want_w)
    assert float(sch.subinterval_weight(torch.tensor([301]), s, 10.0, eps[:1])) < 0.05  # tamed as t → s
    with pytest.raises(ValueError, match="t > s"):
        sch.add_noise_from(x[:1], eps[:1], s, s)


# --- the paper's 1-D toy ---------------------------------------------------------------------------------------------
POINTS = torch.tensor([-1.0, 0.0, 1.0, 2.0])


def _true_denoiser(sch: NoiseSchedule, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """E[x₀ | x_t] for x₀ uniform on POINTS: a softmax over the four Gaussian likelihoods N(x_t; a_t·x₀, σ_t²)."""
    a = float(sch.alphas_cumprod[t].sqrt())
    sigma = float((1 - sch.alphas_cumprod[t]).sqrt())
    logp = -((x_t[:, None] - a * POINTS[None]) ** 2) / (2 * sigma ** 2)
    return (torch.softmax(logp, dim=1) * POINTS[None]).sum(1)


def _fit_subinterval_score(sch: NoiseSchedule, target_kind: str, s: int, steps: int = 1500) -> dict[int, float]:
    """A small MLP ε-network trained only on x_t noised from samples x_s of the true marginal at s (t ∈ (s, T]), with
    the weighted subinterval loss; returns the RMSE of its x̂₀ against the true marginal denoiser at three t."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
                              torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        x0 = POINTS[torch.randint(0, 4, (1024,), generator=g)][:, None]
        x_s = sch.add_noise(x0, torch.randn(1024, 1, generator=g), s)
        t = torch.randint(s + 1, 1000, (1024,), generator=g)
        eps = torch.randn(1024, 1, generator=g)
        x_t = sch.add_noise_from(x_s, eps, t, s)
        target = sch.subinterval_eps_target(eps, t, s) if target_kind == "unbiased" else eps
        weight = sch.subinterval_weight(t, s, 10.0, eps)
        out = net(torch.cat([x_t, t[:, None].float() / 1000], dim=1))
        loss = (weight * (out - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    errors = {}
    for t in (450, 600, 750):
        x0 = POINTS[torch.randint(0, 4, (4000,), generator=g)][:, None]
        x_t = sch.add_noise(x0, torch.randn(4000, 1, generator=g), t)[:, 0]
        with torch.no_grad():
            eps_hat = net(torch.stack([x_t, torch.full_like(x_t, t / 1000)], dim=1))[:, 0]
        a = float(sch.alphas_cumprod[t].sqrt())
        sigma = float((1 - sch.alphas_cumprod[t]).sqrt())
        errors[t] = float((((x_t - sigma * eps_hat) / a - _true_denoiser(sch, x_t, t)) ** 2).mean().sqrt())
    return errors


def test_one_dimensional_toy_unbiased_target_recovers_the_marginal_denoiser_and_naive_does_not():
    """Fan et al. §3 toy: x₀ ∈ {−1, 0, 1, 2}; a score network that only sees x_s (s = 400) must still denoise the
    marginal p_t for t > s. Measured (seed 0): unbiased RMSE 0.11 / 0.04 / 0.08 at t = 450 / 600 / 750, naive
    0.44 / 0.22 / 0.15."""
    sch = _schedule()
    unbiased = _fit_subinterval_score(sch, "unbiased", s=400)
    naive = _fit_subinterval_score(sch, "naive", s=400)
    mean_u = sum(unbiased.values()) / 3
    mean_n = sum(naive.values()) / 3
    assert mean_u < 0.1, unbiased
    assert mean_n > 2.5 * mean_u, (unbiased, naive)
    assert all(naive[t] > unbiased[t] for t in unbiased), (unbiased, naive)


# --- the objective on a tiny SD-like network ---------------------------------------------------------------------------
def _setup(teacher, lora_rank=None, **cfg):
    config = {"num_phases": 2, "updates_per_phase": 2, "real_guidance_scale": 2.5, **cfg}
    starts = [hi for _, hi in teacher.schedule.snr_phases(config["num_phases"], config.get("phase_min_ratio", 0.0),
                                                          config.get("phase_max_ratio", 1.0))]
    torch.manual_seed(1)
    gen = PhasedGenerator.from_teacher(teacher, starts, lora_rank=lora_rank)
    with torch.no_grad():  # distinct experts, so a mix-up would show
        for name, p in gen.named_parameters():
            if lora_rank is None or "lora_B" in name:
                p.add_(0.02 * torch.randn_like(p))
    obj = build_objective("phased_dmd", teacher, gen, config)
    embeds = teacher.encode_prompt(["a red circle", "a blue square"], with_uncond=True)
    batch = Batch(embeds=embeds, noise=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)))
    return gen, obj, batch


def _expert_grads(gen: PhasedGenerator) -> list[float]:
    out = []
    for k in range(gen.num_steps):
        if gen.is_lora:
            ps = [p for n, p in gen.unet.named_parameters() if f".{gen.adapter_name(k)}." in n]
        else:
            ps = list(gen.expert(k).parameters())
        out.append(sum(float(p.grad.abs().sum()) for p in ps if p.grad is not None))
    return out


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_only_the_current_expert_receives_gradient(teacher, lora_rank):
    gen, obj, batch = _setup(teacher, lora_rank)
    for step, phase in ((0, 0), (1, 0), (2, 1), (3, 1)):
        obj.set_train_step(step)
        assert obj.phase == phase
        loss, logs = obj.generator_loss(batch)
        loss.backward()
        grads = _expert_grads(gen)
        assert grads[phase] > 0 and all(g == 0 for k, g in enumerate(grads) if k != phase), (step, grads)
        gen.zero_grad(set_to_none=True)
        assert not any(p.grad is not None for p in teacher.unet.parameters())


def _hand_coefficients(ac: torch.Tensor, t: int | None):
    if t is None:
        return torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    return ac[t].sqrt(), (1 - ac[t]).sqrt()


def test_generator_and_fake_gradients_match_a_hand_assembly(teacher):
    """Phase 0 of 2 (s = t₁): x_s from a direct expert call and a hand DDIM step; x_t, teacher CFG, fake score and the
    DMD2-normalised gradient by hand; the surrogate's gradient on expert 0 and the weighted subinterval loss's gradient
    on the fake score must equal the objective's."""
    gen, obj, batch = _setup(teacher)
    obj.set_train_step(0)
    ac = DDPMScheduler.from_config(teacher.pipeline.scheduler.config).alphas_cumprod.double()
    t0, t1 = gen.timesteps
    t = torch.tensor([t1 + 5, 900])
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    emb = batch.embeds

    def unet(net, x, tt, cond):
        return net(x, tt, encoder_hidden_states=cond).sample

    # hand: x_s and x̂₀ of expert 0
    z = batch.noise
    a0, s0 = _hand_coefficients(ac, t0)
    out0 = unet(gen.expert(0), z, torch.full((2,), t0), emb.cond).double()
    x0_gen = (z.double() - s0 * out0) / a0
    a1, s1 = _hand_coefficients(ac, t1)
    x_s = (a1 * x0_gen + s1 * out0).float()
    ratio = (ac[t] / ac[t1]).sqrt().reshape(-1, 1, 1, 1)
    sig_ts = ((1 - ac[t]) - ac[t] / ac[t1] * (1 - ac[t1])).sqrt().reshape(-1, 1, 1, 1)
    x_t = (ratio * x_s.detach().double() + sig_ts * eps.double()).float()
    with torch.no_grad():
        e_c = unet(teacher.unet, x_t, t, emb.cond).double()
        e_u = unet(teacher.unet, x_t, t, emb.uncond).double()
        e_real = e_u + 2.5 * (e_c - e_u)
        e_fake = unet(obj.fake_unet, x_t, t, emb.cond).double()
    a_t = ac[t].sqrt().reshape(-1, 1, 1, 1)
    s_t = (1 - ac[t]).sqrt().reshape(-1, 1, 1, 1)
    x0_real = (x_t.double() - s_t * e_real) / a_t
    x0_fake = (x_t.double() - s_t * e_fake) / a_t
    p_real = x0_gen.detach() - x0_real
    grad = (x0_fake - x0_real) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    hand_loss = 0.5 * ((x_s - (x_s.detach().double() - grad).float()) ** 2).mean()
    hand = torch.autograd.grad(hand_loss, list(gen.expert(0).parameters()))

    loss, _ = obj.generator_loss(batch, timesteps=t, noise=eps)
    got = torch.autograd.grad(loss, list(gen.expert(0).parameters()))
    worst = max(float((a - b).abs().max()) for a, b in zip(got, hand))
    scale = max(float(b.abs().max()) for b in hand)
    assert scale > 0 and worst < 1e-4 * scale, (worst, scale)

    # fake score: weight min(1, 10·σ²_{t|s}) on (F(x_t) − (σ_t/σ_{t|s})·ε)²
    target = (s_t / sig_ts * eps.double()).float()
    weight = torch.clamp(10.0 * sig_ts ** 2, max=1.0).float()
    fake_out = unet(obj.fake_unet, x_t, t, emb.cond)
    hand_fake = (weight * (fake_out - target) ** 2).mean()
    fake_params = [p for p in obj.fake_unet.parameters() if p.requires_grad]
    hand_g = torch.autograd.grad(hand_fake, fake_params)
    aux, _ = obj.auxiliary_loss(batch, timesteps=t, noise=eps)
    got_g = torch.autograd.grad(aux, fake_params)
    torch.testing.assert_close(aux, hand_fake, rtol=1e-5, atol=1e-6)
    worst = max(float((a - b).abs().max()) for a, b in zip(got_g, hand_g))
    assert worst < 1e-4 * max(float(b.abs().max()) for b in hand_g)
    # the naive target regresses ε and differs
    obj.config["target"] = "naive"
    naive, _ = obj.auxiliary_loss(batch, timesteps=t, noise=eps)
    assert abs(float(naive.detach()) - float(hand_fake.detach())) > 1e-3


def test_last_phase_is_dmd2_on_x0_and_fake_score_restarts_from_the_teacher(teacher):
    gen, obj, batch = _setup(teacher)
    with torch.no_grad():
        for p in obj.fake_unet.parameters():
            p.add_(0.1)
    obj.set_train_step(1)
    assert not obj.take_auxiliary_reset()  # same phase: nothing re-initialised
    obj.set_train_step(2)  # phase 1 starts
    assert obj.take_auxiliary_reset() and not obj.take_auxiliary_reset()
    for (name, p), q in zip(obj.fake_unet.named_parameters(), teacher.unet.parameters()):
        torch.testing.assert_close(p, q.float(), msg=name)
    assert int(obj.fake_phase) == 1 and obj.phase_interval()[0] is None  # the last phase ends at clean data
    x_end, x0 = gen.phase_output(batch.noise, batch.embeds, 1, grad=False)
    assert torch.equal(x_end, x0)
    obj.set_train_step(9)  # beyond the last phase: it keeps training the last expert
    assert obj.phase == 1 and not obj.take_auxiliary_reset()


def test_sampling_chains_experts_with_ddim_steps(teacher):
    gen, _, batch = _setup(teacher)
    emb = batch.embeds
    ac = DDPMScheduler.from_config(teacher.pipeline.scheduler.config).alphas_cumprod.double()
    t0, t1 = gen.timesteps
    x = batch.noise.double()
    a0, s0 = _hand_coefficients(ac, t0)
    e0 = gen.expert(0)(batch.noise, torch.full((2,), t0), encoder_hidden_states=emb.cond).sample.double()
    x1 = (a0 ** -1 * (x - s0 * e0)) * ac[t1].sqrt() + (1 - ac[t1]).sqrt() * e0
    a1, s1 = _hand_coefficients(ac, t1)
    e1 = gen.expert(1)(x1.float(), torch.full((2,), t1), encoder_hidden_states=emb.cond).sample.double()
    want = (x1 - s1 * e1) / a1
    with torch.no_grad():
        got = gen.sample(batch.noise, emb)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_config_errors_name_the_fix(teacher):
    gen = PhasedGenerator.from_teacher(teacher, [999, 500])
    with pytest.raises(ObjectiveConfigError, match=r"need generator timesteps \[999, 233\]"):
        build_objective("phased_dmd", teacher, gen, {"num_phases": 2})
    with pytest.raises(ObjectiveConfigError, match="target"):
        build_objective("phased_dmd", teacher, gen, {"num_phases": 2, "target": "biased"})


# --- progressive training in the trainer, with resume -------------------------------------------------------------
def _train(teacher, out: Path, resume=None, crash_after: int | None = None):
    from stepdistill.training.config import RunConfig
    from stepdistill.training.trainer import Trainer

    gen, obj, _ = _setup(teacher)
    cfg = RunConfig.from_dict({
        "objective": "phased_dmd",
        "generator": {"timesteps": list(gen.timesteps), "experts": True},
        "optimizer": {"generator_lr": 1e-3, "aux_lr": 1e-3},
        "train": {"batch_size": 2, "max_steps": 4 if crash_after is None else crash_after, "checkpoint_every": 1,
                  "keep_checkpoints": 10, "log_every": 1, "seed": 0, "grad_clip": None},
        "prompts": {"source": "toy"},
    })
    trainer = Trainer(cfg, teacher, gen, obj, ["a red circle", "a blue square"], out)
    trainer.train(resume=resume)
    return gen, obj, trainer


def test_progressive_phases_reset_the_fake_optimizer_and_resume_in_the_right_phase(teacher, tmp_path,
                                                                                 fresh_accelerate_state):
    gen, obj, trainer = _train(teacher, tmp_path / "ref")
    ref = {k: v.clone() for k, v in {**gen.state_dict(), **{f"f.{k}": v for k, v in obj.state_dict().items()}}.items()}
    assert int(obj.fake_phase) == 1
    (opt,) = trainer.aux_opts.values()
    steps = {int(s["step"]) for s in getattr(opt, "optimizer", opt).state.values()}
    assert steps == {10}, steps  # Adam moments restarted with phase 1: 2 updates × 5 fake updates (20 without the reset)
    ckpt = tmp_path / "ref" / "checkpoints"
    phases = {}
    for name in ("step_000002", "step_000003"):
        state = torch.load(ckpt / name / "trainable_state.pt", weights_only=True)
        phases[name] = int(state["objective.fake_phase"])
    assert phases == {"step_000002": 0, "step_000003": 1}
    for start in ("step_000002", "step_000003"):  # at the boundary (re-initialises once) and mid-phase (keeps F_1)
        reset_accelerate_state()
        run = tmp_path / f"run_{start}"
        import shutil

        shutil.copytree(tmp_path / "ref", run)
        for later in sorted(p for p in (run / "checkpoints").iterdir() if p.name > start and p.name.startswith("step")):
            shutil.rmtree(later)
        gen2, obj2, _ = _train(teacher, run, resume=str(run / "checkpoints" / start))
        got = {**gen2.state_dict(), **{f"f.{k}": v for k, v in obj2.state_dict().items()}}
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=0, msg=f"{k} after resuming from {start}")


# --- export: a multi-expert student in plain diffusers ------------------------------------------------------------------
_RUNNER = r"""
import json, sys, warnings
import numpy as np, torch
from diffusers import DiffusionPipeline

spec = json.load(open(sys.argv[1]))
out = {}
for case in spec["cases"]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = DiffusionPipeline.from_pretrained(case["folder"], trust_remote_code=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(np.load(spec["latents"]))
    lat = pipe(spec["prompt"], num_inference_steps=case["steps"], guidance_scale=1.0, latents=latents,
               output_type="latent").images
    np.save(case["result"], lat.numpy())
    img = pipe(spec["prompt"], num_inference_steps=case["steps"], latents=latents, output_type="np").images
    try:
        pipe(spec["prompt"], num_inference_steps=case["steps"] + 1, latents=latents, output_type="latent")
        wrong_steps = "accepted"
    except ValueError as e:
        wrong_steps = str(e)
    out[case["name"]] = {"class": type(pipe).__name__, "image_shape": list(img.shape), "wrong_steps": wrong_steps,
                         "experts": len(pipe.experts)}
json.dump(out, open(spec["report"], "w"))
"""


def test_phased_student_exports_and_samples_in_plain_diffusers(teacher, tmp_path):
    import numpy as np

    from stepdistill.export import export_student

    prompt = "a red circle"
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    np.save(tmp_path / "latents.npy", noise.numpy())
    cases, refs = [], {}
    for lora in (None, 4):
        gen, _, _ = _setup(teacher, lora_rank=lora, num_phases=3)
        name = f"phased_{'lora' if lora else 'full'}"
        folder = export_student(teacher, gen, tmp_path / name, method="phased_dmd", ema=False, example_prompt=prompt)
        with torch.no_grad():
            refs[name] = gen.sample(noise, teacher.encode_prompt([prompt], with_uncond=False)).numpy()
        cases.append({"name": name, "folder": str(folder), "steps": 3, "result": str(tmp_path / f"{name}.npy")})
        card = (folder / "README.md").read_text()
        assert f'DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True)' in card
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == ["pipeline_phased_experts", "PhasedExpertsPipeline"]
        assert index["expert_timesteps"] == list(gen.timesteps)
        assert (folder / "unet_2").is_dir() and not (folder / "unet_3").exists()
    spec = {"prompt": prompt, "latents": str(tmp_path / "latents.npy"), "cases": cases,
            "report": str(tmp_path / "report.json")}
    report = run_without_stepdistill(_RUNNER, spec, tmp_path)
    assert report["stepdistill_modules"] == []
    for case in cases:
        rec = report[case["name"]]
        assert rec["class"] == "PhasedExpertsPipeline" and rec["experts"] == 3
        assert rec["image_shape"] == [1, 16, 16, 3]
        assert "samples in exactly 3 steps" in rec["wrong_steps"]
        got = np.load(case["result"])
        ref = refs[case["name"]]
        assert np.abs(got - ref).max() < 1e-5 * max(1.0, np.abs(ref).max()), np.abs(got - ref).max()


def test_finished_experts_take_their_ema_weights_when_the_next_phase_starts(teacher):
    from stepdistill.models.ema import GeneratorEMA, attach_ema
    from stepdistill.training.stages import finalise_experts

    gen, obj, _ = _setup(teacher)
    ema = GeneratorEMA(gen.trainable_parameters(), 0.9)
    attach_ema(gen, ema)
    with torch.no_grad():  # raw weights move away from the EMA's shadow
        for p in gen.parameters():
            p.add_(0.01)
    shadow = {id(p): s.clone() for p, s in zip(ema.parameters, ema.shadow_params)}
    expert1_before = [p.clone() for p in gen.expert(1).parameters()]
    finalise_experts(gen, ema, obj.plan_update(1).final_experts)  # same phase: nothing changes
    assert not all(torch.equal(p, shadow[id(p)]) for p in gen.expert(0).parameters())
    finalise_experts(gen, ema, obj.plan_update(2).final_experts)  # phase 1 starts: expert 0 is final, becomes its EMA
    assert all(torch.equal(p, shadow[id(p)]) for p in gen.expert(0).parameters())
    assert all(torch.equal(p, q) for p, q in zip(gen.expert(1).parameters(), expert1_before))


# --- the timesteps are checked before anything is written -------------------------------------------------------------
def test_phased_dmd_timesteps_are_checked_by_dry_run(spec, tmp_path):
    out = tmp_path / "phased"
    line = one_error_line(cli("distill", "--pipeline", str(spec), "--recipe", str(REPO / "training" / "toy-phased-dmd.yaml"),
                              "--out", str(out), "--dry-run", "--set", "generator.timesteps=[999,500,250,100]"),
                          "generator.timesteps", "need generator timesteps")
    assert "toy-phased-dmd.yaml" in line and not out.exists()
