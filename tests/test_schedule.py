"""NoiseSchedule against diffusers' own DDPMScheduler arithmetic and the closed-form conversions."""

import pytest
import torch
from diffusers import DDPMScheduler

from tiny_models import SD_BETAS

from stepdistill.core.schedule import NoiseSchedule


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers(prediction_type):
    ddpm = DDPMScheduler(**SD_BETAS, prediction_type=prediction_type)
    sched = NoiseSchedule.from_scheduler(ddpm)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(sched.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(sched.velocity(x0, noise, t), ddpm.get_velocity(x0, noise, t), atol=1e-6, rtol=0)
    assert sched.prediction_type == prediction_type


def test_conversions_invert_in_float64():
    sched = NoiseSchedule.from_config(SD_BETAS)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 100, 400, 800, 999])
    x_t = sched.add_noise(x0, eps, t)
    v = sched.velocity(x0, eps, t)
    torch.testing.assert_close(sched.eps_to_x0(eps, x_t, t), x0)
    torch.testing.assert_close(sched.x0_to_eps(x0, x_t, t), eps)
    torch.testing.assert_close(sched.v_to_x0(v, x_t, t), x0)
    torch.testing.assert_close(sched.v_to_eps(v, x_t, t), eps)


def test_snr_closed_form_and_samplers():
    sched = NoiseSchedule.from_config(SD_BETAS)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(sched.snr(torch.arange(1000)), abar / (1 - abar), rtol=1e-4, atol=0)  # diffusers builds betas in float32
    g = torch.Generator().manual_seed(0)
    t = sched.sample_timesteps(20000, 0.02, 0.98, generator=g)
    assert int(t.min()) == 20 and int(t.max()) == 980
    with pytest.raises(ValueError, match="min_ratio"):
        sched.sample_timesteps(4, 0.9, 0.1)
    phases = sched.snr_phases(3, 0.02, 0.98)
    assert phases[0][1] == 980 and phases[-1][0] == 20
    for (lo_a, _), (_, hi_b) in zip(phases, phases[1:]):
        assert hi_b == lo_a - 1  # contiguous, no overlap
    log_snr = torch.log(sched.snr(torch.tensor([p[1] for p in phases] + [20])))
    widths = (log_snr[1:] - log_snr[:-1]).tolist()
    assert max(widths) - min(widths) < 0.05 * max(widths)  # equal widths in log-SNR


# --- rectified flow ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rectified_flow_table_matches_flow_match_euler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    fmed = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched = NoiseSchedule.from_scheduler(fmed)
    assert sched.family == "rectified_flow" and sched.prediction_type == "flow"
    # diffusers' table runs from σ = 1 down; ours is indexed by increasing noise.
    torch.testing.assert_close(sched.sigmas.float(), fmed.sigmas.flip(0), atol=1e-6, rtol=0)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(sched.model_timestep(t), fmed.timesteps.flip(0)[t], atol=1e-3, rtol=0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    sigma = fmed.sigmas.flip(0)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(sched.add_noise(x0, noise, t), (1 - sigma) * x0 + sigma * noise, atol=1e-6, rtol=0)
    # FMED.scale_noise is the same forward process, addressed by diffusers' (descending) timestep values.
    torch.testing.assert_close(sched.add_noise(x0, noise, t),
                               fmed.scale_noise(x0, fmed.timesteps.flip(0)[t], noise), atol=1e-6, rtol=0)


def test_flow_conversions_and_euler_step_by_hand():
    sched = NoiseSchedule.rectified_flow(shift=3.0)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 400, 999])
    u = (t.double() + 1) / 1000
    sigma = (3 * u / (1 + 2 * u)).view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * eps
    v = eps - x0
    torch.testing.assert_close(sched.add_noise(x0, eps, t), x_t)
    torch.testing.assert_close(sched.target(x0, eps, t), v)
    torch.testing.assert_close(sched.to_x0(v, x_t, t), x0)
    torch.testing.assert_close(sched.to_eps(v, x_t, t), eps)
    torch.testing.assert_close(sched.snr(t), ((1 - sigma) ** 2 / sigma ** 2).flatten())
    # DDIM with η = 0 on the flow table is the Euler step x + (σ' − σ)·v̂ that FlowMatchEulerDiscreteScheduler takes.
    x_next = sched.ddim_step(sched.to_x0(v, x_t, t), sched.to_eps(v, x_t, t), 2)
    sigma_next = 3 * 0.003 / (1 + 2 * 0.003)
    torch.testing.assert_close(x_next, x_t + (sigma_next - sigma) * v)


def test_flow_inference_grid_matches_the_diffusers_scheduler():
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepdistill.core.schedule import flux_mu

    for k in (1, 2, 4, 28):
        fmed = FlowMatchEulerDiscreteScheduler(shift=3.0)
        fmed.set_timesteps(k)
        ours = NoiseSchedule.from_scheduler(fmed).inference_sigmas(k)
        torch.testing.assert_close(ours.float(), fmed.sigmas[:-1], atol=1e-5, rtol=0)
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched = NoiseSchedule.from_scheduler(flux)
    assert sched.shift == 1.0 and sched.dynamic_shifting is not None
    mu = flux_mu(4096)  # 1024², 64·64 packed tokens
    assert mu == pytest.approx(1.15)
    assert flux_mu(1024) == pytest.approx(0.5 + 768 * 0.65 / 3840)
    flux.set_timesteps(4, mu=mu)
    torch.testing.assert_close(sched.inference_sigmas(4, mu=mu).float(), flux.sigmas[:-1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mu"):
        sched.inference_sigmas(4)
    # The FLUX pipeline passes sigmas = linspace(1, 1/K, K) with mu; at 1024², K = 4: [1, .905, .760, .513].
    pipeline_grid = [1.0, 0.75, 0.5, 0.25]
    flux.set_timesteps(sigmas=pipeline_grid, mu=mu)
    ours = sched.inference_sigmas(4, mu=mu, sigmas=pipeline_grid)
    torch.testing.assert_close(ours.float(), flux.sigmas[:-1], atol=1e-5, rtol=0)
    assert [round(float(s), 3) for s in ours] == [1.0, 0.905, 0.76, 0.513]
    assert math.isclose(math.exp(mu), 3.158, abs_tol=1e-3)


def test_flow_samplers_place_sigmas_on_the_table():
    sched = NoiseSchedule.rectified_flow()
    idx = sched.timesteps_for_sigmas(torch.tensor([0.0, 0.0004, 0.0016, 0.5, 0.99949, 1.0]))
    assert idx.tolist() == [0, 0, 1, 499, 998, 999]
    g = torch.Generator().manual_seed(0)
    t = sched.sample_timesteps_logit_normal(50_000, mean=math_log2(), std=1.6, generator=g)
    logit = torch.logit(sched.sigmas[t])
    assert abs(float(logit.mean()) - math_log2()) < 0.03 and abs(float(logit.std()) - 1.6) < 0.05
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.rectified_flow(prediction_type="epsilon")
    # Phased DMD's SNR phases work on the flow table: ordered from noisy to clean, covering the range.
    phases = sched.snr_phases(2, 0.0, 1.0)
    assert phases[0][1] == 999 and phases[-1][0] == 0 and phases[1][1] < phases[0][0]


def math_log2() -> float:
    import math

    return math.log(2.0)


def test_ddpm_model_timestep_is_the_index():
    sched = NoiseSchedule.from_config(SD_BETAS)
    t = torch.tensor([0, 999])
    assert torch.equal(sched.model_timestep(t), t) and sched.family == "ddpm"
