"""DMD (Yin et al. 2024, one-step diffusion with distribution matching) on a tiny SD-like teacher: the
distribution-matching gradient, the regression loss on its pairs, the fake-score loss, the regression distance.

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
    B,
    T_FIXED,
    assert_grad_matches,
    eps_by_hand,
    fixed_eps,
    leaf_x0,
    noised,
    perturb_,
    x0_by_hand,
)

from stepdistill.objectives import Batch, RegressionPairs, build_objective
from stepdistill.models.generators import Generator


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
    batch = Batch(embeds=embeds, noise=torch.zeros(B, 4, 8, 8), pairs=RegressionPairs(z_ref, embeds, y_ref))
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
