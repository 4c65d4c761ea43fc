"""SiD / SiD-LSG on a tiny SD-like teacher, checked against independent computations of the official formula.

The expected gradients are assembled by hand here, *independently of stepdistill.core.schedule and of the objective*:
ᾱ_t comes from the diffusers scheduler, x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, CFG is done with two separate UNet calls, and
the input-Jacobians of the teacher and of the fake score are applied with ``torch.func.vjp``. The official generator
loss (mingyuanzhou/SiD-LSG ``training/sid_training_loop.py``) is
  L = Σ (y_real − y_fake)·((y_real − x) − α·(y_real − y_fake)) / w / B,  w = sg(mean|x − y_real|),
with y_real, y_fake functions of x through x_t = a_t·x + σ_t·ε, so
  ∂L/∂x = [J_Rᵀ(Bv + (1−α)A) − J_F₂ᵀ·Bv + α·J_F₃ᵀ·A − A] / (w·B),  A = R − F₂, Bv = (R − x) − α(R − F₃).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_maths import B, fixed_eps

from stepdistill.models.conditioning import PromptEmbeds
from stepdistill.models.generators import Generator
from stepdistill.objectives import Batch, build_objective

T_FIXED = torch.tensor([20, 500, 979])


@pytest.fixture(scope="module")
def embeds():
    """Overrides conftest's: the ``batch`` fixture of conftest.py is built on these."""
    g = torch.Generator().manual_seed(1)
    # the same unconditional row for every sample, as the empty prompt is
    uncond = torch.randn(1, 6, 32, generator=g).expand(B, -1, -1).clone()
    return PromptEmbeds(cond=torch.randn(B, 6, 32, generator=g), uncond=uncond)


def make(teacher, config=None, **gen_kwargs):
    gen = Generator.from_teacher(teacher, **gen_kwargs)
    obj = build_objective("sid", teacher, gen, config or {})
    perturb_(obj.fake_unet)
    return obj


def perturb_(module: torch.nn.Module, std: float = 0.03, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def leaf_x(obj, seed: int = 4) -> torch.Tensor:
    x = (0.5 * torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(seed))).requires_grad_(True)
    obj.generate = lambda batch, grad=True: x  # noqa: ARG005 - instance attribute shadows the method
    return x


# --- independent reference maths ------------------------------------------------------------------------------------
def ac(teacher, t):
    return teacher.pipeline.scheduler.alphas_cumprod.to(torch.float32)[t].view(-1, 1, 1, 1)


def x0_fn(unet, teacher, eps, t, embeds, w: float):
    """x ↦ x̂₀ of ``unet`` at CFG ``w`` evaluated at x_t = √ᾱ·x + √(1−ᾱ)·ε (differentiable in x)."""
    a = ac(teacher, t)

    def f(x):
        x_t = a.sqrt() * x + (1 - a).sqrt() * eps
        cond = unet(x_t, t, encoder_hidden_states=embeds.cond).sample
        out = cond if w == 1.0 else (unet(x_t, t, encoder_hidden_states=embeds.uncond).sample * (1 - w) + w * cond)
        return (x_t - (1 - a).sqrt() * out) / a.sqrt()

    return f


def expected_grad(obj, teacher, x, eps, t, embeds, k2, k3, k4, alpha, jacobians=True):
    """∂L/∂x assembled from the formula (module docstring) with torch.func.vjp for the input-Jacobians."""
    x = x.detach()
    R_f = x0_fn(teacher.unet, teacher, eps, t, embeds, k4)
    F2_f = x0_fn(obj.fake_unet, teacher, eps, t, embeds, k2)
    F3_f = x0_fn(obj.fake_unet, teacher, eps, t, embeds, k3)
    R, vjp_R = torch.func.vjp(R_f, x)
    F2, vjp_F2 = torch.func.vjp(F2_f, x)
    F3, vjp_F3 = torch.func.vjp(F3_f, x)
    w = (x - R).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
    A = R - F2
    Bv = (R - x) - alpha * (R - F3)
    direct = -A / w
    if not jacobians:
        return direct / B, (A * Bv / w).sum() / B
    g = vjp_R((Bv + (1 - alpha) * A) / w)[0] - vjp_F2(Bv / w)[0] + alpha * vjp_F3(A / w)[0] + direct
    return g / B, (A * Bv / w).sum() / B


def close(got, expected, rtol=2e-3):
    scale = float(expected.detach().abs().max())
    assert scale > 0, "degenerate test: the expected value is zero"
    torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=rtol * scale)


# --- the generator loss --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_generator_gradient_includes_both_input_jacobians(teacher, batch, alpha):
    k = 2.0
    obj = make(teacher, {"alpha": alpha, "kappa1": k, "kappa2": k, "kappa3": k, "kappa4": k})
    x = leaf_x(obj)
    eps = fixed_eps()
    loss, logs = obj.generator_loss(batch, timesteps=T_FIXED, noise=eps)
    loss.backward()
    want, want_loss = expected_grad(obj, teacher, x, eps, T_FIXED, batch.embeds, k, k, k, alpha)
    close(x.grad, want)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-3, abs=1e-5)
    # without the two Jacobian terms (the DMD-like gradient) the result is measurably different
    dropped, _ = expected_grad(obj, teacher, x, eps, T_FIXED, batch.embeds, k, k, k, alpha, jacobians=False)
    rel = float((x.grad - dropped).norm() / dropped.norm())
    assert rel > 0.05, f"the Jacobian terms changed the gradient by only {rel:.3%}"
    # the frozen networks receive no gradient, and stay trainable afterwards
    assert all(p.grad is None for p in teacher.unet.parameters())
    assert all(p.grad is None for p in obj.fake_unet.parameters()) and all(p.requires_grad for p in obj.fake_unet.parameters())


def test_kappa_routing_each_scale_reaches_its_term(teacher, batch):
    k2, k3, k4 = 1.7, 3.0, 4.5
    obj = make(teacher, {"alpha": 1.2, "kappa1": 2.5, "kappa2": k2, "kappa3": k3, "kappa4": k4})
    x = leaf_x(obj)
    eps = fixed_eps()
    loss, _ = obj.generator_loss(batch, timesteps=T_FIXED, noise=eps)
    loss.backward()
    want, want_loss = expected_grad(obj, teacher, x, eps, T_FIXED, batch.embeds, k2, k3, k4, 1.2)
    close(x.grad, want)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-3, abs=1e-5)
    # swapping two scales changes the loss: the routing is not symmetric by accident
    _, swapped = expected_grad(obj, teacher, x, eps, T_FIXED, batch.embeds, k3, k2, k4, 1.2)
    assert abs(swapped.item() - want_loss.item()) > 1e-3 * abs(want_loss.item())


def test_fake_score_loss_regresses_the_kappa1_combination(teacher, batch):
    k1 = 2.5
    obj = make(teacher, {"kappa1": k1, "kappa2": 1.0, "kappa3": 1.0, "kappa4": 1.0})
    x = leaf_x(obj)
    eps = fixed_eps()
    t = torch.tensor([20, 421, 979])
    drop = torch.tensor([False, True, False])
    loss, _ = obj.auxiliary_loss(batch, timesteps=t, noise=eps, drop=drop)
    a = ac(teacher, t)
    x_t = a.sqrt() * x.detach() + (1 - a).sqrt() * eps
    cond_rows = torch.where(drop.view(-1, 1, 1), batch.embeds.uncond, batch.embeds.cond)
    with torch.no_grad():
        cond = obj.fake_unet(x_t, t, encoder_hidden_states=cond_rows).sample
        uncond = obj.fake_unet(x_t, t, encoder_hidden_states=batch.embeds.uncond).sample
    pred = uncond + k1 * (cond - uncond)
    assert loss.item() == pytest.approx(((pred - eps) ** 2).sum().item() / B, rel=1e-4)


def test_dropped_prompts_condition_the_generator_sample_too(teacher):
    """The official loop replaces a dropped prompt by "" before the generator samples (SiD-LSG
    ``sid_training_loop.py`` 392-411): the generator's input embeddings of dropped rows are the empty prompt's, the
    other rows keep their prompts, and the fake score is trained on that very sample under the same embeddings."""
    prompts = ["a red circle", "a blue square", "a green triangle"]
    embeds = teacher.encode_prompt(prompts, with_uncond=True)
    empty = teacher.encode_prompt([""], with_uncond=False).cond[0]
    own = teacher.encode_prompt(prompts, with_uncond=False).cond
    batch = Batch(embeds=embeds, noise=torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(6)))
    obj = make(teacher, {"kappa1": 1.5, "kappa2": 1.5, "kappa3": 1.5, "kappa4": 1.5})
    seen = {}
    x = (0.5 * torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(4)))

    def generate(b, grad=True):  # noqa: ARG001 - records what the generator is conditioned on
        seen["cond"] = b.embeds.cond.clone()
        return x

    obj.generate = generate
    drop = torch.tensor([True, False, True])
    t, eps = torch.tensor([20, 421, 979]), fixed_eps()
    loss, _ = obj.auxiliary_loss(batch, timesteps=t, noise=eps, drop=drop)
    for i in range(B):
        want = empty if drop[i] else own[i]
        torch.testing.assert_close(seen["cond"][i], want, rtol=0, atol=0)
    # the fake-score loss on that sample, computed by hand: rows 0 and 2 under "", row 1 under its prompt
    a = ac(teacher, t)
    x_t = a.sqrt() * x + (1 - a).sqrt() * eps
    rows = torch.stack([empty if drop[i] else own[i] for i in range(B)])
    with torch.no_grad():
        cond = obj.fake_unet(x_t, t, encoder_hidden_states=rows).sample
        uncond = obj.fake_unet(x_t, t, encoder_hidden_states=empty.expand(B, -1, -1)).sample
    pred = uncond + 1.5 * (cond - uncond)
    assert loss.item() == pytest.approx(((pred - eps) ** 2).sum().item() / B, rel=1e-4)


def test_prompt_dropout_only_when_a_fake_scale_is_not_one(teacher):
    assert make(teacher, {"kappa1": 1.5, "kappa2": 1.5, "kappa3": 1.5, "kappa4": 1.5}).uses_prompt_dropout()
    assert make(teacher, {"kappa1": 1.0, "kappa2": 2.0, "kappa3": 2.0, "kappa4": 1.0}).uses_prompt_dropout()
    assert not make(teacher, {"kappa1": 1.0, "kappa2": 1.0, "kappa3": 1.0, "kappa4": 4.5}).uses_prompt_dropout()


def test_zero_cfg_and_anti_cfg_modes(teacher, batch):
    ones = {"kappa1": 1.0, "kappa2": 1.0, "kappa3": 1.0, "kappa4": 1.0}
    zero = make(teacher, {"guidance_mode": "zero_cfg", **ones})
    assert not zero.uses_prompt_dropout()
    fake = zero.fake_embeds(batch.embeds)
    assert torch.equal(fake.cond, batch.embeds.uncond)  # the fake score never sees the text
    x = leaf_x(zero)
    eps = fixed_eps()
    loss, _ = zero.generator_loss(batch, timesteps=T_FIXED, noise=eps)
    loss.backward()
    empty = PromptEmbeds(cond=batch.embeds.uncond, uncond=batch.embeds.uncond)
    # teacher conditional at κ₄ = 1; fake score on the empty prompt
    R = x0_fn(teacher.unet, teacher, eps, T_FIXED, batch.embeds, 1.0)(x.detach())
    Fz = x0_fn(zero.fake_unet, teacher, eps, T_FIXED, empty, 1.0)(x.detach())
    w = (x.detach() - R).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert loss.item() == pytest.approx(((R - Fz) * (Fz - x.detach()) / w).sum().item() / B, rel=1e-3, abs=1e-5)
    with pytest.raises(ValueError, match="zero_cfg"):
        build_objective("sid", teacher, Generator.from_teacher(teacher), {"guidance_mode": "zero_cfg"})

    anti = make(teacher, {"guidance_mode": "anti_cfg", "anti_cfg_scale": -0.5, "kappa1": 1.0, "kappa4": 3.0})
    assert anti.scales()["kappa2"] == anti.scales()["kappa3"] == -0.5 and anti.uses_prompt_dropout()
    x = leaf_x(anti)
    loss, _ = anti.generator_loss(batch, timesteps=T_FIXED, noise=eps)
    loss.backward()
    want, _ = expected_grad(anti, teacher, x, eps, T_FIXED, batch.embeds, -0.5, -0.5, 3.0, 1.0)
    close(x.grad, want)
    with pytest.raises(ValueError, match="negative"):
        build_objective("sid", teacher, Generator.from_teacher(teacher), {"guidance_mode": "anti_cfg", "anti_cfg_scale": 2.0})


def test_config_is_validated(teacher):
    gen = Generator.from_teacher(teacher)
    with pytest.raises(ValueError, match="min_t"):
        build_objective("sid", teacher, gen, {"min_t": 900, "max_t": 100})
    with pytest.raises(ValueError, match="guidance_mode"):
        build_objective("sid", teacher, gen, {"guidance_mode": "cfg++"})
    with pytest.raises(ValueError, match="unknown config key"):
        build_objective("sid", teacher, gen, {"kappa5": 1.0})


# --- the generator's input convention and the few-step mixture ----------------------------------------------------
def test_scaled_input_noise_and_sid_timesteps(teacher, embeds):
    gen = Generator.from_teacher(teacher, timesteps=[625], scaled_input_noise=True)
    z = fixed_eps()
    sigma = (1 - teacher.pipeline.scheduler.alphas_cumprod[625]).sqrt()
    torch.testing.assert_close(gen.initial_input(z), sigma * z)
    x = gen(z, embeds)
    a = ac(teacher, torch.full((B,), 625))
    with torch.no_grad():
        eps_hat = teacher.unet(sigma * z, torch.full((B,), 625), encoder_hidden_states=embeds.cond).sample
    torch.testing.assert_close(x, ((sigma * z - (1 - a).sqrt() * eps_hat) / a.sqrt()).float(), rtol=1e-4, atol=1e-4)
    # the official ⌊t_init·(1 − i/K)⌋ (long-tensor truncation)
    assert teacher.schedule.sid_timesteps(625, 4) == [625, 468, 312, 156]
    assert teacher.schedule.sid_timesteps(599, 4) == [599, 449, 299, 149]


def test_few_step_mixture_grad_only_on_step_k_and_shared_k(teacher, batch):
    gen = Generator.from_teacher(teacher, timesteps=teacher.schedule.sid_timesteps(625, 4), scaled_input_noise=True)
    obj = build_objective("sid", teacher, gen, {})
    calls: list[bool] = []
    handle = gen.unet.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    try:
        seen = set()
        for step in range(40):
            obj.set_train_step(step)
            k = obj.mixture_step
            seen.add(k)
            calls.clear()
            obj.auxiliary_loss(batch)
            assert calls == [False] * (k + 1)  # the fake score trains on the step-k output, no gradient anywhere
            calls.clear()
            loss, logs = obj.generator_loss(batch)
            assert calls == [False] * k + [True]  # steps before k without gradient, step k with
            assert logs["mixture_step"] == k
        assert seen == {0, 1, 2, 3}
        obj.set_train_step(7)
        k7 = obj.mixture_step
        obj.set_train_step(8)
        obj.set_train_step(7)
        assert obj.mixture_step == k7  # a function of the update number: the same after a resume
    finally:
        handle.remove()
    gen.unet.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.unet.parameters())


# --- the diffusion GAN -----------------------------------------------------------------------------------------------
def mid_output(unet, x_t, t, cond):
    out = []
    h = unet.mid_block.register_forward_hook(lambda _m, _i, o: out.append(o))
    try:
        unet(x_t, t, encoder_hidden_states=cond)
    finally:
        h.remove()
    return out[0]


def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none").flatten(1).mean(1)


def test_gan_terms_have_the_official_signs_and_weights(teacher, batch):
    cfg = {"kappa1": 1.0, "kappa2": 1.0, "kappa3": 1.0, "kappa4": 2.0, "gan_enabled": True, "gan_weight": 0.3,
           "gan_disc_weight": 0.7, "gan_warmup_steps": 2}
    obj = make(teacher, cfg)
    assert obj.requirements(obj.config).real_images and obj.grad_clip_values() == {"fake_score": 1.0}
    x = leaf_x(obj)
    eps = fixed_eps()
    elems = 4 * 8 * 8
    a = ac(teacher, T_FIXED)
    x_t = a.sqrt() * x.detach() + (1 - a).sqrt() * eps

    # discriminator: ½[BCE(D(real_t), 1) + BCE(D(fake_t), 0)] at the same t and noise, × C·H·W, added to the fake loss
    loss_aux, logs = obj.auxiliary_loss(batch, timesteps=T_FIXED, noise=eps, drop=torch.zeros(B, dtype=torch.bool))
    real_t = a.sqrt() * batch.real.latents + (1 - a).sqrt() * eps
    with torch.no_grad():
        d_fake = mid_output(obj.fake_unet, x_t, T_FIXED, batch.embeds.cond).mean(1, keepdim=True)
        d_real = mid_output(obj.fake_unet, real_t, T_FIXED, batch.embeds.cond).mean(1, keepdim=True)
        pred = obj.fake_unet(x_t, T_FIXED, encoder_hidden_states=batch.embeds.cond).sample
    want_disc = (0.5 * (bce(d_real, 1.0) + bce(d_fake, 0.0))).sum() * elems / B
    assert logs["loss_disc"] == pytest.approx(want_disc.item(), rel=1e-4)
    want_fake = ((pred - eps) ** 2).sum() / B
    assert loss_aux.item() == pytest.approx((want_fake + 0.7 * want_disc).item(), rel=1e-4)
    # signs: the discriminator loss falls when D says "real" on real and "fake" on fake
    assert torch.autograd.grad((0.5 * bce(d_real.requires_grad_(), 1.0)).sum(), d_real)[0].sum() < 0

    # generator: the SiD loss alone during the warm-up, then ½·L_SiD + ½·λ·L_GAN
    obj.set_train_step(0)
    loss0, logs0 = obj.generator_loss(batch, timesteps=T_FIXED, noise=eps)
    assert "loss_gen_gan" not in logs0 and loss0.item() == pytest.approx(logs0["loss_sid"])
    obj.set_train_step(2)
    loss2, logs2 = obj.generator_loss(batch, timesteps=T_FIXED, noise=eps)
    R = x0_fn(teacher.unet, teacher, eps, T_FIXED, batch.embeds, 2.0)(x.detach())
    w = (x.detach() - R).abs().mean(dim=(1, 2, 3))
    # SiDA (sida_loss.py): bce_loss(y_D, 1) — the mean over the batch and the map, a scalar — / weight_factor (per sample)
    want_gan = (bce(d_fake.clamp(-10, 10), 1.0).mean() * elems / w).sum() / B
    assert logs2["loss_gen_gan"] == pytest.approx(want_gan.item(), rel=1e-4)
    per_sample = make(teacher, {**cfg, "gan_weighting": "per_sample"})
    per_sample.generate = obj.generate
    per_sample.set_train_step(2)
    _, logs_ps = per_sample.generator_loss(batch, timesteps=T_FIXED, noise=eps)
    assert logs_ps["loss_gen_gan"] == pytest.approx(((bce(d_fake.clamp(-10, 10), 1.0) * elems / w).sum() / B).item(),
                                                    rel=1e-4)
    assert loss2.item() == pytest.approx(0.5 * logs2["loss_sid"] + 0.5 * 0.3 * want_gan.item(), rel=1e-4)
    # the GAN term moves x toward what D calls real: its gradient on x is non-zero and the fake score gets none
    x.grad = None
    loss2.backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in obj.fake_unet.parameters())


def test_a_bf16_teacher_changes_the_generator_gradient_that_float32_gives(teacher, batch):
    """Why SiD declares the teacher UNet in its gradient (``Requirements.teacher_in_gradient``): its generator loss
    differentiates the teacher's x̂₀ through x_t, so the teacher's precision is in the gradient. At the start of a
    run (fake score = teacher) the bf16 rounding of y_real is the size of y_real − y_fake itself."""
    import copy

    obj = build_objective("sid", teacher, Generator.from_teacher(teacher), {})  # fake score = teacher, as at update 0
    assert obj.requirements(obj.config).teacher_in_gradient == ("unet",)
    t, eps = T_FIXED, fixed_eps()

    def grad_x(unet) -> torch.Tensor:
        x = leaf_x(obj)
        obj.real_score_unet = lambda: unet  # noqa: E731 - instance attribute shadows the method
        loss, _ = obj.generator_loss(batch, timesteps=t, noise=eps)
        loss.backward()
        return x.grad.double()

    reference = grad_x(teacher.unet)
    assert float((grad_x(teacher.unet) - reference).norm()) == 0.0  # float32 repeats exactly
    low = grad_x(copy.deepcopy(teacher.unet).to(torch.bfloat16))
    assert float((low - reference).norm() / reference.norm()) > 0.05
