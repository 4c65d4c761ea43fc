"""Training batches: prompts encoded by the teacher (with the empty prompt as the unconditional branch), the generator's
noise and the optional real latents; and the seed of each micro-batch's ``torch.Generator``."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from stepdistill.objectives.base import Batch, RealImages

TURNS = {"aux": 0, "generator": 1}


def build_batch(
    teacher,
    prompts: Sequence[str],
    noise: torch.Tensor,
    real_latents: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    with_uncond: bool = True,
    real_prompts: Sequence[str] | None = None,
    rng: torch.Generator | None = None,
):
    """THE place where training batches are made.

    Prompts are encoded by the teacher (with the unconditional embeddings, for CFG); ``noise`` is the generator input
    (B, C, H, W); ``real_latents`` are optional encoded real images (``Batch.real``, for objectives whose
    ``Requirements.real_images`` asks for them) and ``real_prompts`` their captions (encoded into
    ``Batch.real.embeds``; without them the real latents are judged under the batch's prompts). ``rng`` is the
    batch's own generator (seeded by its position in the run): a wrapper that adds declared data to the batch (the
    ODE pairs, ``workflows.single_run.with_regression_pairs``) draws from it, never from the global RNG, so a batch
    does not depend on what earlier batches drew."""
    real_embeds = None
    with torch.no_grad():
        embeds = teacher.encode_prompt(list(prompts), with_uncond=with_uncond)
        if real_prompts is not None:
            real_embeds = teacher.encode_prompt(list(real_prompts), with_uncond=False)
    if device is not None:
        embeds = embeds.to(device)
        noise = noise.to(device)
        real_latents = None if real_latents is None else real_latents.to(device)
        real_embeds = None if real_embeds is None else real_embeds.to(device)
    real = None if real_latents is None else RealImages(real_latents, real_embeds)
    return Batch(embeds=embeds, noise=noise, real=real)


def batch_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])
