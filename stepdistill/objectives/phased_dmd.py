"""Phased DMD — few-step distribution matching with one expert per SNR phase (Fan et al. 2025, arXiv:2510.27684,
SenseTime; no official training code is public, so this follows the paper; docs/methods/phased-dmd.md).

The generator is a :class:`~stepdistill.models.generators.PhasedGenerator` whose timesteps t₀ > … > t_{K−1} are the starts of
``NoiseSchedule.snr_phases(K, phase_min_ratio, phase_max_ratio)``; phase k ends at s = t_{k+1} (clean data for the
last). Training is progressive: updates ``[k·N, (k+1)·N)`` (N = ``updates_per_phase``) train phase k only.

Generator update of phase k (``generator_loss``):
  x_s = expert k's output from x_{t_k}, with experts < k frozen (back-simulation stops at x_s); x̂₀_G its x̂₀;
  t ~ U{max(s+1, ⌊min_t_ratio·T⌋) … ⌊max_t_ratio·T⌋} (the whole (s, T] range, which the paper finds better than
  (s, t_k]; DMD2's 0.02/0.98 bounds);
  x_t = (a_t/a_s)·sg(x_s) + σ_{t|s}·ε; x̂₀_real from the teacher with CFG, x̂₀_fake from the phase's fake score F_k;
  grad = DMD2's normalised (p_real − p_fake)/mean|p_real| with p = x̂₀_G − x̂₀ (float64, NaN → 0), applied to x_s by
  the surrogate ½·MSE(x_s, sg(x_s − grad)). In the last phase x_s = x̂₀_G and this is DMD2's loss exactly.
Fake-score update (``auxiliary_loss``), ``aux_updates_per_generator_update`` (paper: 5) per generator update:
  the same x_t from sg(x_s); target (σ_t/σ_{t|s})·ε (``target: unbiased``; ``naive`` regresses ε, the biased target
  the paper's 1-D toy refutes); loss mean of min(1, clamp·σ²_{t|s})·(F_k(x_t) − target)² (``weight_clamp`` 10).
F_k is re-initialised from the teacher when phase k starts (its optimizer state is reset through
``take_auxiliary_reset``), and the finished experts take their EMA weights (``UpdatePlan.final_experts``, applied
by the trainer: :func:`stepdistill.training.stages.finalise_experts`); the phase a fake score belongs to is part of
the objective's state, so a run resumed mid-phase keeps its fake score and one resumed at a phase boundary re-initialises it once.

Config keys: num_phases 4; phase_min_ratio 0.0 / phase_max_ratio 1.0 (the range ``snr_phases`` splits);
updates_per_phase 100; min_t_ratio 0.02 / max_t_ratio 0.98; real_guidance_scale 1.75 (the DMD2 SD1.5 value; the paper's Wan runs use the model's own CFG);
aux_updates_per_generator_update 5; target "unbiased"; weight_clamp 10.0; fake_lora_rank/alpha null (full copy).
"""

from __future__ import annotations

import dataclasses

import torch

from stepdistill.objectives.base import (
    Batch,
    Objective,
    ObjectiveConfigError,
    Requirements,
    check_int,
    check_number,
    trainable_parameters,
)
from stepdistill.objectives.common import (
    DistributionMatching,
    make_fake_score,
    surrogate_loss,
)


class PhasedDMD(DistributionMatching, Objective):
    name = "phased_dmd"
    DEFAULTS = {
        "num_phases": 4,
        "phase_min_ratio": 0.0,
        "phase_max_ratio": 1.0,
        "updates_per_phase": 100,
        "min_t_ratio": 0.02,
        "max_t_ratio": 0.98,
        "real_guidance_scale": 1.75,
        "aux_updates_per_generator_update": 5,
        "target": "unbiased",
        "weight_clamp": 10.0,
        "fake_lora_rank": None,
        "fake_lora_alpha": None,
    }
    TARGETS = ("unbiased", "naive")

    def __init__(self, teacher, generator, config=None) -> None:
        super().__init__(teacher, generator, config)
        cfg = self.config
        problem = self.generator_timesteps_problem(cfg, [int(t) for t in generator.timesteps], teacher.schedule)
        if problem is not None:
            raise ObjectiveConfigError(self.name, "num_phases", problem)
        if generator.kind != "phase_experts":
            raise ObjectiveConfigError(self.name, "num_phases", "needs a PhasedGenerator (generator.experts: true)")
        self.fake_unet = make_fake_score(teacher, cfg["fake_lora_rank"], cfg["fake_lora_alpha"],
                                         share_base=self.shares_teacher_base)
        # the phase the fake score was (re-)initialised for; saved with the objective so a resume keeps it
        self.register_buffer("fake_phase", torch.zeros((), dtype=torch.long))

    @staticmethod
    def phase_starts(schedule, cfg) -> list[int]:
        """t₀ > … > t_{K−1}: the upper ends of ``snr_phases(K, min, max)``, the timesteps each expert is conditioned at."""
        return [hi for _, hi in schedule.snr_phases(cfg["num_phases"], cfg["phase_min_ratio"], cfg["phase_max_ratio"])]

    @classmethod
    def generator_timesteps_problem(cls, cfg, timesteps, schedule) -> str | None:
        """The experts are conditioned at the phase starts: ``timesteps`` must equal :meth:`phase_starts`."""
        expected = cls.phase_starts(schedule, cfg)
        if list(timesteps) == expected:
            return None
        return (f"{cfg['num_phases']} phases on [{cfg['phase_min_ratio']}, {cfg['phase_max_ratio']}] need generator "
                f"timesteps {expected} (the starts of NoiseSchedule.snr_phases), got {list(timesteps)}: set "
                f"generator.timesteps: {expected} in the recipe")

    @classmethod
    def validate_config(cls, cfg, num_train_timesteps: int = 1000) -> None:
        super().validate_config(cfg, num_train_timesteps)
        check_int(cls.name, "num_phases", cfg["num_phases"], low=1, high=16)
        for key in ("phase_min_ratio", "phase_max_ratio"):
            check_number(cls.name, key, cfg[key], 0.0, 1.0)
        if cfg["phase_min_ratio"] >= cfg["phase_max_ratio"]:
            raise ObjectiveConfigError(cls.name, "phase_min_ratio", "must be below 'phase_max_ratio'")
        check_int(cls.name, "updates_per_phase", cfg["updates_per_phase"], low=1)
        check_number(cls.name, "real_guidance_scale", cfg["real_guidance_scale"])
        check_number(cls.name, "weight_clamp", cfg["weight_clamp"], low=0.0)
        if cfg["target"] not in cls.TARGETS:
            raise ObjectiveConfigError(cls.name, "target", f"must be one of {cls.TARGETS}, got {cfg['target']!r}")

    @classmethod
    def requirements(cls, cfg) -> Requirements:
        """One expert per phase, and every phase must run."""
        return dataclasses.replace(super().requirements(cfg), student="phase_experts",
                                   min_train_steps=int(cfg["num_phases"]) * int(cfg["updates_per_phase"]))

    def auxiliary_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"fake_score": trainable_parameters(self.fake_unet)}

    # --- progressive phases -------------------------------------------------------------------------------------------
    @property
    def phase(self) -> int:
        """The phase this update trains: ⌊train_step / updates_per_phase⌋, capped at K − 1."""
        return min(self.train_step // self.config["updates_per_phase"], self.config["num_phases"] - 1)

    def set_train_step(self, step: int) -> None:
        super().set_train_step(step)
        if self.phase != int(self.fake_phase):
            self._final_experts = self.phase  # experts < phase are final: the trainer gives them their EMA weights
            self.reinitialise_fake_score()

    _final_experts: int = 0

    def take_final_experts(self) -> int:
        """When phase k starts, experts < k are final (once; :class:`~stepdistill.objectives.base.UpdatePlan`)."""
        done, self._final_experts = self._final_experts, 0
        return done

    def reinitialise_fake_score(self) -> None:
        """F_k ← teacher weights (phase k starts); the trainer resets its optimizer state (:meth:`take_auxiliary_reset`)."""
        teacher_state = self.teacher.unet.state_dict()
        with torch.no_grad():
            if self.config["fake_lora_rank"] is None:
                self.fake_unet.load_state_dict({k: v.float() for k, v in teacher_state.items()})
            else:  # zero the LoRA B matrices: the adapted network equals the (teacher-initialised) base again
                for name, p in self.fake_unet.named_parameters():
                    if "lora_B" in name:
                        p.zero_()
        self.fake_phase.fill_(self.phase)
        self.request_auxiliary_reset()

    def phase_interval(self) -> tuple[int | None, int, int]:
        """(s, t_low, t_high) of the current phase: s = t_{k+1} (None = clean data) and the inclusive range t is drawn
        from, max(s + 1, ⌊min_t_ratio·T⌋) … ⌊max_t_ratio·T⌋."""
        s = self.generator.boundary(self.phase + 1)
        t_min, t_max = self.schedule.timestep_range(self.config["min_t_ratio"], self.config["max_t_ratio"])
        t_low = t_min if s is None else max(s + 1, t_min)
        if t_low > t_max:
            raise ValueError(f"phase {self.phase} ends at t={s}, above max_t_ratio's t={t_max}: raise max_t_ratio")
        return s, t_low, t_max

    def _noised(self, x_s: torch.Tensor, timesteps, noise) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
        s, t_low, t_max = self.phase_interval()
        n = x_s.shape[0]
        t = self._timesteps_or(timesteps, n, x_s.device,
                               lambda: self.schedule.sample_timesteps_in(n, (t_low, t_max), device=x_s.device))
        eps = torch.randn_like(x_s) if noise is None else noise.to(x_s)
        x_t = self.schedule.add_noise_from(x_s.detach(), eps, t, s)
        return x_t, t, eps, s

    # --- losses ---------------------------------------------------------------------------------------------------
    def generator_loss(self, batch: Batch, *, timesteps=None, noise=None) -> tuple[torch.Tensor, dict[str, float]]:
        k = self.phase
        x_s, x0_gen = self.generator.phase_output(batch.noise, batch.embeds, k, grad=True)
        x_t, t, _, _ = self._noised(x_s, timesteps, noise)
        grad, logs = self.matching_gradient(x0_gen, x_t, t, batch.embeds, self.fake_unet,
                                            self.config["real_guidance_scale"])
        loss = surrogate_loss(x_s, grad)
        logs.update({"loss_dm": float(loss.detach()), "phase": float(k), "loss_generator": float(loss.detach())})
        logs.update(self.x0_stats(x0_gen))
        return loss, logs

    def auxiliary_loss(self, batch: Batch, *, timesteps=None, noise=None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        with torch.no_grad():
            x_s, _ = self.generator.phase_output(batch.noise, batch.embeds, self.phase, grad=False)
        x_t, t, eps, s = self._noised(x_s, timesteps, noise)
        out = self.score_prediction(self.fake_unet, x_t, t, batch.embeds, 1.0).float()
        out = self.schedule.to_eps(out, x_t.float(), t)  # the target is in ε-space whatever the prediction type
        eps32 = eps.float()
        target = self.schedule.subinterval_eps_target(eps32, t, s) if cfg["target"] == "unbiased" else eps32
        weight = self.schedule.subinterval_weight(t, s, cfg["weight_clamp"], eps32)
        loss = (weight * (out - target) ** 2).mean()
        return loss, {"loss_fake": float(loss.detach()), "loss_auxiliary": float(loss.detach()), "phase": float(self.phase)}
