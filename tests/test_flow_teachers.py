"""Flow-matching teachers (SD3, FLUX.1-dev, FLUX.1-schnell) behind the Teacher interface, on tiny random pipelines
built as diffusers' own tests build them: the network call, prompt encoding and CFG are checked against the
diffusers pipeline's own sampling loop, run by hand with the scheduler's σ list."""

from __future__ import annotations

import pytest
import torch

from stepdistill.models.conditioning import unet_forward
from stepdistill.models.teacher import Teacher, TeacherLoadError
from tiny_models import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

PROMPTS = ["a red circle", "a small green square"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-teachers")
    make_tiny_sd3_pipeline(root / "sd3")
    make_tiny_flux_pipeline(root / "flux-dev", guidance_embeds=True)
    make_tiny_flux_pipeline(root / "flux-schnell", guidance_embeds=False)
    return root


def _load(folders, name: str) -> Teacher:
    return Teacher.load(folders / name, resolution=None if name == "sd3" else 16)


@pytest.mark.parametrize("name,guidance", [("sd3", 3.0), ("sd3", 1.0), ("flux-dev", 1.0), ("flux-dev", 2.0),
                                           ("flux-schnell", 1.0)])
def test_euler_loop_with_our_network_call_reproduces_the_pipeline(folders, name, guidance):
    teacher = _load(folders, name)
    assert teacher.is_flow and teacher.prediction_type == "flow" and teacher.schedule.family == "rectified_flow"
    assert teacher.latent_shape == (4, 8, 8) and teacher.image_size == (16, 16)
    steps = 3
    images = teacher.sample(PROMPTS, steps, guidance, generator=torch.Generator().manual_seed(0))

    # The same sampler by hand: the pipeline's σ list, our guided call at 1000·σ, Euler steps, our decode.
    scheduler = teacher.pipeline.scheduler
    if name.startswith("flux"):
        from stepdistill.core.schedule import flux_mu

        grid = torch.linspace(1.0, 1.0 / steps, steps).tolist()  # what FluxPipeline passes
        mu = flux_mu(16) if teacher.schedule.dynamic_shifting is not None else None
        scheduler.set_timesteps(sigmas=grid, mu=mu)
        torch.testing.assert_close(teacher.schedule.inference_sigmas(steps, mu=mu, sigmas=grid).float(),
                                   scheduler.sigmas[:-1], atol=1e-6, rtol=0)
    else:
        scheduler.set_timesteps(steps)
        torch.testing.assert_close(teacher.schedule.inference_sigmas(steps).float(), scheduler.sigmas[:-1],
                                   atol=1e-6, rtol=0)
    x = torch.randn(len(PROMPTS), *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    embeds = teacher.encode_prompt(PROMPTS, with_uncond=guidance > 1)
    sigmas = scheduler.sigmas.tolist()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = unet_forward(teacher.unet, x, torch.tensor(1000.0 * s), embeds, guidance)
            x = x + (s_next - s) * v
        ours = teacher.decode(x)
    torch.testing.assert_close(ours, images, atol=2e-5, rtol=0)


def test_flux_embedded_guidance_reaches_the_transformer(folders):
    teacher = _load(folders, "flux-dev")
    assert teacher.embedded_guidance == 3.5
    embeds = teacher.encode_prompt(PROMPTS, with_uncond=False)
    assert torch.equal(embeds.cond_added["guidance"], torch.full((2,), 3.5))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = teacher.schedule.model_timestep(torch.tensor([500, 500]))
    base = unet_forward(teacher.unet, x, t, embeds)
    embeds.cond_added["guidance"] = torch.full((2,), 7.0)
    assert not torch.allclose(base, unet_forward(teacher.unet, x, t, embeds))
    with pytest.raises(TeacherLoadError, match="guidance embedding"):
        Teacher.load(folders / "flux-schnell", resolution=16, embedded_guidance=3.5)
    assert _load(folders, "flux-schnell").embedded_guidance is None


def test_predict_converts_flow_output_at_table_indices(folders):
    teacher = _load(folders, "sd3")
    assert teacher.schedule.shift == 3.0
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 900])
    x_t = teacher.schedule.add_noise(x0, eps, t)
    embeds = teacher.encode_prompt(PROMPTS)
    v = unet_forward(teacher.unet, x_t, 1000 * teacher.schedule.sigmas[t].float(), embeds, 2.0)
    sigma = teacher.schedule.sigmas[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(teacher.predict(x_t, t, embeds, 2.0), v)
    torch.testing.assert_close(teacher.predict_x0(x_t, t, embeds, 2.0), x_t - sigma * v)
    torch.testing.assert_close(teacher.predict_eps(x_t, t, embeds, 2.0), x_t + (1 - sigma) * v)
    with pytest.raises(ValueError, match="model_timestep"):
        unet_forward(teacher.unet, x_t, t, embeds)  # a table index is not what the transformer takes


def test_vae_round_trip_uses_the_shift_factor(folders):
    teacher = _load(folders, "flux-dev")
    assert teacher.vae.config.shift_factor == pytest.approx(0.1159)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    latents = teacher.encode(images)
    z = teacher.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(latents, (z - 0.1159) * 0.3611, atol=1e-5, rtol=0)


def test_flow_teacher_errors_name_what_to_do(folders):
    with pytest.raises(TeacherLoadError, match="multiple of 4"):
        Teacher.load(folders / "flux-dev", resolution=18)
