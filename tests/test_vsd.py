"""VSD (SwiftBrush) and its random-guidance variant PG-SB on a tiny SD-like teacher: the generator gradient, the LoRA
fake score's loss and weighting, which network each step trains, the zero gradient at step 0.

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
    ac,
    assert_grad_matches,
    eps_by_hand,
    fixed_eps,
    grads,
    leaf_x0,
    noised,
    perturb_,
    zero,
)

from stepdistill.objectives import build_objective
from stepdistill.models.generators import Generator


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
