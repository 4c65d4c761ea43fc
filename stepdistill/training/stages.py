"""What runs around an objective: the work the trainer does at given updates, as the objective's
:class:`UpdatePlan` asks, and the stages a run attaches to an objective.

- :func:`finalise_experts`: when a Phased DMD phase k starts, experts < k are final; with a generator EMA their
  weights become their EMA weights, so the back-simulation of later phases runs the experts the exported student
  ships (their EMA then stays constant, the raw weights equalling it). Without an EMA there is nothing to do.
- :func:`record_degradation_path`: DisBack's stage 1, an optimizer loop of its own over a copy of the teacher's
  UNet, writing the path's nodes and manifest into the run folder (``distill`` attaches it to the objective with
  ``attach_run``; the objective calls it when the run folder holds no complete path of this run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from stepdistill.core.outputs import write_text_atomic
from stepdistill.models.ema import GeneratorEMA
from stepdistill.models.generators import copy_unet
from stepdistill.objectives.disback import MANIFEST, node_file, save_node


def finalise_experts(generator, ema: GeneratorEMA | None, count: int) -> None:
    """Copy the EMA weights of experts ``0 … count−1`` of a phase-experts ``generator`` onto their raw weights."""
    if ema is None or count <= 0:
        return
    shadow = {id(p): s for p, s in zip(ema.parameters, ema.shadow_params)}
    with torch.no_grad():
        for k in range(count):
            for p in generator.expert_parameters(k):
                if id(p) in shadow:
                    p.copy_(shadow[id(p)])


def record_degradation_path(
    objective,
    sample_embeds: Callable[[int, torch.Generator], Any],
    directory: str | Path,
    nodes: int,
    updates: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    run_fingerprint: str | None = None,
) -> list[Path]:
    """Stage 1 (see the module docstring): fine-tune a copy of ``objective.teacher``'s UNet by the objective's own
    denoising loss (:meth:`Objective.denoising_loss`) on samples of the frozen ``objective.generator``, save ``nodes``
    checkpoints at equal update intervals; returns their files (ψ₁ … ψ_N). ``sample_embeds(n, rng)`` draws n prompt
    embeddings. Uses its own RNG (``seed``): the caller's RNG is untouched."""
    teacher, generator = objective.teacher, objective.generator

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    rng = torch.Generator().manual_seed(seed)
    score = copy_unet(teacher.unet, dtype=torch.float32, trainable=True)
    device = next(teacher.unet.parameters()).device
    score.to(device)
    opt = torch.optim.AdamW(score.parameters(), lr=lr, weight_decay=0.0)
    schedule = teacher.schedule
    save_at = {round(updates * j / nodes): j for j in range(1, nodes + 1)}
    files = []
    for u in tqdm(range(1, updates + 1), desc="disback: recording the degradation path", leave=False):
        embeds = sample_embeds(batch_size, rng).to(device)
        noise = torch.randn((batch_size, *teacher.latent_shape), generator=rng).to(device)
        with torch.no_grad():
            x0 = generator.sample(noise, embeds, generator=rng).float()
        t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=rng).to(device)
        eps = torch.randn(x0.shape, generator=rng).to(device)
        loss = objective.denoising_loss(score, x0, embeds, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if u in save_at:
            f = node_file(directory, save_at[u])
            save_node(score.state_dict(), f)
            files.append(f)
    manifest = {"complete": True, "nodes": nodes, "record_updates": updates, "lr": lr, "batch_size": batch_size,
                "seed": seed, "run": run_fingerprint, "node_updates": sorted(save_at), "files": [f.name for f in files],
                "node_0": "the teacher (not stored)"}
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=2))
    del score, opt
    return files
