"""The score-distillation methods on flow-matching teachers (tiny random SD3 and FLUX.1-dev pipelines): every
method trains through ``distill``, and the flow conversions the objectives rely on are checked by hand against the
transformer's raw velocity."""

from __future__ import annotations

import pytest
import torch

from helpers import QUICK, RECIPE_FAMILIES, REPO, reset_accelerate_state, trainable_states, use_random_real_latents
from tiny_models import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

from stepdistill.models.conditioning import unet_forward
from stepdistill.models.generators import Generator, TeacherSamplerGenerator
from stepdistill.models.teacher import Teacher
from stepdistill.workflows.distill import distill

RECIPES = REPO / "training"
METHODS = {k: RECIPE_FAMILIES[k] for k in ("dmd", "vsd-lora-fake-score", "sid", "sid-4step", "cfg-distill",
                                          "lora-cfg-distill", "dmd2-gan", "sida-gan")}
METHODS["dmd2-4step"] = ("toy-dmd2-4step.yaml", ["objective_config.gan_enabled=false"])


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-specs")
    make_tiny_sd3_pipeline(root / "sd3")
    make_tiny_flux_pipeline(root / "flux")
    (root / "sd3.yaml").write_text(f"teacher: {root / 'sd3'}\ndtype: float32\nreal_images: toy\n")
    (root / "flux.yaml").write_text(f"teacher: {root / 'flux'}\ndtype: float32\nresolution: 16\nreal_images: toy\n")
    return root


@pytest.fixture(autouse=True)
def random_real_latents(monkeypatch):
    use_random_real_latents(monkeypatch)


@pytest.mark.parametrize("teacher_kind,method", [("sd3", m) for m in METHODS] + [("flux", "dmd2-4step"),
                                                                                 ("flux", "sid"), ("flux", "dmd2-gan")])
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


def test_sid_on_a_flow_teacher_matches_the_ml_sid_dit_loss_by_hand(sd3_teacher):
    """apple/ml-sid-dit's generator loss, written out on raw transformer velocities: x_t = (1 − σ)x + σε,
    y = x_t − σ·v̂ (CFG on v̂), L = Σ (y_real − y_fake)·(y_fake − x)·(1 − σ) / B; its gradient in x equals ours."""
    from stepdistill.objectives import build_objective

    gen = Generator.from_teacher(sd3_teacher, timesteps=(999,))
    k = 2.0
    obj = build_objective("sid", sd3_teacher, gen, {"kappa1": k, "kappa2": k, "kappa3": k, "kappa4": k,
                                                     "weighting": "1_minus_sigma", "sigma_sampling": "logit_normal"})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in obj.fake_unet.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=g))
    embeds = sd3_teacher.encode_prompt(["a red circle", "a blue square"])
    x = (0.5 * torch.randn(2, 4, 8, 8, generator=g)).requires_grad_(True)
    obj.generate = lambda batch, grad=True: x  # noqa: ARG005 - the generator's output as a leaf
    eps = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300, 800])
    from stepdistill.objectives import Batch

    loss, _ = obj.generator_loss(Batch(embeds=embeds, noise=torch.zeros(2, 4, 8, 8)), timesteps=t, noise=eps)
    loss.backward()

    x_ref = x.detach().clone().requires_grad_(True)
    sigma = sd3_teacher.schedule.sigmas[t].float().view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x_ref + sigma * eps

    def y(net):
        h = torch.cat([embeds.uncond, embeds.cond])
        pooled = torch.cat([embeds.uncond_added["pooled_projections"], embeds.cond_added["pooled_projections"]])
        v_u, v_c = net(hidden_states=torch.cat([x_t, x_t]), timestep=torch.cat([1000 * sigma.flatten()] * 2),
                       encoder_hidden_states=h, pooled_projections=pooled).sample.chunk(2)
        return x_t - sigma * (v_u + k * (v_c - v_u))

    y_real, y_fake = y(sd3_teacher.unet), y(obj.fake_unet)
    ref = ((y_real - y_fake) * (y_fake - x_ref) * (1 - sigma)).sum() / 2
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6 * float(x_ref.grad.abs().max()))
    # the logit-normal sampler is the one used when no timesteps are given
    drawn = obj._t(None, 20_000, "cpu")
    assert abs(float(torch.logit(sd3_teacher.schedule.sigmas[drawn]).median()) - 0.693) < 0.05


def test_gan_features_of_a_transformer_are_its_middle_block_tokens_on_their_grid(sd3_teacher):
    from stepdistill.objectives.gan import bottleneck_features, bottleneck_shape

    net = sd3_teacher.unet
    embeds = sd3_teacher.encode_prompt(["a red circle"], with_uncond=False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = sd3_teacher.schedule.model_timestep(torch.tensor([500]))
    seen = []
    block = net.transformer_blocks[len(net.transformer_blocks) // 2]
    handle = block.register_forward_hook(lambda _m, _i, out: seen.append(out[1]))
    with torch.no_grad():
        unet_forward(net, x, t, embeds)
        feats = bottleneck_features(net, x, t, embeds)
    handle.remove()
    tokens = seen[0]  # (1, 16, D): the 4×4 grid of 2×2 patches
    assert feats.shape == (1, tokens.shape[2], 4, 4) == (1, *bottleneck_shape(net, sd3_teacher.latent_shape))
    assert torch.equal(feats[0, :, 1, 2], tokens[0, 1 * 4 + 2])  # row-major: token r·w + c sits at (r, c)
