"""Generator (stepdistill.models.generators): init from the teacher (full / LoRA), one- and few-step sampling, backward
simulation. Expected values are computed here from the diffusers scheduler's alphas_cumprod and raw UNet calls,
not through stepdistill.core.schedule."""

from __future__ import annotations

import pytest
import torch

from reference_maths import random_prompt_embeds
from tiny_models import make_tiny_sd_pipeline

from stepdistill.models.generators import Generator, copy_unet

B = 2


@pytest.fixture(scope="module")
def embeds():
    """Overrides conftest's: ``B`` = 2 rows."""
    return random_prompt_embeds(B)


@pytest.fixture()
def noise():
    return torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2))


def alphas_cumprod(teacher) -> torch.Tensor:
    return teacher.pipeline.scheduler.alphas_cumprod.to(torch.float64)


def x0_by_hand(teacher, unet, x_t, t: int, cond) -> torch.Tensor:
    """x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t with ε̂ from a raw UNet call (conditional only)."""
    ac = alphas_cumprod(teacher)[t]
    with torch.no_grad():
        eps = unet(x_t, torch.full((x_t.shape[0],), t), encoder_hidden_states=cond).sample.double()
    return ((x_t.double() - (1 - ac).sqrt() * eps) / ac.sqrt()).float()


def record_unet_calls(unet):
    """Hook recording (timestep, grad enabled, input) for each UNet call."""
    calls = []

    def pre_hook(_module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((int(torch.as_tensor(t).reshape(-1)[0]), torch.is_grad_enabled(), args[0].detach().clone()))

    return calls, unet.register_forward_pre_hook(pre_hook, with_kwargs=True)


# --- construction --------------------------------------------------------------------------------------------------
def test_full_copy_is_trainable_and_independent(teacher, embeds, noise):
    gen = Generator.from_teacher(teacher)
    assert gen.timesteps == [999] and not gen.is_lora
    assert all(p.requires_grad for p in gen.unet.parameters())
    assert not any(p.requires_grad for p in teacher.unet.parameters())
    assert gen.unet is not teacher.unet
    # at init the one-step output is the teacher's x̂₀ at t = 999 from pure noise
    x0 = gen(noise, embeds)
    torch.testing.assert_close(x0, x0_by_hand(teacher, teacher.unet, noise, 999, embeds.cond), rtol=1e-4, atol=1e-4)
    # changing the copy leaves the teacher alone
    before = next(teacher.unet.parameters()).clone()
    with torch.no_grad():
        next(gen.unet.parameters()).add_(1.0)
    torch.testing.assert_close(next(teacher.unet.parameters()), before)


def test_copy_unet_helper(teacher):
    fake = copy_unet(teacher.unet)
    assert fake is not teacher.unet and fake.training
    assert all(p.requires_grad and p.dtype == torch.float32 for p in fake.parameters())
    frozen = copy_unet(teacher.unet, trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_lora_generator_trains_only_lora(teacher, embeds, noise, tmp_path):
    gen = Generator.from_teacher(teacher, lora_rank=4)
    assert gen.is_lora
    trainable = {n for n, p in gen.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(("lora_" in n) == p.requires_grad for n, p in gen.unet.named_parameters())
    assert {id(p) for p in gen.trainable_parameters()} == {id(p) for n, p in gen.unet.named_parameters() if "lora_" in n}
    # LoRA B starts at zero: the student equals the teacher at init
    torch.testing.assert_close(gen(noise, embeds), x0_by_hand(teacher, teacher.unet, noise, 999, embeds.cond), rtol=1e-4, atol=1e-4)
    # a backward pass reaches LoRA weights only
    gen(noise, embeds).square().mean().backward()
    assert all(p.grad is not None for p in gen.trainable_parameters())
    assert all(p.grad is None for n, p in gen.unet.named_parameters() if "lora_" not in n)

    # the exported diffusers LoRA reproduces the trained student when loaded into a fresh teacher pipeline
    with torch.no_grad():
        for n, p in gen.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    state = gen.lora_state_dict()
    assert state and all("lora" in k for k in state)
    pipe = make_tiny_sd_pipeline(seed=0)
    pipe.save_lora_weights(str(tmp_path), unet_lora_layers=state, safe_serialization=True)
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(x0_by_hand(teacher, pipe.unet, noise, 999, embeds.cond), gen(noise, embeds), rtol=1e-4, atol=1e-4)


def test_invalid_timesteps(teacher):
    with pytest.raises(ValueError, match="decreasing"):
        Generator.from_teacher(teacher, timesteps=(249, 499))
    with pytest.raises(ValueError, match="lie in"):
        Generator.from_teacher(teacher, timesteps=(1000,))


# --- sampling ------------------------------------------------------------------------------------------------------
def test_one_step_custom_timestep(teacher, embeds, noise):
    gen = Generator.from_teacher(teacher, timesteps=(399,))
    calls, handle = record_unet_calls(gen.unet)
    x0 = gen.sample(noise, embeds)
    handle.remove()
    assert [c[0] for c in calls] == [399]
    torch.testing.assert_close(x0, x0_by_hand(teacher, teacher.unet, noise, 399, embeds.cond), rtol=1e-4, atol=1e-4)


def test_few_step_sample_chains_timesteps_with_fresh_noise(teacher, embeds, noise):
    steps = [999, 749, 499, 249]
    gen = Generator.from_teacher(teacher, timesteps=steps)
    calls, handle = record_unet_calls(gen.unet)
    out = gen.sample(noise, embeds, generator=torch.Generator().manual_seed(7))
    handle.remove()
    assert [c[0] for c in calls] == steps
    assert not any(c[1] for c in calls)  # sample() is inference: no autograd

    # by hand: x0 at each step, re-noised to the next timestep with noise drawn from the same seeded generator
    ac = alphas_cumprod(teacher)
    g = torch.Generator().manual_seed(7)
    x_t = noise
    for i, t in enumerate(steps):
        torch.testing.assert_close(calls[i][2], x_t.float(), rtol=1e-4, atol=1e-4)
        x0 = x0_by_hand(teacher, teacher.unet, x_t.float(), t, embeds.cond)
        if i + 1 < len(steps):
            eps = torch.randn(x0.shape, generator=g)
            t_next = steps[i + 1]
            x_t = ac[t_next].sqrt() * x0.double() + (1 - ac[t_next]).sqrt() * eps.double()
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def test_backward_simulate_runs_earlier_steps_without_grad(teacher, embeds, noise):
    steps = [999, 749, 499, 249]
    gen = Generator.from_teacher(teacher, timesteps=steps)
    seen = {}
    for seed in range(64):
        g = torch.Generator().manual_seed(seed)
        k = int(torch.randint(0, len(steps), (1,), generator=g))
        seen.setdefault(k, seed)
    assert set(seen) == {0, 1, 2, 3}

    # k = 0: the input of step 0 is the pure noise itself, and no step runs
    calls, handle = record_unet_calls(gen.unet)
    x_t, k = gen.backward_simulate(noise, embeds, generator=torch.Generator().manual_seed(seen[0]))
    assert k == 0 and calls == []
    torch.testing.assert_close(x_t, noise)

    # k = 3: steps 0, 1, 2 run without grad; the result is the detached input of step 3
    calls.clear()
    x_t, k = gen.backward_simulate(noise, embeds, generator=torch.Generator().manual_seed(seen[3]))
    assert k == 3
    assert [c[0] for c in calls] == steps[:3]
    assert not any(c[1] for c in calls)
    assert not x_t.requires_grad
    # step k itself then runs with grad (the training step)
    x0 = gen(noise, embeds, step_index=k, x_t=x_t)
    handle.remove()
    assert calls[-1][0] == steps[3] and calls[-1][1]
    assert x0.requires_grad

    # the simulated input is what sample() would feed step 3 with the same noise draws (after the k draw)
    g = torch.Generator().manual_seed(seen[3])
    torch.randint(0, len(steps), (1,), generator=g)
    ac = alphas_cumprod(teacher)
    x = noise
    for i in range(3):
        x0_i = x0_by_hand(teacher, gen.unet, x.float(), steps[i], embeds.cond)
        eps = torch.randn(x0_i.shape, generator=g)
        x = ac[steps[i + 1]].sqrt() * x0_i.double() + (1 - ac[steps[i + 1]]).sqrt() * eps.double()
    torch.testing.assert_close(x_t, x.float(), rtol=1e-4, atol=1e-4)
