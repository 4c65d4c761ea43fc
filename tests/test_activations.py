"""The saved-for-backward counter behind distill-cost's activation column."""

from __future__ import annotations

import torch

from stepdistill.objectives import Batch, build_objective
from stepdistill.models.generators import Generator
from stepdistill.models.conditioning import PromptEmbeds
from stepdistill.training.activations import SavedTensorBytes


def test_counts_saved_inputs_not_parameters_and_nothing_under_no_grad():
    big = torch.nn.Linear(512, 512, bias=False)  # 1 MiB of weight
    big.requires_grad_(False)
    x = torch.randn(4, 512, requires_grad=True)  # 8 KiB
    with SavedTensorBytes([big]) as without_params:
        big(x).sum()
    with SavedTensorBytes() as with_params:
        big(x).sum()
    with torch.no_grad(), SavedTensorBytes([big]) as nograd:
        big(x).sum()
    # a frozen Linear needs only its weight for the input's gradient: excluded as a parameter, counted otherwise
    assert without_params.bytes < 64 * 1024
    assert with_params.bytes >= 512 * 512 * 4
    assert nograd.bytes == 0
    # a trainable layer saves its input (4 x 512 floats), once even when two nodes save the same storage
    layer = torch.nn.Linear(512, 8)
    with SavedTensorBytes([layer]) as saved:
        h = x * 1.0
        (layer(h) + layer(h)).sum()
    assert saved.bytes == h.numel() * 4  # h once; x is saved by nothing (a product with a Python scalar saves no input)


def test_sid_generator_step_keeps_more_activations_than_dmd2(teacher):
    """SiD differentiates through the teacher's and the fake score's inputs; DMD2 runs both without grad."""
    g = torch.Generator().manual_seed(0)
    embeds = PromptEmbeds(cond=torch.randn(2, 6, 32, generator=g), uncond=torch.randn(2, 6, 32, generator=g))
    batch = Batch(embeds=embeds, noise=torch.randn(2, 4, 8, 8, generator=g))
    saved = {}
    for name in ("sid", "dmd2"):
        generator = Generator.from_teacher(teacher)
        objective = build_objective(name, teacher, generator, {})  # DMD2 without its GAN (the default)
        with SavedTensorBytes([objective, teacher.unet, teacher.text_encoder]) as counter:
            loss, _ = objective.generator_loss(batch)
        loss.backward()
        saved[name] = counter.bytes
    assert saved["dmd2"] > 0
    assert saved["sid"] > 2 * saved["dmd2"]
