"""Which gradient estimator for the diversity reward? Measured on the toy teacher (the CFG-distilled student's starting
point): for 8 prompts × 2 generations, the gradient of E[r], r = 1 − cos(E(x), E(x')) (toy evaluator features), with

- pathwise (DRaFT-K): back-propagate r through the decoder, E and the last K of the 25 DDIM steps, K ∈ {1, 5, 25};
- REINFORCE / DDPO-style: the sampler made stochastic (DDIM η = 1, the policy), gradient
  mean_i (r_i − mean r)·∇ Σ_steps log N(x_{s−1}; μ_θ(x_s), σ_s²) — the paper's estimator family for continuous samples.

For each: seconds per estimate, and the agreement of two independent estimates (fresh noise, same prompts), cos(g₁, g₂)
averaged over 3 pairs — near 1 means the estimate is mostly signal, near 0 mostly noise. Then the alignment with a
reference direction: the pathwise K = 25 gradient (the exact gradient of the deterministic sampler's E[r], which is what
training moves and inference uses) averaged over 8 further batches (128 samples, its own noise); its two 4-batch halves'
cosine says how well that reference is itself determined.

    .venv/bin/python experiments/diversity-estimator/estimator.py eval/results/cfg/estimator.json
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch

from stepdistill.models import Teacher, TeacherSamplerGenerator, unet_forward
from stepdistill.toy import ToyEmbedder, world

PROMPTS = world.all_prompts()[::18][:8]


def diversity_reward(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """r = 1 − cos(f₁, f₂) per row, the reward stepdistill/objectives/rewards.py defines (not part of the public API)."""
    return 1.0 - torch.nn.functional.cosine_similarity(f1.float(), f2.float(), dim=-1)


def fresh_scheduler(gen: TeacherSamplerGenerator):
    """A copy of the generator's DDIM scheduler set to its own step count (DDIM keeps no state between steps)."""
    scheduler = copy.deepcopy(gen.scheduler_template)
    scheduler.set_timesteps(gen.num_inference_steps)
    return scheduler


def flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def pathwise(gen, embedder, embeds, noise, k):
    x = gen.sample_with_grad(noise, embeds, grad_steps=k)
    f = embedder(x)
    m = noise.shape[0] // 2
    return diversity_reward(f[:m], f[m:]).mean()


def reinforce(gen, embedder, embeds, noise, rng):
    """Surrogate whose gradient is the score-function estimate: mean((r − b)·Σ log p)."""
    scheduler = fresh_scheduler(gen)
    x, logp = noise, torch.zeros(noise.shape[0])
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    for t in scheduler.timesteps:
        out = unet_forward(gen.unet, x, int(t), embeds, guidance_scale=1.0)
        # the scheduler owns DDIM at η = 1: μ_θ is its step without noise, σ² its _get_variance (DDPM posterior)
        mean = scheduler.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(x), return_dict=False)[0]
        var = scheduler._get_variance(int(t), int(t) - stride)
        sample = (mean + var.sqrt() * torch.randn(mean.shape, generator=rng)).detach()
        logp = logp - ((sample - mean) ** 2).flatten(1).sum(1) / (2 * var)
        x = sample
    with torch.no_grad():
        f = embedder(x)
        m = noise.shape[0] // 2
        r = diversity_reward(f[:m], f[m:])
        adv = torch.cat([r, r]) - r.mean()
    return (adv * logp).mean()


def main(out: str) -> None:
    torch.manual_seed(0)
    teacher = Teacher.load("toy")
    gen = TeacherSamplerGenerator.from_teacher(teacher, 25)
    embedder = ToyEmbedder(teacher)
    params = [p for p in gen.unet.parameters() if p.requires_grad]
    embeds = teacher.encode_prompt(PROMPTS + PROMPTS, with_uncond=False)
    results = {}
    methods = {f"pathwise K={k}": (lambda noise, rng, k=k: pathwise(gen, embedder, embeds, noise, k)) for k in (1, 5, 25)}
    methods["REINFORCE (DDIM eta=1)"] = lambda noise, rng: reinforce(gen, embedder, embeds, noise, rng)
    for name, fn in methods.items():
        cos, secs = [], []
        for pair in range(3):
            grads = []
            for draw in range(2):
                rng = torch.Generator().manual_seed(1000 * pair + draw)
                noise = torch.randn(2 * len(PROMPTS), *teacher.latent_shape, generator=rng)
                t0 = time.perf_counter()
                grads.append(flat_grad(fn(noise, rng), params))
                secs.append(time.perf_counter() - t0)
            cos.append(float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)))
        results[name] = {"seconds_per_estimate": round(sum(secs) / len(secs), 2),
                         "cos_between_independent_estimates": [round(c, 3) for c in cos],
                         "mean_cos": round(sum(cos) / len(cos), 3)}
        print(name, results[name], flush=True)
    ref_halves = []
    for half in range(2):
        acc = None
        for draw in range(4):
            rng = torch.Generator().manual_seed(90_000 + 10 * half + draw)
            noise = torch.randn(2 * len(PROMPTS), *teacher.latent_shape, generator=rng)
            g = flat_grad(pathwise(gen, embedder, embeds, noise, 25), params)
            acc = g if acc is None else acc + g
        ref_halves.append(acc / 4)
    ref = (ref_halves[0] + ref_halves[1]) / 2
    cos = torch.nn.functional.cosine_similarity
    reference = {"samples": 8 * 2 * len(PROMPTS), "cos_between_halves": round(float(cos(*ref_halves, dim=0)), 3)}
    print("reference", reference, flush=True)
    for name, fn in methods.items():
        ests = []
        for draw in range(4):
            rng = torch.Generator().manual_seed(50_000 + draw)
            noise = torch.randn(2 * len(PROMPTS), *teacher.latent_shape, generator=rng)
            ests.append(flat_grad(fn(noise, rng), params))
        results[name]["cos_with_reference"] = [round(float(cos(g, ref, dim=0)), 3) for g in ests]
        results[name]["cos_of_4_estimate_mean_with_reference"] = round(float(cos(sum(ests) / 4, ref, dim=0)), 3)
        print(name, results[name], flush=True)
    json.dump({"prompts": PROMPTS, "samples_per_estimate": 2 * len(PROMPTS), "reference": reference, "results": results},
              open(out, "w"), indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
