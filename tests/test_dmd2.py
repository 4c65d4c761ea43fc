"""DMD2 (Yin et al. 2024, tianweiy/DMD2) on a tiny SD-like teacher: the generator gradient, the fake-score loss, the
official SD1.5 defaults, which network each step trains, the GAN terms, the few-step backward simulation.

Every expected gradient / loss is recomputed here INDEPENDENTLY of stepdistill.core.schedule, with the reference
maths of tests/reference_maths.py: ᾱ_t from the diffusers scheduler, CFG from separate uncond/cond UNet calls,
normalisers and weights written out by hand; timesteps and noise are fixed through the objective's keyword overrides
and the generator's x₀ is a leaf tensor, so that ``x0.grad · numel`` is exactly the gradient the surrogate loss puts
on x₀.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_maths import (
    T_FIXED,
    assert_grad_matches,
    eps_by_hand,
    fixed_eps,
    grads,
    leaf_x0,
    noised,
    perturb_,
    x0_by_hand,
    zero,
)

from stepdistill.objectives import build_objective
from stepdistill.models.generators import Generator


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
    real = batch.real.latents
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
