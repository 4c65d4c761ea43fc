"""LCM, LCM-LoRA and TCD against independent computations on the tiny SD teacher: the guidance embedding against
diffusers' own, the boundary scalings against the formula and ``LCMScheduler``, one solver step by hand from the
scheduler's ``alphas_cumprod``, the EMA target update, and the loss's gradient against the reference scripts'
loss written out with raw UNet calls (diffusers ``train_lcm_distill_sd_wds.py``; TCD: rootonchair's fork, with its
``get_predicted_original_sample_tcd`` in log-SNR form), reaching the online network only."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler
from reference_maths import B, ac, assert_grad_matches, perturb_

from stepdistill.models.conditioning import PromptEmbeds, guidance_scale_embedding
from stepdistill.models.generators import ConsistencyGenerator
from stepdistill.objectives import Batch, RealImages, build_objective
from stepdistill.objectives.lcm import boundary_scalings

W = torch.tensor([1.5, 4.0, 7.0])
INDEX = torch.tensor([0, 24, 49])  # grid positions: t_{n+k} = 19, 499, 999; t_n = 0, 479, 979
END_INDEX = torch.tensor([0, 10, 49])  # TCD: s = max(grid[j] − 20, 0) = 0, 199, 979


@pytest.fixture()
def real_batch():
    g = torch.Generator().manual_seed(2)
    embeds = PromptEmbeds(cond=torch.randn(B, 6, 32, generator=g), uncond=torch.randn(1, 6, 32, generator=g).expand(B, 6, 32))
    return Batch(embeds=embeds, noise=torch.randn(B, 4, 8, 8, generator=g),
                 real=RealImages(torch.randn(B, 4, 8, 8, generator=g)))


def full_student(teacher, sampler="lcm"):
    torch.manual_seed(0)
    gen = ConsistencyGenerator.from_teacher(teacher, 4, sampler=sampler, guidance_scale=3.0, guidance_embedding_dim=32)
    perturb_(gen.unet, std=0.01)
    return gen


# --- the pieces -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [32, 256, 7])
def test_guidance_embedding_equals_diffusers(dim):
    w = torch.tensor([0.0, 1.5, 7.5, 14.0])
    ours = guidance_scale_embedding(w, dim)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    assert ours.shape == (4, dim)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_boundary_scalings_follow_the_formula_and_lcm_scheduler():
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = boundary_scalings(t, 10.0, 0.5)
    for i, ti in enumerate(t.tolist()):
        st = 10.0 * ti
        assert float(c_skip[i]) == pytest.approx(0.25 / (st**2 + 0.25), rel=1e-12)
        assert float(c_out[i]) == pytest.approx(st / math.sqrt(st**2 + 0.25), rel=1e-12)
        sk, so = LCMScheduler().get_scalings_for_boundary_condition_discrete(ti)
        assert float(c_skip[i]) == pytest.approx(float(sk), rel=1e-6)
        assert float(c_out[i]) == pytest.approx(float(so), rel=1e-6, abs=1e-12)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0  # f(x, 0) = x


def test_solver_grid_is_lcms():
    from stepdistill.core.schedule import NoiseSchedule

    grid = NoiseSchedule(LCMScheduler().alphas_cumprod).consistency_grid(50)
    sched = LCMScheduler()
    sched.set_timesteps(50)
    assert grid.tolist() == sorted(int(t) for t in sched.timesteps)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1] == 999


def test_one_teacher_solver_step_by_hand(teacher, real_batch):
    gen = full_student(teacher)
    obj = build_objective("lcm", teacher, gen, {"w_min": 1.0, "w_max": 8.0})
    x = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    t, t_prev = torch.tensor([19, 499, 999]), torch.tensor([0, 479, 979])
    e = real_batch.embeds
    got = obj.teacher_solver_step(x, t, t_prev, e, W)
    with torch.no_grad():
        eps_c = teacher.unet(x, t, encoder_hidden_states=e.cond).sample.double()
        eps_u = teacher.unet(x, t, encoder_hidden_states=e.uncond).sample.double()
    a_t, a_p = ac(teacher, t), ac(teacher, t_prev)
    x0_c = (x.double() - (1 - a_t).sqrt() * eps_c) / a_t.sqrt()
    x0_u = (x.double() - (1 - a_t).sqrt() * eps_u) / a_t.sqrt()
    w = W.double().view(-1, 1, 1, 1)
    x0_w, eps_w = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
    expected = a_p.sqrt() * x0_w + (1 - a_p).sqrt() * eps_w
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_target_network_is_an_ema_without_warmup(teacher):
    gen = full_student(teacher)
    obj = build_objective("lcm", teacher, gen, {"target_ema_decay": 0.9})
    before = [p.detach().clone() for p in obj.target_unet.parameters()]
    with torch.no_grad():
        for p in gen.unet.parameters():
            p.add_(0.1)
    obj.after_generator_update()
    for old, new, online in zip(before, obj.target_unet.parameters(), gen.unet.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online.detach())
    assert not any(p.requires_grad for p in obj.target_unet.parameters())


# --- the loss's gradient ---------------------------------------------------------------------------------------------
def _reference_loss(teacher, online, target, batch, noise, w, tcd_end=None, loss_type="l2", huber_c=1e-3):
    """The reference scripts' loss with raw UNet calls: alphas from the scheduler, c_skip/c_out from the formula,
    the guidance embedding from diffusers' pipeline helper, LCM's CFG form; TCD's jump in log-SNR form."""
    x0 = batch.real.latents
    grid = torch.arange(1, 51) * 20 - 1
    t_start = grid[INDEX]
    t_n = (t_start - 20).clamp(min=0)
    a_s, a_n = ac(teacher, t_start), ac(teacher, t_n)
    x = (a_s.sqrt() * x0.double() + (1 - a_s).sqrt() * noise.double()).float()
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    e = batch.embeds

    def scal(t):
        st = 10.0 * t.double()
        return (0.25 / (st**2 + 0.25)).view(-1, 1, 1, 1), (st / (st**2 + 0.25).sqrt()).view(-1, 1, 1, 1)

    def out(net, x_in, t):
        eps = net(x_in, t, timestep_cond=emb, encoder_hidden_states=e.cond).sample.double()
        a = ac(teacher, t)
        x0_hat = (x_in.double() - (1 - a).sqrt() * eps) / a.sqrt()
        if tcd_end is not None:
            s = tcd_end
            al_t, si_t = a.sqrt(), (1 - a).sqrt()
            al_s, si_s = ac(teacher, s).sqrt(), (1 - ac(teacher, s)).sqrt()
            h = (al_s.log() - si_s.log()) - (al_t.log() - si_t.log())
            x0_hat = si_s * x_in.double() / si_t - al_s * (torch.exp(-h) - 1.0) * x0_hat
        c_skip, c_out = scal(t)
        return c_skip * x_in.double() + c_out * x0_hat

    model_pred = out(online, x, t_start)
    with torch.no_grad():
        eps_c = teacher.unet(x, t_start, encoder_hidden_states=e.cond).sample.double()
        eps_u = teacher.unet(x, t_start, encoder_hidden_states=e.uncond).sample.double()
        x0_c = (x.double() - (1 - a_s).sqrt() * eps_c) / a_s.sqrt()
        x0_u = (x.double() - (1 - a_s).sqrt() * eps_u) / a_s.sqrt()
        wv = w.double().view(-1, 1, 1, 1)
        x_prev = (a_n.sqrt() * (x0_c + wv * (x0_c - x0_u)) + (1 - a_n).sqrt() * (eps_c + wv * (eps_c - eps_u))).float()
        tgt = out(target, x_prev, t_n)
    d = model_pred.float() - tgt.float()
    if loss_type == "huber":
        return (torch.sqrt(d**2 + huber_c**2) - huber_c).mean()
    return d.pow(2).mean()


@pytest.mark.parametrize("method,loss_type", [("lcm", "l2"), ("lcm", "huber"), ("tcd", "l2")])
def test_loss_gradient_matches_the_reference_and_reaches_the_online_network_only(teacher, real_batch, method, loss_type):
    gen = full_student(teacher, sampler="tcd" if method == "tcd" else "lcm")
    obj = build_objective(method, teacher, gen, {"loss_type": loss_type, "huber_c": 0.01})
    with torch.no_grad():  # a target that differs from the online network, so the loss is not trivially small
        for p in obj.target_unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() % 97)))
    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    end = None
    if method == "tcd":
        end = (torch.arange(1, 51) * 20 - 1)[END_INDEX].sub(20).clamp(min=0)
    loss, _ = obj.generator_loss(real_batch, timesteps=INDEX, noise=noise, w=W,
                                 end_index=END_INDEX if method == "tcd" else None)
    loss.backward()
    got = [p.grad.clone() for p in gen.unet.parameters()]
    assert all(p.grad is None for p in teacher.unet.parameters())
    assert all(p.grad is None for p in obj.target_unet.parameters())

    online = copy.deepcopy(gen.unet)
    for p in online.parameters():
        p.grad = None
    ref = _reference_loss(teacher, online, obj.target_unet, real_batch, noise, W, end, loss_type, 0.01)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-4)
    ref.backward()
    flat_got = torch.cat([g.flatten() for g in got])
    flat_ref = torch.cat([p.grad.flatten() for p in online.parameters()])
    assert_grad_matches(flat_got, flat_ref)


def test_lcm_lora_target_is_the_online_network_without_gradient(real_batch):
    from tiny_models import make_tiny_sd_pipeline

    from stepdistill.models.teacher import Teacher

    teacher = Teacher(make_tiny_sd_pipeline(seed=0))  # its own: the student's adapter goes onto this UNet
    torch.manual_seed(0)
    gen = ConsistencyGenerator.from_teacher(teacher, 4, lora_rank=4, share_teacher_base=True)
    perturb_(gen.unet, std=0.05, only="lora_B")
    obj = build_objective("lcm", teacher, gen, {"target": "online"})
    assert obj.target_unet is None and obj.target_network() is gen.unet
    loss, _ = obj.generator_loss(real_batch, timesteps=INDEX, w=W)
    loss.backward()
    lora = [p for p in gen.unet.parameters()]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora if p.requires_grad)
    assert all(p.grad is None for n, p in teacher.unet.named_parameters() if "lora_" not in n)
    with pytest.raises(ValueError, match="target: online"):
        build_objective("lcm", teacher, gen, {"target": "ema"})


def test_tcd_end_points_lie_on_the_grid_at_or_below_t_n(teacher):
    gen = full_student(teacher, sampler="tcd")
    obj = build_objective("tcd", teacher, gen, {})
    index = torch.randint(0, 50, (4000,), generator=torch.Generator().manual_seed(0))
    _, _, t_n = obj.solver_timesteps(4000, "cpu", index)
    torch.manual_seed(1)
    s = obj.end_timesteps(index, t_n)
    assert (s <= t_n).all() and (s >= 0).all()
    assert set(((s + 20) % 20).tolist()) <= {19, 0}  # grid points minus k (19 -> 0 after the clamp at 0)
    assert (s == t_n).any() and (s < t_n).any()
    top = s[index == 49]
    assert top.min() == 0 and top.max() == 979  # both ends of U{0 … n} are drawn


def test_consistency_objectives_refuse_other_students(teacher):
    from stepdistill.models.generators import Generator

    with pytest.raises(ValueError, match="generator.consistency"):
        build_objective("lcm", teacher, Generator.from_teacher(teacher), {})
    with pytest.raises(ValueError, match="scheduler: tcd"):
        build_objective("tcd", teacher, full_student(teacher, "lcm"), {})


def test_a_resumed_lcm_run_equals_an_uninterrupted_one_target_network_included(spec, tmp_path, monkeypatch):
    from helpers import QUICK, REPO, reset_accelerate_state, use_random_real_latents

    from stepdistill.workflows.distill import distill

    use_random_real_latents(monkeypatch)
    pipe = tmp_path / "pipe-real.yaml"
    pipe.write_text(spec.read_text() + "real_images: toy\n")
    recipe = REPO / "training" / "toy-lcm.yaml"
    base = [*QUICK, "train.checkpoint_every=2", "train.keep_checkpoints=5"]

    def run(out, steps, resume=None):
        reset_accelerate_state()
        try:
            distill(pipe, recipe, out, overrides=[*base, f"train.max_steps={steps}"], resume=resume, export=False,
                    log=lambda *a: None)
        finally:
            reset_accelerate_state()

    def final(out):
        ckpt = out / "checkpoints" / "step_000004"
        trained = torch.load(ckpt / "trainable_state.pt", weights_only=True)
        extra = [torch.load(p, weights_only=False) for p in sorted(ckpt.glob("custom_checkpoint_*.pkl"))]
        return trained, [e for e in extra if isinstance(e, dict) and any("time_embedding" in k for k in e)]

    run(tmp_path / "one", 4)
    run(tmp_path / "two", 2)
    run(tmp_path / "two", 4, resume="latest")
    (a, targets_a), (b, targets_b) = final(tmp_path / "one"), final(tmp_path / "two")
    assert len(targets_a) == 1 and len(targets_b) == 1  # the target network is in the checkpoint
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in targets_a[0]:
        assert torch.equal(targets_a[0][k], targets_b[0][k]), k
    online = {k.split("generator.unet.", 1)[1]: v for k, v in a.items() if "generator.unet." in k}
    assert any(not torch.equal(online[k], targets_a[0][k]) for k in online)  # θ⁻ lags θ


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lcm_trains_on_flow_teachers_through_distill(tmp_path, monkeypatch, kind):
    from helpers import QUICK, REPO, reset_accelerate_state, trainable_states, use_random_real_latents
    from tiny_models import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

    from stepdistill.workflows.distill import distill

    use_random_real_latents(monkeypatch)
    (make_tiny_sd3_pipeline if kind == "sd3" else make_tiny_flux_pipeline)(tmp_path / kind)
    size = "resolution: 16\n" if kind == "flux" else ""
    (tmp_path / "pipe.yaml").write_text(f"teacher: {tmp_path / kind}\ndtype: float32\n{size}real_images: toy\n")
    # no guidance embedding on a transformer; FLUX.1-dev embeds its own guidance, so w = 0 (no CFG on top)
    extra = ["generator.consistency.guidance_embedding_dim=null", "generator.consistency.guidance_scale=1.0"]
    if kind == "flux":
        extra += ["objective_config.w_min=0.0", "objective_config.w_max=0.0"]
    reset_accelerate_state()
    try:
        summary = distill(tmp_path / "pipe.yaml", REPO / "training" / "toy-lcm.yaml", tmp_path / "run",
                          overrides=[*QUICK, *extra, "train.max_steps=2", "train.checkpoint_every=2"], export=False,
                          log=lambda *a: None)
    finally:
        reset_accelerate_state()
    assert summary["steps"] == 2
    (state,) = trainable_states(tmp_path / "run").values()
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
