"""DMD, DMD2 and VSD objectives on a tiny SD-like teacher.

Every expected gradient / loss is recomputed here INDEPENDENTLY of stepdistill.core.schedule: ᾱ_t comes from the diffusers
scheduler's ``alphas_cumprod``, x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, CFG is done with separate uncond/cond UNet calls, and
the normalisers/weights are written out by hand. Timesteps and noise are fixed through the objectives' keyword
overrides, and the generator's x₀ is replaced by a leaf tensor (``objective.generate`` monkeypatched) so that
``x0.grad · numel`` is exactly the gradient the surrogate loss puts on x₀.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stepdistill.objectives import OBJECTIVES, Batch, build_objective, make_regression_pairs
from stepdistill.objectives.gan import ClassifierHead, bottleneck_features, bottleneck_shape
from stepdistill.models.generators import Generator
from stepdistill.models.conditioning import PromptEmbeds

B = 3
T_FIXED = torch.tensor([20, 500, 980])


@pytest.fixture(scope="module")
def generator(teacher):
    return Generator.from_teacher(teacher)


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(1)
    return PromptEmbeds(cond=torch.randn(B, 6, 32, generator=g), uncond=torch.randn(B, 6, 32, generator=g))


@pytest.fixture()
def batch(embeds):
    g = torch.Generator().manual_seed(2)
    return Batch(embeds=embeds, noise=torch.randn(B, 4, 8, 8, generator=g), real_latents=torch.randn(B, 4, 8, 8, generator=g))


# --- independent reference maths -------------------------------------------------------------------------------------
def ac(teacher, t: torch.Tensor) -> torch.Tensor:
    return teacher.pipeline.scheduler.alphas_cumprod.to(torch.float64)[t].view(-1, 1, 1, 1)


def eps_by_hand(unet, x_t, t, embeds, w: float) -> torch.Tensor:
    """ε̂ with CFG from two separate raw UNet calls (float64 result)."""
    with torch.no_grad():
        cond = unet(x_t, t, encoder_hidden_states=embeds.cond).sample.double()
        if w == 1.0:
            return cond
        uncond = unet(x_t, t, encoder_hidden_states=embeds.uncond).sample.double()
    return uncond + w * (cond - uncond)


def noised(teacher, x0, eps, t) -> torch.Tensor:
    a = ac(teacher, t)
    return (a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()).float()


def x0_by_hand(teacher, eps_hat, x_t, t) -> torch.Tensor:
    a = ac(teacher, t)
    return (x_t.double() - (1 - a).sqrt() * eps_hat) / a.sqrt()


def perturb_(module: torch.nn.Module, std: float = 0.02, only: str | None = None, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if only is None or only in n:
                p.add_(torch.randn(p.shape, generator=g) * std)


def leaf_x0(obj, seed: int = 4) -> torch.Tensor:
    x0 = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    obj.generate = lambda batch, grad=True: x0  # noqa: ARG005 - instance attribute shadows the method
    return x0


def fixed_eps(seed: int = 5) -> torch.Tensor:
    return torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def assert_grad_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.abs().max() > 0, "degenerate test: expected gradient is zero"
    scale = float(expected.abs().max())
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-3, atol=1e-4 * scale)


# --- DMD2 --------------------------------------------------------------------------------------------------------------
def test_dmd2_generator_gradient_matches_formula(teacher, generator, batch):
    obj = build_objective("dmd2", teacher, generator, {"real_guidance_scale": 1.75})
    perturb_(obj.fake_unet)
    x0 = leaf_x0(obj)
    eps = fixed_eps()
    loss, logs = obj.generator_loss(batch, timesteps=T_FIXED, noise=eps)
    loss.backward()
    got = x0.grad * x0.numel()

    x_t = noised(teacher, x0.detach(), eps, T_FIXED)
    x0_real = x0_by_hand(teacher, eps_by_hand(teacher.unet, x_t, T_FIXED, batch.embeds, 1.75), x_t, T_FIXED)
    x0_fake = x0_by_hand(teacher, eps_by_hand(obj.fake_unet, x_t, T_FIXED, batch.embeds, 1.0), x_t, T_FIXED)
    p_real = x0.detach().double() - x0_real
    p_fake = x0.detach().double() - x0_fake
    expected = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert_grad_matches(got, expected)
    # the loss value is ½·mean(grad²)
    assert loss.item() == pytest.approx(0.5 * float(expected.pow(2).mean()), rel=1e-3)
    assert logs["loss_dm"] == pytest.approx(loss.item())


def test_dmd2_fake_score_loss_is_eps_mse(teacher, generator, batch):
    obj = build_objective("dmd2", teacher, generator, {})
    x0 = leaf_x0(obj)
    eps = fixed_eps()
    t = torch.tensor([0, 421, 999])
    loss, _ = obj.auxiliary_loss(batch, timesteps=t, noise=eps)
    x_t = noised(teacher, x0.detach(), eps, t)
    with torch.no_grad():
        pred = obj.fake_unet(x_t, t, encoder_hidden_states=batch.embeds.cond).sample
    assert loss.item() == pytest.approx(F.mse_loss(pred, eps).item(), rel=1e-4)


def test_dmd2_defaults_follow_official_sd15_recipe(teacher, generator):
    obj = build_objective("dmd2", teacher, generator, {})
    assert obj.aux_updates_per_generator_update == 10
    assert obj.config["real_guidance_scale"] == 1.75
    assert obj.schedule.timestep_range(obj.config["min_t_ratio"], obj.config["max_t_ratio"]) == (20, 980)
    t = obj.sample_timesteps(4000, "cpu")
    assert int(t.min()) >= 20 and int(t.max()) <= 980
    assert obj.cls_head is None and set(obj.auxiliary_parameters()) == {"fake_score"}


def grads(params):
    return [p.grad for p in params]


def zero(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def test_dmd2_gradients_stay_in_their_own_step(teacher, batch):
    gen = Generator.from_teacher(teacher)
    obj = build_objective("dmd2", teacher, gen, {"gan_enabled": True, "gan_weight": 1.0})
    head_params = obj.auxiliary_parameters()["discriminator"]
    fake_params = obj.auxiliary_parameters()["fake_score"]
    assert head_params and fake_params

    loss, logs = obj.generator_loss(batch)
    loss.backward()
    assert "loss_gen_gan" in logs
    assert any(g is not None and g.abs().sum() > 0 for g in grads(gen.trainable_parameters()))
    assert all(g is None for g in grads(fake_params + head_params))
    assert all(p.grad is None for p in teacher.unet.parameters())
    # frozen() restored the auxiliary networks' trainability
    assert all(p.requires_grad for p in fake_params + head_params)

    zero(gen.unet, obj)
    loss, logs = obj.auxiliary_loss(batch)
    loss.backward()
    assert "loss_disc" in logs and "loss_fake" in logs
    assert all(g is None for g in grads(gen.trainable_parameters()))
    assert all(g is not None for g in grads(head_params))
    assert any(g is not None and g.abs().sum() > 0 for g in grads(fake_params))
    assert all(p.grad is None for p in teacher.unet.parameters())


def test_dmd2_gan_loss_signs(teacher, generator, batch):
    obj = build_objective("dmd2", teacher, generator, {"gan_enabled": True, "gan_weight": 1.0, "dm_weight": 0.0})
    leaf_x0(obj)
    says = {}
    # D says "real" (large positive logit) for everything
    obj.discriminator_logits = lambda latents, embeds: torch.full((latents.shape[0],), says["value"])  # noqa: ARG005
    says["value"] = 10.0
    _, gen_real = obj.generator_loss(batch)
    _, aux_real = obj.auxiliary_loss(batch)
    says["value"] = -10.0
    _, gen_fake = obj.generator_loss(batch)
    assert gen_real["loss_gen_gan"] < 1e-3  # fooled discriminator: low generator loss
    assert gen_fake["loss_gen_gan"] > 9.0  # discriminator sees through it: high generator loss
    # a discriminator calling everything real is wrong on the fakes: softplus(10) + softplus(-10) ≈ 10
    assert aux_real["loss_disc"] == pytest.approx(float(F.softplus(torch.tensor(10.0)) + F.softplus(torch.tensor(-10.0))))

    # a perfect discriminator (fake → −10, real → +10) has a low loss
    real = batch.real_latents
    obj.discriminator_logits = lambda latents, embeds: torch.full(  # noqa: ARG005
        (latents.shape[0],), 10.0 if torch.equal(latents, real) else -10.0
    )
    _, aux_perfect = obj.auxiliary_loss(batch)
    assert aux_perfect["loss_disc"] < 1e-3


def test_dmd2_gan_generator_term_reaches_x0_only(teacher, generator, batch):
    obj = build_objective("dmd2", teacher, generator, {"gan_enabled": True, "gan_weight": 1.0, "dm_weight": 0.0})
    x0 = leaf_x0(obj)
    loss, logs = obj.generator_loss(batch)
    assert loss.item() == pytest.approx(logs["loss_gen_gan"], rel=1e-5)
    loss.backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert all(p.grad is None for p in obj.parameters())


def test_gan_head_reads_the_mid_block_and_skips_the_decoder(teacher, embeds):
    unet = teacher.unet
    assert bottleneck_shape(unet, teacher.latent_shape) == (64, 4, 4)
    captured, up_calls = [], []
    h1 = unet.mid_block.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    h2 = unet.up_blocks[0].register_forward_hook(lambda m, i, o: up_calls.append(1))
    x = torch.randn(B, 4, 8, 8)
    t = torch.tensor([0, 5, 9])
    with torch.no_grad():
        feats = bottleneck_features(unet, x, t, embeds)
    assert up_calls == [] and feats.shape == (B, 64, 4, 4)
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=embeds.cond)
    h1.remove()
    h2.remove()
    torch.testing.assert_close(feats, captured[-1])
    head = ClassifierHead(64, 4, 4)
    assert head(feats).shape == (B,)
    # SD1.5-sized bottleneck (1280×8×8): one stride-2 4×4 conv, one 4×4 stride-4 conv, then the 1×1 logit conv
    sd15 = ClassifierHead(1280, 8, 8)
    convs = [m for m in sd15.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((4, 4), (2, 2)), ((4, 4), (4, 4)), ((1, 1), (1, 1))]
    assert sd15(torch.randn(2, 1280, 8, 8)).shape == (2,)


@pytest.mark.parametrize("aux_sample,simulations", [("reuse", 1), ("fresh", 2)])
def test_dmd2_few_step_generator_uses_backward_simulation(teacher, batch, aux_sample, simulations):
    """The backward simulation runs for the generator update; the official schedule (``reuse``) shares its result
    with the fake-score update after it, ``fresh`` simulates again."""
    gen = Generator.from_teacher(teacher, timesteps=(999, 749, 499, 249))
    obj = build_objective("dmd2", teacher, gen, {"aux_sample": aux_sample})
    obj.set_train_step(0)
    called = []
    original = gen.backward_simulate

    def spy(noise, embeds, generator=None):
        out = original(noise, embeds, generator)
        called.append(out[1])
        return out

    gen.backward_simulate = spy
    loss, _ = obj.generator_loss(batch)
    loss.backward()
    _, _ = obj.auxiliary_loss(batch)
    assert len(called) == simulations
    assert any(p.grad is not None for p in gen.trainable_parameters())


# --- DMD ---------------------------------------------------------------------------------------------------------------
def test_dmd_generator_gradient_matches_formula(teacher, generator, batch):
    obj = build_objective("dmd", teacher, generator, {"real_guidance_scale": 3.0, "regression_weight": 0.0})
    perturb_(obj.fake_unet)
    x0 = leaf_x0(obj)
    eps = fixed_eps()
    loss, _ = obj.generator_loss(batch, timesteps=T_FIXED, noise=eps)
    loss.backward()
    got = x0.grad * x0.numel()

    x_t = noised(teacher, x0.detach(), eps, T_FIXED)
    mu_real = x0_by_hand(teacher, eps_by_hand(teacher.unet, x_t, T_FIXED, batch.embeds, 3.0), x_t, T_FIXED)
    mu_fake = x0_by_hand(teacher, eps_by_hand(obj.fake_unet, x_t, T_FIXED, batch.embeds, 1.0), x_t, T_FIXED)
    weight = 1.0 / (x0.detach().double() - mu_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (mu_fake - mu_real) * weight
    assert_grad_matches(got, expected)


def test_dmd_regression_loss_and_pairs(teacher, embeds):
    gen = Generator.from_teacher(teacher)
    obj = build_objective("dmd", teacher, gen, {"regression_weight": 0.25})
    g = torch.Generator().manual_seed(9)
    z_ref, y_ref = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    x0 = leaf_x0(obj)
    batch = Batch(embeds=embeds, noise=torch.zeros(B, 4, 8, 8), ref_noise=z_ref, ref_embeds=embeds, ref_latents=y_ref)
    loss, logs = obj.generator_loss(batch, timesteps=T_FIXED, noise=fixed_eps())
    with torch.no_grad():
        pred = gen(z_ref, embeds)
    assert logs["loss_reg"] == pytest.approx(F.mse_loss(pred, y_ref).item(), rel=1e-5)
    assert loss.item() == pytest.approx(logs["loss_dm"] + 0.25 * logs["loss_reg"], rel=1e-5)
    loss.backward()
    assert x0.grad is not None
    assert all(p.grad is not None for p in gen.trainable_parameters() if p.requires_grad)  # regression reaches θ

    # without pairs the objective refuses rather than silently dropping the term
    with pytest.raises(ValueError, match="regression"):
        obj.generator_loss(Batch(embeds=embeds, noise=torch.zeros(B, 4, 8, 8)))


@pytest.mark.parametrize("method", ["dmd", "dmd2"])
def test_ode_warmup_is_regression_alone_then_distribution_matching(teacher, embeds, method):
    gen = Generator.from_teacher(teacher)
    obj = build_objective(method, teacher, gen, {"ode_warmup_steps": 2})
    assert obj.requirements(obj.config).regression_pairs_needed()
    g = torch.Generator().manual_seed(9)
    z_ref, y_ref = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    batch = Batch(embeds=embeds, noise=torch.randn(B, 4, 8, 8, generator=g), ref_noise=z_ref, ref_embeds=embeds,
                  ref_latents=y_ref)
    for step in (0, 1):  # warm-up: loss = MSE(G(z_ref), y_ref) alone, no auxiliary updates
        obj.set_train_step(step)
        assert obj.in_ode_warmup() and not obj.auxiliary_active()
        loss, logs = obj.generator_loss(batch, timesteps=T_FIXED, noise=fixed_eps())
        with torch.no_grad():
            expected = ((gen(z_ref, embeds) - y_ref) ** 2).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert logs["ode_warmup"] == 1.0 and "loss_dm" not in logs
    obj.set_train_step(2)  # then the objective's own loss (DMD: loss_DM + 0.25·loss_reg; DMD2: loss_DM)
    assert not obj.in_ode_warmup() and obj.auxiliary_active()
    loss, logs = obj.generator_loss(batch, timesteps=T_FIXED, noise=fixed_eps())
    assert "loss_dm" in logs and "ode_warmup" not in logs
    reg = 0.25 * logs["loss_reg"] if method == "dmd" else 0.0
    assert loss.item() == pytest.approx(logs["loss_dm"] + reg, rel=1e-5)
    # warm-up without pairs is a clear error
    obj.set_train_step(0)
    with pytest.raises(ValueError, match="ODE pairs"):
        obj.generator_loss(Batch(embeds=embeds, noise=torch.zeros(B, 4, 8, 8)))
    no_pairs = build_objective(method, teacher, gen, {"ode_warmup_steps": 0,
                                                      **({"regression_weight": 0.0} if method == "dmd" else {})})
    assert not no_pairs.requirements(no_pairs.config).regression_pairs_needed()
    with pytest.raises(ValueError, match="ode_warmup_steps"):
        build_objective(method, teacher, gen, {"ode_warmup_steps": -1})


def test_make_regression_pairs_is_the_teacher_ddim_ode(teacher):
    prompts = ["a red circle", "a blue square"]
    pairs = make_regression_pairs(teacher, prompts, num_steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0))
    assert len(pairs) == 2 and pairs.latents.shape == (2, 4, 8, 8)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pairs.noise, z)
    emb = teacher.encode_prompt(prompts, with_uncond=True)
    # trailing DDIM, 2 steps: t = 999 then 499; x_499 = √ᾱ·x̂₀ + √(1−ᾱ)·ε̂; output = x̂₀ at t = 499
    t1, t2 = torch.tensor([999, 999]), torch.tensor([499, 499])
    e1 = eps_by_hand(teacher.unet, z, t1, emb, 3.0)
    x0_1 = x0_by_hand(teacher, e1, z, t1)
    a2 = ac(teacher, t2)
    x_499 = (a2.sqrt() * x0_1 + (1 - a2).sqrt() * e1).float()
    y = x0_by_hand(teacher, eps_by_hand(teacher.unet, x_499, t2, emb, 3.0), x_499, t2).float()
    torch.testing.assert_close(pairs.latents, y, rtol=1e-3, atol=1e-3 * float(y.abs().max()))


def test_dmd_fake_score_loss_is_eps_mse(teacher, generator, batch):
    obj = build_objective("dmd", teacher, generator, {"regression_weight": 0.0})
    x0 = leaf_x0(obj)
    eps = fixed_eps()
    t = torch.tensor([3, 600, 998])
    loss, _ = obj.auxiliary_loss(batch, timesteps=t, noise=eps)
    x_t = noised(teacher, x0.detach(), eps, t)
    with torch.no_grad():
        pred = obj.fake_unet(x_t, t, encoder_hidden_states=batch.embeds.cond).sample
    assert loss.item() == pytest.approx(F.mse_loss(pred, eps).item(), rel=1e-4)


def test_dmd_lpips_string_is_rejected_with_explanation(teacher, generator):
    with pytest.raises(ValueError, match="torchvision"):
        build_objective("dmd", teacher, generator, {"regression_distance": "lpips"})
    calls = []

    def my_distance(pred, ref):
        calls.append(1)
        return (pred - ref).abs().mean()

    obj = build_objective("dmd", teacher, generator, {"regression_distance": my_distance})
    assert obj.distance is my_distance


# --- VSD ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fake_guidance", [None, 1.0])
def test_vsd_generator_gradient_matches_formula(teacher, generator, batch, fake_guidance):
    obj = build_objective("vsd", teacher, generator, {"fake_lora_rank": 4, "fake_guidance_scale": fake_guidance})
    perturb_(obj.fake_unet, std=0.05, only="lora_B")
    x0 = leaf_x0(obj)
    eps = fixed_eps()
    loss, logs = obj.generator_loss(batch, timesteps=T_FIXED, noise=eps)
    loss.backward()
    got = x0.grad * x0.numel()

    w = 4.5
    w_fake = w if fake_guidance is None else fake_guidance  # SwiftBrush's code guides the LoRA teacher with w too
    x_t = noised(teacher, x0.detach(), eps, T_FIXED)
    eps_real = eps_by_hand(teacher.unet, x_t, T_FIXED, batch.embeds, w)
    eps_fake = eps_by_hand(obj.fake_unet, x_t, T_FIXED, batch.embeds, w_fake)
    omega = 1 - ac(teacher, T_FIXED)  # σ_t²
    expected = omega * (eps_real - eps_fake)
    assert_grad_matches(got, expected)
    assert logs["guidance_scale"] == 4.5


def test_vsd_random_guidance_pg_sb(teacher, generator, batch):
    obj = build_objective("vsd", teacher, generator, {"fake_lora_rank": 4, "guidance_scale_range": [2.0, 8.0]})
    perturb_(obj.fake_unet, std=0.05, only="lora_B")
    draws = {obj.sample_guidance_scale() for _ in range(20)}
    assert len(draws) > 1 and all(2.0 <= w <= 8.0 for w in draws)
    x0 = leaf_x0(obj)
    eps = fixed_eps()
    loss, logs = obj.generator_loss(batch, timesteps=T_FIXED, noise=eps)
    loss.backward()
    w = logs["guidance_scale"]
    assert 2.0 <= w <= 8.0
    x_t = noised(teacher, x0.detach(), eps, T_FIXED)
    expected = (1 - ac(teacher, T_FIXED)) * (
        eps_by_hand(teacher.unet, x_t, T_FIXED, batch.embeds, w) - eps_by_hand(obj.fake_unet, x_t, T_FIXED, batch.embeds, w)
    )
    assert_grad_matches(x0.grad * x0.numel(), expected)


@pytest.mark.parametrize("drop", [False, True])
def test_vsd_fake_score_loss(teacher, generator, batch, drop):
    obj = build_objective("vsd", teacher, generator, {"fake_lora_rank": 4})
    x0 = leaf_x0(obj)
    eps = fixed_eps()
    t = torch.tensor([0, 333, 999])
    loss, _ = obj.auxiliary_loss(batch, timesteps=t, noise=eps, drop_condition=drop)
    x_t = noised(teacher, x0.detach(), eps, t)
    hidden = batch.embeds.uncond if drop else batch.embeds.cond
    with torch.no_grad():
        pred = obj.fake_unet(x_t, t, encoder_hidden_states=hidden).sample
    weight = ac(teacher, t).float()  # α_t² = ᾱ_t (official: MSE(α_t·ε̂, α_t·ε))
    assert loss.item() == pytest.approx((weight * (pred - eps) ** 2).mean().item(), rel=1e-4)

    plain = build_objective("vsd", teacher, generator, {"fake_lora_rank": 4, "fake_loss_weighting": "none"})
    plain.fake_unet.load_state_dict(obj.fake_unet.state_dict())
    leaf_x0(plain)
    loss_plain, _ = plain.auxiliary_loss(batch, timesteps=t, noise=eps, drop_condition=drop)
    assert loss_plain.item() == pytest.approx(F.mse_loss(pred, eps).item(), rel=1e-4)


def test_vsd_gradients_stay_in_their_own_step(teacher, batch):
    gen = Generator.from_teacher(teacher)
    obj = build_objective("vsd", teacher, gen, {"fake_lora_rank": 4})
    perturb_(obj.fake_unet, std=0.05, only="lora_B")
    fake_params = obj.auxiliary_parameters()["fake_score"]
    assert fake_params and all("lora_" in n for n, p in obj.fake_unet.named_parameters() if p.requires_grad)
    loss, _ = obj.generator_loss(batch)
    loss.backward()
    assert any(g is not None and g.abs().sum() > 0 for g in grads(gen.trainable_parameters()))
    assert all(p.grad is None for p in obj.fake_unet.parameters())
    assert all(p.grad is None for p in teacher.unet.parameters())
    zero(gen.unet, obj)
    loss, _ = obj.auxiliary_loss(batch)
    loss.backward()
    assert all(g is None for g in grads(gen.trainable_parameters()))
    assert any(g is not None and g.abs().sum() > 0 for g in grads(fake_params))
    assert all(p.grad is None for n, p in obj.fake_unet.named_parameters() if "lora_" not in n)
    assert all(p.grad is None for p in teacher.unet.parameters())


def test_vsd_fake_score_starts_equal_to_teacher(teacher, generator, batch):
    """LoRA B = 0 at init and the same guidance on both sides: the VSD gradient is exactly zero at step 0."""
    obj = build_objective("vsd", teacher, generator, {"fake_lora_rank": 4})
    x0 = leaf_x0(obj)
    loss, _ = obj.generator_loss(batch, timesteps=T_FIXED, noise=fixed_eps())
    loss.backward()
    assert float(x0.grad.abs().max()) == 0.0


# --- registry and config validation -----------------------------------------------------------------------------------
def test_registry_and_config_validation(teacher, generator):
    assert set(OBJECTIVES) >= {"dmd", "dmd2", "vsd"}
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        build_objective("nope", teacher, generator, {})
    with pytest.raises(ValueError) as err:
        build_objective("dmd2", teacher, generator, {"real_guidance": 2.0})
    assert "'real_guidance'" in str(err.value) and "real_guidance_scale" in str(err.value)
    with pytest.raises(ValueError, match="min_t_ratio"):
        build_objective("vsd", teacher, generator, {"min_t_ratio": 0.9, "max_t_ratio": 0.1})
    with pytest.raises(ValueError, match="aux_updates_per_generator_update"):
        build_objective("dmd", teacher, generator, {"aux_updates_per_generator_update": 0})
    with pytest.raises(ValueError, match="guidance_scale_range"):
        build_objective("vsd", teacher, generator, {"guidance_scale_range": [8.0, 2.0]})
    with pytest.raises(ValueError, match="diffusion_gan_max_t"):
        build_objective("dmd2", teacher, generator, {"diffusion_gan_max_t": 5000})


def test_cfg_without_uncond_is_a_clear_error(teacher, generator):
    obj = build_objective("dmd2", teacher, generator, {})
    leaf_x0(obj)
    batch = Batch(embeds=PromptEmbeds(cond=torch.randn(B, 6, 32)), noise=torch.randn(B, 4, 8, 8))
    with pytest.raises(ValueError, match="with_uncond"):
        obj.generator_loss(batch)


@pytest.mark.parametrize("name", ["dmd2", "dmd", "vsd"])
def test_official_schedule_generator_first_and_its_sample_trains_the_next_fake_score_update(teacher, tmp_path, name,
                                                                                              fresh_accelerate_state):
    """DMD2 (``train_sd.py``: generator turn, then the guidance turn on ``guidance_data_dict``), SwiftBrush and DMD's
    Algorithm 1: per step the generator update comes first and the first fake-score update trains on sg(x₀) of that
    update — the generator *before* its optimizer step — with the same prompts; later ones on fresh samples.
    ``aux_sample: fresh`` puts the fake-score updates first, each on a fresh sample."""
    from stepdistill.training import Trainer

    config = {"aux_updates_per_generator_update": 2}
    if name == "dmd":
        config["regression_weight"] = 0.0
    for aux_sample in ("reuse", "fresh"):
        gen = Generator.from_teacher(teacher)
        obj = build_objective(name, teacher, gen, {**config, "aux_sample": aux_sample})
        events = []
        generator_loss, auxiliary_loss, generate = obj.generator_loss, obj.auxiliary_loss, obj.generate

        def on_generate(batch, grad=True):
            x0 = generate(batch, grad=grad)
            events.append(("generate", x0.detach().clone(), batch.embeds.cond.clone()))
            return x0

        def on_generator(batch, **kw):
            events.append(("generator", None, None))
            return generator_loss(batch, **kw)

        def on_auxiliary(batch, **kw):
            seen = len(events)
            x0_used = {}
            original = obj.denoising_loss

            def spy(unet, x0, embeds, *args, **kwargs):
                x0_used["x0"], x0_used["cond"] = x0.detach().clone(), embeds.cond.clone()
                return original(unet, x0, embeds, *args, **kwargs)

            obj.denoising_loss = spy
            try:
                out = auxiliary_loss(batch, **kw)
            finally:
                obj.denoising_loss = original
            events.append(("auxiliary", x0_used["x0"], x0_used["cond"], len(events) > seen))
            return out

        obj.generate, obj.generator_loss, obj.auxiliary_loss = on_generate, on_generator, on_auxiliary
        cfg = {"objective": name, "train": {"batch_size": 2, "max_steps": 2, "checkpoint_every": 0, "log_every": 1,
                                            "grad_clip": None}}
        Trainer(cfg, teacher, gen, obj, ["a red circle", "a blue square"], tmp_path / f"{name}-{aux_sample}").train()
        kinds = [e[0] for e in events if e[0] != "generate"]
        if aux_sample == "fresh":
            assert kinds == ["auxiliary", "auxiliary", "generator"] * 2
            assert all(e[3] for e in events if e[0] == "auxiliary")  # each drew its own sample
            continue
        assert kinds == ["generator", "auxiliary", "auxiliary"] * 2
        for step in range(2):
            gen_sample = [e for e in events if e[0] == "generate"][step * 2]  # the generator update's own
            first, second = [e for e in events if e[0] == "auxiliary"][2 * step: 2 * step + 2]
            assert not first[3] and second[3]  # the first drew no sample, the second a fresh one
            assert torch.equal(first[1], gen_sample[1].float()) and torch.equal(first[2], gen_sample[2])


def test_teacher_guidance_applies_only_above_one_as_the_official_dmd2(teacher, batch):
    """tianweiy/DMD2 ``predict_noise``: ``CFG_GUIDANCE = guidance_scale > 1``; a scale ≤ 1 is one conditional pass
    (the formula out(∅) + w·(out(c) − out(∅)) would extrapolate away from the prompt for w < 1)."""
    from stepdistill.objectives.common import real_guidance

    assert real_guidance(0.5) == 1.0 and real_guidance(1.0) == 1.0 and real_guidance(1.75) == 1.75
    obj = build_objective("dmd2", teacher, Generator.from_teacher(teacher), {})
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x_t = noised(teacher, x0, fixed_eps(), T_FIXED)
    grads = {w: obj.matching_gradient(x0, x_t, T_FIXED, batch.embeds, obj.fake_unet, w)[0] for w in (0.5, 1.0, 2.0)}
    assert torch.equal(grads[0.5], grads[1.0]) and not torch.allclose(grads[2.0], grads[1.0])


def test_the_official_schedule_saves_one_generator_forward_per_update_and_the_trainer_counts_it(
        teacher, tmp_path, fresh_accelerate_state):
    """One-step DMD2 with 3 fake-score updates per generator update: the generator's own forward plus one per fake
    update that draws a fresh sample — 1 + 2 with ``reuse``, 1 + 3 with ``fresh`` (what distill-cost reports)."""
    from stepdistill.training import Trainer

    counts = {}
    for aux_sample in ("reuse", "fresh"):
        gen = Generator.from_teacher(teacher)
        obj = build_objective("dmd2", teacher, gen, {"aux_updates_per_generator_update": 3, "aux_sample": aux_sample})
        cfg = {"objective": "dmd2", "train": {"batch_size": 2, "max_steps": 2, "checkpoint_every": 0}}
        summary = Trainer(cfg, teacher, gen, obj, ["a red circle"], tmp_path / aux_sample).train()
        counts[aux_sample] = summary["generator_forwards_per_update"]
    assert counts == {"reuse": 3, "fresh": 4}
