"""Independent reference maths for the objective tests (test_dmd.py, test_dmd2.py, test_vsd.py,
test_objective_common.py), written without stepdistill.core.schedule.

ᾱ_t comes from the diffusers scheduler's ``alphas_cumprod``, x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, CFG is done with separate
uncond/cond UNet calls. Timesteps and noise are fixed through the objectives' keyword overrides (``T_FIXED``,
``fixed_eps``), and the generator's x₀ is replaced by a leaf tensor (``leaf_x0``: ``objective.generate``
monkeypatched) so that ``x0.grad · numel`` is exactly the gradient the surrogate loss puts on x₀. The ``generator``,
``embeds`` and ``batch`` fixtures of conftest.py are built with ``B`` rows.
"""

from __future__ import annotations

import torch

from stepdistill.models.conditioning import PromptEmbeds

B = 3
T_FIXED = torch.tensor([20, 500, 980])


def random_prompt_embeds(batch_size: int = B, seed: int = 1) -> PromptEmbeds:
    """Random conditional and unconditional text embeddings (6 tokens × 32, the tiny teacher's width)."""
    g = torch.Generator().manual_seed(seed)
    return PromptEmbeds(cond=torch.randn(batch_size, 6, 32, generator=g),
                        uncond=torch.randn(batch_size, 6, 32, generator=g))


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


def grads(params):
    return [p.grad for p in params]


def zero(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None
