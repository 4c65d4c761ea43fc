"""The score-distillation methods on flow-matching teachers (tiny random SD3 and FLUX.1-dev pipelines): every
method trains through ``distill``, and the flow conversions the objectives rely on are checked by hand against the
transformer's raw velocity."""

from __future__ import annotations

import pytest
import torch

from helpers import PAIRS, QUICK, REPO, reset_accelerate_state, trainable_states
from tiny_models import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

from stepdistill.models.conditioning import unet_forward
from stepdistill.models.generators import Generator, TeacherSamplerGenerator
from stepdistill.models.teacher import Teacher
from stepdistill.workflows.distill import distill

RECIPES = REPO / "training"
NO_GAN = ["objective_config.gan_enabled=false"]
METHODS = {  # recipe, overrides
    "dmd2-4step": ("toy-dmd2-4step.yaml", NO_GAN),
    "dmd": ("toy-dmd.yaml", PAIRS),
    "vsd": ("toy-vsd.yaml", []),
    "sid": ("toy-sid.yaml", []),
    "sid-4step": ("toy-sid-4step.yaml", []),
    "cfg-distill": ("toy-cfg-distill.yaml", []),
    "lora-cfg-distill": ("toy-lora-cfg-distill.yaml", []),
}


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-specs")
    make_tiny_sd3_pipeline(root / "sd3")
    make_tiny_flux_pipeline(root / "flux")
    (root / "sd3.yaml").write_text(f"teacher: {root / 'sd3'}\ndtype: float32\n")
    (root / "flux.yaml").write_text(f"teacher: {root / 'flux'}\ndtype: float32\nresolution: 16\n")
    return root


@pytest.mark.parametrize("teacher_kind,method", [("sd3", m) for m in METHODS] + [("flux", "dmd2-4step"),
                                                                                 ("flux", "sid")])
def test_every_method_trains_on_a_flow_teacher(specs, tmp_path, teacher_kind, method):
    recipe, extra = METHODS[method]
    reset_accelerate_state()
    try:
        summary = distill(specs / f"{teacher_kind}.yaml", RECIPES / recipe, tmp_path / "run",
                          overrides=[*QUICK, *extra, "train.max_steps=2", "train.checkpoint_every=2"],
                          export=False, log=lambda *a: None)
    finally:
        reset_accelerate_state()
    assert summary["steps"] == 2
    states = trainable_states(tmp_path / "run")
    assert states, "no checkpoint was written"
    for state in states.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert torch.isfinite(value).all(), key


@pytest.fixture(scope="module")
def sd3_teacher(specs):
    return Teacher.load(specs / "sd3")


def test_one_step_student_predicts_x0_from_the_velocity_at_sigma_one(sd3_teacher):
    """G(z) = z − σ·v̂(z, 1000·σ) at the student's first index (σ = 1 at index 999 of the table)."""
    gen = Generator.from_teacher(sd3_teacher, timesteps=(999,))
    z = torch.randn(2, *sd3_teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    embeds = sd3_teacher.encode_prompt(["a red circle", "a blue square"], with_uncond=False)
    with torch.no_grad():
        v = unet_forward(sd3_teacher.unet, z, torch.tensor(1000.0), embeds)
        torch.testing.assert_close(gen(z, embeds), z - v, atol=1e-5, rtol=0)


def test_teacher_sampler_student_runs_the_flow_pipelines_own_steps(sd3_teacher):
    """The CFG-distillation student samples as the exported SD3 pipeline would at guidance 1: Euler on the
    scheduler's σ list; its table indices are the nearest levels of each σ."""
    gen = TeacherSamplerGenerator.from_teacher(sd3_teacher, num_inference_steps=3)
    sigmas = gen._fresh_scheduler().sigmas.tolist()
    assert gen.timesteps == [int(i) for i in sd3_teacher.schedule.timesteps_for_sigmas(torch.tensor(sigmas[:-1]))]
    z = torch.randn(1, *sd3_teacher.latent_shape, generator=torch.Generator().manual_seed(1))
    embeds = sd3_teacher.encode_prompt(["a red circle"], with_uncond=False)
    x = z.clone()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * unet_forward(sd3_teacher.unet, x, torch.tensor(1000.0 * s), embeds)
        torch.testing.assert_close(gen.sample(z, embeds), x, atol=1e-5, rtol=0)
