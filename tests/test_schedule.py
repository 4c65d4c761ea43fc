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
