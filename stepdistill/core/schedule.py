"""The one place that owns noise-schedule arithmetic, for both schedule families a teacher can have.

Every schedule is a table of T training noise levels indexed by an integer t ∈ {0, …, T−1} (larger t = noisier),
with forward noising ``x_t = a_t·x₀ + σ_t·ε`` and ``SNR(t) = a_t²/σ_t²``:

- ``ddpm`` — the discrete DDPM schedule of SD1.x/2.x/SDXL (Ho et al. 2020; diffusers' ``DDPMScheduler``):
  ``ᾱ_t = alphas_cumprod[t]``, ``a_t = √ᾱ_t``, ``σ_t = √(1 − ᾱ_t)``. The network sees the index t itself.
- ``rectified_flow`` — the flow-matching schedule of SD3/SD3.5/FLUX.1 (Esser et al. 2024; diffusers'
  ``FlowMatchEulerDiscreteScheduler``): ``σ_t = shift((t + 1)/T)``, ``a_t = 1 − σ_t``, so ``x_t = (1 − σ)·x₀ + σ·ε``;
  the static shift is ``σ' = s·σ/(1 + (s − 1)·σ)`` and the dynamic (resolution-dependent) one the same with
  ``s = e^mu``. The network sees ``1000·σ_t`` (:meth:`NoiseSchedule.model_timestep`).

Prediction conversions: epsilon ``x̂₀ = (x_t − σ_t·ε̂)/a_t``; v-prediction (Salimans & Ho 2022) ``ε̂ = a_t·v̂ + σ_t·x_t``,
``x̂₀ = a_t·x_t − σ_t·v̂``; flow (diffusers trains ``v = ε − x₀``) ``x̂₀ = x_t − σ_t·v̂``, ``ε̂ = x_t + (1 − σ_t)·v̂``.
Objectives, students and samplers call these functions; nothing else re-derives them.
"""

from __future__ import annotations

from typing import Any, Mapping

import math

import torch
from diffusers import DDPMScheduler

#: The prediction types each schedule family supports.
FAMILY_PREDICTION_TYPES = {"ddpm": ("epsilon", "v_prediction", "sample"), "rectified_flow": ("flow", "sample")}


# --- rectified-flow shifts and grids (diffusers' FlowMatchEulerDiscreteScheduler) -----------------------------------
def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The static timestep shift of SD3 (Esser et al. 2024, eq. 23): ``σ' = s·σ/(1 + (s − 1)·σ)``; s = 1 is the
    identity. The dynamic shift of FLUX is the same map with ``s = e^mu`` (:func:`flux_mu`)."""
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift exponent, linear in the packed token count L = (H/16)·(W/16):
    ``mu = m·L + b`` with ``m = (max_shift − base_shift)/(max_seq_len − base_seq_len)``, ``b = base_shift − m·base_seq_len``
    (diffusers ``pipelines/flux/pipeline_flux.py`` ``calculate_shift``); the σ map is :func:`shift_sigmas` with
    ``s = e^mu``."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(image_seq_len * m + base_shift - m * base_seq_len)


def _is_flow_config(config: Mapping[str, Any]) -> bool:
    return str(config.get("_class_name", "")).startswith("FlowMatch") or "use_dynamic_shifting" in config


class NoiseSchedule:
    """A table of T training noise levels (a_t, σ_t) of one schedule family plus every conversion that depends on it.

    Build a DDPM schedule with ``NoiseSchedule(alphas_cumprod, prediction_type)`` and a rectified-flow one with
    :meth:`rectified_flow`; :meth:`from_config` picks the family from a diffusers scheduler config.
    Coefficients are stored in float64 and cast to the dtype of the tensors they multiply, so conversions can be
    done in float64 (as DMD2 does) by passing float64 tensors.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> None:
        """The discrete DDPM schedule of ``alphas_cumprod`` (ᾱ_t, t = 0 … T−1)."""
        self._set_prediction_type("ddpm", prediction_type)
        self.family = "ddpm"
        self.alphas_cumprod: torch.Tensor | None = alphas_cumprod.detach().to(torch.float64).cpu()
        self.shift = 1.0
        self.dynamic_shifting: dict[str, float] | None = None
        self._alpha_table = self.alphas_cumprod.sqrt()
        self._sigma_table = (1 - self.alphas_cumprod).sqrt()
        self._snr_table = self.alphas_cumprod / (1 - self.alphas_cumprod)
        self.num_train_timesteps = len(self.alphas_cumprod)

    def _set_prediction_type(self, family: str, prediction_type: str) -> None:
        if prediction_type not in FAMILY_PREDICTION_TYPES[family]:
            raise ValueError(f"a {family} schedule supports prediction_type {FAMILY_PREDICTION_TYPES[family]}, "
                             f"got {prediction_type!r}")
        self.prediction_type = prediction_type

    @classmethod
    def rectified_flow(cls, num_train_timesteps: int = 1000, shift: float = 1.0,
                       prediction_type: str = "flow") -> "NoiseSchedule":
        """The rectified-flow schedule as diffusers' ``FlowMatchEulerDiscreteScheduler`` builds its training table:
        ``σ_t = shift((t + 1)/T)`` for t = 0 … T−1 (so σ_{T−1} = 1 and σ_0 = shift(1/T)), ``a_t = 1 − σ_t``.
        A FLUX-style config with dynamic shifting trains on the unshifted table (``shift=1``)."""
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        self = cls.__new__(cls)
        self._set_prediction_type("rectified_flow", prediction_type)
        self.family = "rectified_flow"
        self.alphas_cumprod = None
        self.shift = float(shift)
        self.dynamic_shifting = None
        unshifted = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        sigmas = shift_sigmas(unshifted, self.shift)
        self._sigma_table = sigmas
        self._alpha_table = 1 - sigmas
        self._snr_table = (1 - sigmas) ** 2 / sigmas ** 2
        self.num_train_timesteps = int(num_train_timesteps)
        return self

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from any diffusers scheduler config: a ``FlowMatch*`` config gives the rectified-flow table
        (its static ``shift``; unshifted under ``use_dynamic_shifting``), any other config its betas' DDPM schedule."""
        config = dict(config)
        if _is_flow_config(config):
            dynamic = bool(config.get("use_dynamic_shifting"))
            shift = 1.0 if dynamic else float(config.get("shift", 1.0))
            schedule = cls.rectified_flow(int(config.get("num_train_timesteps", 1000)), shift)
            if dynamic:
                schedule.dynamic_shifting = {k: float(config.get(k, d)) for k, d in (
                    ("base_shift", 0.5), ("max_shift", 1.15), ("base_image_seq_len", 256), ("max_image_seq_len", 4096))}
            return schedule
        ddpm = DDPMScheduler.from_config(config)
        return cls(ddpm.alphas_cumprod, ddpm.config.prediction_type)

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "NoiseSchedule":
        return cls.from_config(scheduler.config)

    @property
    def sigmas(self) -> torch.Tensor:
        """σ_t for t = 0 … T−1 (float64, increasing)."""
        return self._sigma_table.clone()

    def model_timestep(self, t: torch.Tensor | int) -> torch.Tensor:
        """The timestep value the network is called with at index t: t itself (a long tensor) for DDPM, ``T·σ_t``
        (float32, as ``FlowMatchEulerDiscreteScheduler.timesteps``) for rectified flow. FLUX's transformer takes
        this value divided by 1000, as its pipeline passes it."""
        t = torch.as_tensor(t)
        if self.family == "ddpm":
            return t.long()
        idx = t.long().cpu()
        self._check_index(idx)
        return (self._sigma_table[idx] * self.num_train_timesteps).to(torch.float32).to(t.device)

    def resolution_mu(self, image_seq_len: int) -> float | None:
        """The dynamic-shift exponent of this schedule's config (:func:`flux_mu` with its base/max shift and sequence
        lengths) for ``image_seq_len`` packed tokens; None for a schedule without dynamic shifting."""
        if self.dynamic_shifting is None:
            return None
        d = self.dynamic_shifting
        return flux_mu(image_seq_len, d["base_image_seq_len"], d["max_image_seq_len"], d["base_shift"], d["max_shift"])

    def inference_sigmas(self, num_steps: int, mu: float | None = None,
                         sigmas: torch.Tensor | list[float] | None = None) -> torch.Tensor:
        """The σ list a rectified-flow pipeline samples with at ``num_inference_steps=num_steps`` (without the final
        0), as ``FlowMatchEulerDiscreteScheduler.set_timesteps`` builds it: ``linspace(σ_max, σ_min, K)`` between the
        ends of the training table, or the given ``sigmas`` (the FLUX pipeline passes ``linspace(1, 1/K, K)``), then
        shifted (statically, or with ``s = e^mu`` under dynamic shifting, where ``mu`` is required; see
        :func:`flux_mu`)."""
        if self.family != "rectified_flow":
            raise ValueError("inference_sigmas is defined for a rectified-flow schedule; DDPM teachers sample through "
                             "their own diffusers scheduler")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        T = self.num_train_timesteps
        if sigmas is not None:
            grid = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
            if len(grid) != num_steps:
                raise ValueError(f"got {len(grid)} sigmas for num_steps={num_steps}")
        else:
            grid = torch.linspace(float(self._sigma_table[-1]) * T, float(self._sigma_table[0]) * T, num_steps,
                                  dtype=torch.float64) / T
        if self.dynamic_shifting is not None:
            if mu is None:
                raise ValueError("this schedule uses dynamic shifting: pass mu (flux_mu of the packed token count)")
            return shift_sigmas(grid, math.exp(mu))
        return shift_sigmas(grid, self.shift)

    def timesteps_for_sigmas(self, sigmas: torch.Tensor | float) -> torch.Tensor:
        """The index whose σ_t is nearest each σ (long tensor): how a continuous σ drawn by a method (e.g. SiD's
        logit-normal σ) is placed on the table of T levels."""
        s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
        table = self._sigma_table
        idx = torch.searchsorted(table, s).clamp(1, len(table) - 1)
        lower = (s - table[idx - 1]).abs() <= (table[idx] - s).abs()
        return torch.where(lower, idx - 1, idx).long()

    # --- coefficients -------------------------------------------------------------------------------------------
    def _check_index(self, t: torch.Tensor) -> None:
        if (t < 0).any() or (t >= self.num_train_timesteps).any():
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.tolist()[:8]}")

    def _coef(self, values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device="cpu").long().reshape(-1)
        self._check_index(t)
        out = values[t].to(device=like.device, dtype=like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def alpha(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """a_t (√ᾱ_t for DDPM, 1 − σ_t for rectified flow), shaped to broadcast against ``like``."""
        return self._coef(self._alpha_table, t, like)

    def sigma(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """σ_t (√(1 − ᾱ_t) for DDPM, the shifted σ for rectified flow), shaped to broadcast against ``like``."""
        return self._coef(self._sigma_table, t, like)

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """SNR(t) = a_t²/σ_t² (float64): ᾱ_t/(1 − ᾱ_t) for DDPM, (1 − σ_t)²/σ_t² for rectified flow."""
        t = torch.as_tensor(t).long().cpu()
        return self._snr_table[t]

    # --- forward process and conversions -------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x_t = a_t·x₀ + σ_t·ε."""
        return self.alpha(t, x0) * x0 + self.sigma(t, x0) * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """v = a_t·ε − σ_t·x₀ (the v-prediction target)."""
        return self.alpha(t, x0) * noise - self.sigma(t, x0) * x0

    @staticmethod
    def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = ε − x₀, the flow-matching target diffusers trains SD3 and FLUX on (``noise - model_input``)."""
        return noise - x0

    def flow_to_x0(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x̂₀ = x_t − σ_t·v̂ (rectified flow)."""
        return x_t - self.sigma(t, x_t) * v

    def flow_to_eps(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """ε̂ = x_t + (1 − σ_t)·v̂ (rectified flow; from x_t = (1 − σ)x₀ + σε and v = ε − x₀)."""
        return x_t + self.alpha(t, x_t) * v

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
        if self.prediction_type == "flow":
            return self.flow_to_x0(model_output, x_t, t)
        return model_output

    def to_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """ε̂ from a network output of this schedule's prediction type."""
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            return self.v_to_eps(model_output, x_t, t)
        if self.prediction_type == "flow":
            return self.flow_to_eps(model_output, x_t, t)
        return self.x0_to_eps(model_output, x_t, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The denoising-loss target of this schedule's prediction type (ε, v, ε − x₀ or x₀)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        if self.prediction_type == "flow":
            return self.flow_velocity(x0, noise)
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
        ``t_next=None`` returns x̂₀ (the clean end). On a rectified-flow schedule this is the Euler step
        ``x + (σ_{t'} − σ_t)·v̂`` of ``FlowMatchEulerDiscreteScheduler``."""
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

    def consistency_grid(self, num_solver_steps: int = 50) -> torch.Tensor:
        """LCM's skipping-step grid: ``(1 … N)·k − 1`` with ``k = ⌊T/N⌋`` (N = 50, T = 1000: 19, 39, …, 999), the
        solver timesteps of latent consistency distillation (diffusers ``train_lcm_distill_sd_wds.py``,
        ``DDIMSolver``) and the grid ``LCMScheduler`` / ``TCDScheduler`` sample on (their
        ``original_inference_steps``). A long tensor."""
        T = self.num_train_timesteps
        if not 1 <= num_solver_steps <= T:
            raise ValueError(f"the consistency grid needs 1 to {T} solver steps, got {num_solver_steps}")
        return torch.arange(1, num_solver_steps + 1, dtype=torch.long) * (T // num_solver_steps) - 1

    @staticmethod
    def sid_timesteps(t_init: int, num_steps: int) -> list[int]:
        """SiD's few-step timesteps ``t_i = ⌊t_init·(1 − i/K)⌋``, i = 0 … K−1, computed as the official code does
        (a long tensor times a Python float in float32, then ``.to(torch.long)``; mingyuanzhou/SiD-LSG
        ``sid_sd_sampler``, apple/ml-sid-dit ``sid_dit_generate``)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        t0 = torch.tensor([int(t_init)], dtype=torch.long)
        return [int((t0 * (1 - i / num_steps)).to(torch.long)) for i in range(num_steps)]

    def sample_timesteps_logit_normal(
        self,
        batch_size: int,
        mean: float = 0.0,
        std: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Indices whose σ_t is nearest ``σ = sigmoid(n)``, ``n ~ N(mean, std²)``: the logit-normal density of SD3
        training (Esser et al. 2024) and of SiD on flow teachers (apple/ml-sid-dit draws σ = sigmoid(N(ln 2, 1.6²)))."""
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        n = torch.randn(batch_size, generator=generator, dtype=torch.float64) * std + mean
        return self.timesteps_for_sigmas(torch.sigmoid(n)).to(device)

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
        # σ = 1 (the last rectified-flow level) has SNR 0; its neighbour's log-SNR stands for the noisy end.
        noisy_end = float(log_snr[hi]) if torch.isfinite(log_snr[hi]) else float(log_snr[max(hi - 1, lo)])
        edges = torch.linspace(noisy_end, float(log_snr[lo]), num_phases + 1)
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
