"""The one place that owns noise-schedule arithmetic.

Discrete DDPM schedule of the teacher (Ho et al. 2020; diffusers' ``DDPMScheduler``):
``ᾱ_t = alphas_cumprod[t]``, ``a_t = √ᾱ_t``, ``σ_t = √(1 − ᾱ_t)``, ``SNR(t) = ᾱ_t / (1 − ᾱ_t)``.

Forward noising ``x_t = a_t·x₀ + σ_t·ε``. Prediction conversions (Salimans & Ho 2022 for v):
``x̂₀ = (x_t − σ_t·ε̂)/a_t`` (epsilon), ``ε̂ = a_t·v̂ + σ_t·x_t`` and ``x̂₀ = a_t·x_t − σ_t·v̂`` (v-prediction).
Objectives, students and samplers call these functions; nothing else re-derives them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseSchedule:
    """``alphas_cumprod`` of a diffusers scheduler plus every conversion that depends on it.

    Coefficients are stored in float64 and cast to the dtype of the tensors they multiply, so conversions can be
    done in float64 (as DMD2 does) by passing float64 tensors.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        self.prediction_type = prediction_type
        self.num_train_timesteps = len(self.alphas_cumprod)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from any diffusers scheduler config (its betas define the schedule)."""
        ddpm = DDPMScheduler.from_config(dict(config))
        return cls(ddpm.alphas_cumprod, ddpm.config.prediction_type)

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "NoiseSchedule":
        return cls.from_config(scheduler.config)

    # --- coefficients -------------------------------------------------------------------------------------------
    def _coef(self, values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device="cpu").long().reshape(-1)
        if (t < 0).any() or (t >= self.num_train_timesteps).any():
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.tolist()[:8]}")
        out = values[t].to(device=like.device, dtype=like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def alpha(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """a_t = √ᾱ_t, shaped to broadcast against ``like``."""
        return self._coef(self.alphas_cumprod.sqrt(), t, like)

    def sigma(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """σ_t = √(1 − ᾱ_t), shaped to broadcast against ``like``."""
        return self._coef((1 - self.alphas_cumprod).sqrt(), t, like)

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t) (float64)."""
        t = torch.as_tensor(t).long().cpu()
        a = self.alphas_cumprod[t]
        return a / (1 - a)

    # --- forward process and conversions -------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x_t = a_t·x₀ + σ_t·ε."""
        return self.alpha(t, x0) * x0 + self.sigma(t, x0) * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """v = a_t·ε − σ_t·x₀ (the v-prediction target)."""
        return self.alpha(t, x0) * noise - self.sigma(t, x0) * x0

    def eps_to_x0(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x̂₀ = (x_t − σ_t·ε̂)/a_t."""
        return (x_t - self.sigma(t, x_t) * eps) / self.alpha(t, x_t)

    def x0_to_eps(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """ε̂ = (x_t − a_t·x̂₀)/σ_t."""
        return (x_t - self.alpha(t, x_t) * x0) / self.sigma(t, x_t)

    def v_to_x0(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x̂₀ = a_t·x_t − σ_t·v̂."""
        return self.alpha(t, x_t) * x_t - self.sigma(t, x_t) * v

    def v_to_eps(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """ε̂ = a_t·v̂ + σ_t·x_t."""
        return self.alpha(t, x_t) * v + self.sigma(t, x_t) * x_t

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x̂₀ from a network output of this schedule's prediction type."""
        if self.prediction_type == "epsilon":
            return self.eps_to_x0(model_output, x_t, t)
        if self.prediction_type == "v_prediction":
            return self.v_to_x0(model_output, x_t, t)
        return model_output

    def to_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """ε̂ from a network output of this schedule's prediction type."""
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            return self.v_to_eps(model_output, x_t, t)
        return self.x0_to_eps(model_output, x_t, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The denoising-loss target of this schedule's prediction type (ε, v or x₀)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        return x0

    # --- transitions between two noise levels (Phased DMD's subintervals) ------------------------------------------
    # ``s=None`` stands for clean data (a_s = 1, σ_s = 0), the end of the last phase.
    def _alpha_sigma_s(self, s: int | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if s is None:
            one = torch.ones((), dtype=like.dtype, device=like.device)
            return one, torch.zeros_like(one)
        return self.alpha(s, like), self.sigma(s, like)

    def transition(self, t: torch.Tensor | int, s: int | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients of the forward transition from x_s to x_t (t > s): ``x_t = (a_t/a_s)·x_s + σ_{t|s}·ε`` with
        ``σ²_{t|s} = σ_t² − (a_t/a_s)²·σ_s²``. Returns ``(a_t/a_s, σ_{t|s})`` shaped like ``like``."""
        a_s, sigma_s = self._alpha_sigma_s(s, like)
        ratio = self.alpha(t, like) / a_s
        var = self.sigma(t, like) ** 2 - (ratio * sigma_s) ** 2
        if (var <= 0).any():
            raise ValueError(f"transition needs t > s, got t={torch.as_tensor(t).reshape(-1).tolist()[:8]}, s={s}")
        return ratio, var.sqrt()

    def add_noise_from(self, x_s: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, s: int | None) -> torch.Tensor:
        """x_t = (a_t/a_s)·x_s + σ_{t|s}·ε: noising an intermediate state x_s further to t (s=None: clean, = add_noise)."""
        ratio, sigma_ts = self.transition(t, s, x_s)
        return ratio * x_s + sigma_ts * noise

    def subinterval_eps_target(self, noise: torch.Tensor, t: torch.Tensor | int, s: int | None) -> torch.Tensor:
        """The unbiased ε-prediction target for x_t built from x_s by :meth:`add_noise_from` (Phased DMD, Fan et al.
        2025, "score matching within a subinterval"): ``(σ_t/σ_{t|s})·ε``. Its conditional mean given x_t is
        ``−σ_t·∇log p_t(x_t)``, the total-noise prediction a score network of the marginal needs; at s = clean it is ε."""
        _, sigma_ts = self.transition(t, s, noise)
        return self.sigma(t, noise) / sigma_ts * noise

    def subinterval_weight(self, t: torch.Tensor | int, s: int | None, clamp: float, like: torch.Tensor) -> torch.Tensor:
        """Loss weight ``min(1/σ²_{t|s}, clamp)·σ²_{t|s} = min(1, clamp·σ²_{t|s})`` of the subinterval denoising loss
        (the paper clamps 1/σ²_{t|s} on ‖σ_{t|s}(ψ − target)‖², taming the target's 1/σ_{t|s} blow-up as t → s)."""
        _, sigma_ts = self.transition(t, s, like)
        return torch.clamp(clamp * sigma_ts ** 2, max=1.0)

    def ddim_step(self, x0: torch.Tensor, eps: torch.Tensor, t_next: int | None) -> torch.Tensor:
        """Deterministic DDIM transition (Song et al. 2021, η = 0) to ``t_next``: ``a_{t'}·x̂₀ + σ_{t'}·ε̂``;
        ``t_next=None`` returns x̂₀ (the clean end)."""
        if t_next is None:
            return x0
        return self.alpha(t_next, x0) * x0 + self.sigma(t_next, x0) * eps

    # --- timestep samplers -----------------------------------------------------------------------------------------
    def timestep_range(self, min_ratio: float = 0.0, max_ratio: float = 1.0) -> tuple[int, int]:
        """Inclusive integer range [⌊min_ratio·T⌋, ⌊max_ratio·T⌋] clipped to [0, T−1] (DMD2's min/max step percent)."""
        if not 0.0 <= min_ratio <= max_ratio <= 1.0:
            raise ValueError(f"need 0 <= min_ratio <= max_ratio <= 1, got min_ratio={min_ratio}, max_ratio={max_ratio}")
        T = self.num_train_timesteps
        return min(int(min_ratio * T), T - 1), min(int(max_ratio * T), T - 1)

    def sample_timesteps(
        self,
        batch_size: int,
        min_ratio: float = 0.0,
        max_ratio: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """t ~ U{⌊min_ratio·T⌋ … ⌊max_ratio·T⌋} (long tensor)."""
        lo, hi = self.timestep_range(min_ratio, max_ratio)
        return torch.randint(lo, hi + 1, (batch_size,), generator=generator).to(device)

    @staticmethod
    def sid_timesteps(t_init: int, num_steps: int) -> list[int]:
        """SiD's few-step timesteps ``t_i = ⌊t_init·(1 − i/K)⌋``, i = 0 … K−1, computed as the official code does
        (a long tensor times a Python float in float32, then ``.to(torch.long)``; mingyuanzhou/SiD-LSG
        ``sid_sd_sampler``, apple/ml-sid-dit ``sid_dit_generate``)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        t0 = torch.tensor([int(t_init)], dtype=torch.long)
        return [int((t0 * (1 - i / num_steps)).to(torch.long)) for i in range(num_steps)]

    def timestep_for_snr(self, snr: float) -> int:
        """The timestep whose SNR is closest to ``snr`` (SNR decreases monotonically with t)."""
        log_snr = torch.log(self.snr(torch.arange(self.num_train_timesteps)))
        return int(torch.argmin((log_snr - torch.log(torch.tensor(snr, dtype=torch.float64))).abs()))

    def snr_phases(self, num_phases: int, min_ratio: float = 0.0, max_ratio: float = 1.0) -> list[tuple[int, int]]:
        """Split [t_min, t_max] into ``num_phases`` subintervals of equal width in log-SNR, ordered from low SNR
        (noisy, large t) to high SNR; each is an inclusive (t_low, t_high) pair (Phased DMD's SNR subintervals)."""
        if num_phases < 1:
            raise ValueError(f"num_phases must be >= 1, got {num_phases}")
        lo, hi = self.timestep_range(min_ratio, max_ratio)
        log_snr = torch.log(self.snr(torch.arange(self.num_train_timesteps)))
        edges = torch.linspace(float(log_snr[hi]), float(log_snr[lo]), num_phases + 1)
        bounds = [hi] + [int(torch.argmin((log_snr - e).abs())) for e in edges[1:-1]] + [lo]
        phases = []
        for k in range(num_phases):
            t_high, t_low = bounds[k], bounds[k + 1]
            phases.append((min(t_low + (1 if k < num_phases - 1 else 0), t_high), t_high))
        return phases

    def sample_timesteps_in(
        self,
        batch_size: int,
        interval: tuple[int, int],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """t ~ U{t_low … t_high} for an inclusive interval such as one of :meth:`snr_phases`."""
        t_low, t_high = interval
        if not 0 <= t_low <= t_high < self.num_train_timesteps:
            raise ValueError(f"interval must satisfy 0 <= t_low <= t_high < {self.num_train_timesteps}, got {interval}")
        return torch.randint(t_low, t_high + 1, (batch_size,), generator=generator).to(device)
