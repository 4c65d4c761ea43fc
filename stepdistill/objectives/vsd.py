"""VSD — Variational Score Distillation (ProlificDreamer, Wang et al. NeurIPS 2023, arXiv:2305.16213) applied to
one-step text-to-image students as in SwiftBrush (Nguyen & Tran, CVPR 2024, arXiv:2312.05239; official code
VinAIResearch/SwiftBrush ``train_swiftbrush.py``), with SNOOPI's PG-SB random guidance as an option
(Nguyen et al. 2024, arXiv:2412.02687).

Generator update (``generator_loss``), image-free (prompts only):
  x₀ = G_θ(z, c); t ~ U{⌊0.02T⌋ … ⌊0.98T⌋} (SwiftBrush: ``randint(20, 981)``); x_t = a_t·sg(x₀) + σ_t·ε;
  ε̂_real = teacher ε with CFG w (``real_guidance_scale``, SwiftBrush 4.5);
  ε̂_fake = fake score (LoRA on a teacher copy) ε with CFG w_fake;
  grad = ω(t)·(ε̂_real − ε̂_fake), ω(t) = σ_t² = 1 − ᾱ_t (SwiftBrush's ``sigma_t**2``; ProlificDreamer/threestudio's
  ``w = 1 − alphas_cumprod[t]``), NaNs → 0, no grad; loss = ½·MSE(x₀, sg(x₀ − grad)) (shared ``surrogate_loss``).
  ε̂ comes through ``NoiseSchedule.to_eps``, so v-prediction teachers work too.
Fake-score update (``auxiliary_loss``), after the student update and on its sample as in the official loop (``aux_sample:
reuse``; ``fresh``: first, on a fresh sample): denoising loss on sg(x₀) at t' ~ U{0 … T−1}, conditioned on the prompt, with
  the whole batch's condition replaced by the empty prompt with probability ``fake_cond_dropout`` (0.1, official code;
  this trains the fake score's unconditional branch, which its CFG needs), weighted per sample by α_t² = ᾱ_t
  (``fake_loss_weighting: alpha_sq``; the official code computes ``MSE(α_t·ε̂, α_t·ε)``) or unweighted (``none``).

Guidance of the fake score — a deliberate difference from the formula in docs (ε̂_ψ(x_t, c) without CFG): the official
SwiftBrush code applies classifier-free guidance with the *same* scale to the LoRA teacher
(``lora_pred = lora_uncond + guidance_scale·(lora_cond − lora_uncond)``), and SNOOPI's PG-SB draws one scale per batch
"for both teachers". ``fake_guidance_scale: null`` (default) follows that; set it to a number (e.g. 1.0 for
ProlificDreamer-style, conditional only) to decouple it.

PG-SB: ``guidance_scale_range: [lo, hi]`` draws w ~ U[lo, hi] once per generator update (replacing
``real_guidance_scale``; also used by the fake score when ``fake_guidance_scale`` is null).

Fake score: LoRA rank 64, alpha 108 on ``to_q``/``to_v`` (the official README training command
``--lora_rank 64 --lora_alpha 108`` and the code's ``target_modules``; ``fake_lora_alpha: null`` means alpha = rank);
``fake_lora_rank: null`` trains a full copy instead. The official run: SD2.1-base teacher, guidance 4.5, student lr
1e-6, LoRA lr 1e-3, Adam without weight decay, batch 16 per GPU, EMA, grad-norm clip 1.0 (see training/vsd.yaml).
"""

from __future__ import annotations

import torch

from stepdistill.objectives.base import (
    Batch,
    Objective,
    ObjectiveConfigError,
    check_number,
    trainable_parameters,
)
from stepdistill.objectives.common import (
    GeneratorFirstSchedule,
    cond_only,
    make_fake_score,
    surrogate_loss,
)
from stepdistill.objectives.disback import DisBackOption


class VSD(DisBackOption, GeneratorFirstSchedule, Objective):
    name = "vsd"
    DEFAULTS = {
        "real_guidance_scale": 4.5,
        "guidance_scale_range": None,
        "fake_guidance_scale": None,
        "min_t_ratio": 0.02,
        "max_t_ratio": 0.98,
        "aux_updates_per_generator_update": 1,
        "fake_lora_rank": 64,
        "fake_lora_alpha": 108,
        "fake_lora_targets": ["to_q", "to_v"],
        "fake_cond_dropout": 0.1,
        "fake_loss_weighting": "alpha_sq",
        **DisBackOption.DISBACK_DEFAULTS,
        **GeneratorFirstSchedule.SCHEDULE_DEFAULTS,
    }

    def __init__(self, teacher, generator, config=None) -> None:
        super().__init__(teacher, generator, config)
        cfg = self.config
        self.fake_unet = make_fake_score(teacher, cfg["fake_lora_rank"], cfg["fake_lora_alpha"], cfg["fake_lora_targets"],
                                         share_base=self.shares_teacher_base)

    @classmethod
    def validate_config(cls, cfg, num_train_timesteps: int = 1000) -> None:
        super().validate_config(cfg, num_train_timesteps)
        cls.validate_disback_config(cfg)
        cls.validate_schedule_config(cfg)
        check_number(cls.name, "real_guidance_scale", cfg["real_guidance_scale"])
        if cfg["fake_guidance_scale"] is not None:
            check_number(cls.name, "fake_guidance_scale", cfg["fake_guidance_scale"])
        rng = cfg["guidance_scale_range"]
        if rng is not None:
            if not isinstance(rng, (list, tuple)) or len(rng) != 2:
                raise ObjectiveConfigError("vsd", "guidance_scale_range", f"must be [lo, hi] or null, got {rng!r}")
            check_number(cls.name, "guidance_scale_range", rng[0])
            check_number(cls.name, "guidance_scale_range", rng[1])
            if rng[0] > rng[1]:
                raise ObjectiveConfigError("vsd", "guidance_scale_range", f"needs lo <= hi, got {rng!r}")
        check_number(cls.name, "fake_cond_dropout", cfg["fake_cond_dropout"], 0.0, 1.0)
        if cfg["fake_loss_weighting"] not in ("alpha_sq", "none"):
            raise ObjectiveConfigError("vsd", "fake_loss_weighting", f"must be 'alpha_sq' or 'none', got {cfg['fake_loss_weighting']!r}")
        targets = cfg["fake_lora_targets"]
        if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(x, str) for x in targets):
            raise ObjectiveConfigError("vsd", "fake_lora_targets", f"must be a non-empty list of module names, got {targets!r}")

    def auxiliary_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"fake_score": trainable_parameters(self.fake_unet)}

    def sample_guidance_scale(self) -> float:
        """The real guidance scale of this update: fixed, or w ~ U[lo, hi] with ``guidance_scale_range`` (PG-SB)."""
        rng = self.config["guidance_scale_range"]
        if rng is None:
            return float(self.config["real_guidance_scale"])
        lo, hi = float(rng[0]), float(rng[1])
        return lo + (hi - lo) * float(torch.rand(()))

    def generator_loss(
        self, batch: Batch, *, timesteps=None, noise=None, guidance_scale: float | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        x0 = self.generate(batch, grad=True)
        n = x0.shape[0]
        t = self._timesteps_or(timesteps, n, x0.device, lambda: self.sample_timesteps(n, x0.device))
        eps = torch.randn_like(x0) if noise is None else noise
        w_real = self.sample_guidance_scale() if guidance_scale is None else float(guidance_scale)
        w_fake = w_real if cfg["fake_guidance_scale"] is None else float(cfg["fake_guidance_scale"])
        with torch.no_grad():
            x_t = self.schedule.add_noise(x0.detach(), eps.to(x0), t)
            x_t64 = x_t.double()
            eps_real = self.schedule.to_eps(self.teacher_prediction(x_t, t, batch.embeds, w_real).double(), x_t64, t)
            eps_fake = self.schedule.to_eps(
                self.score_prediction(self.fake_unet, x_t, t, batch.embeds, w_fake).double(), x_t64, t
            )
            omega = self.schedule.sigma(t, x_t64) ** 2
            grad = torch.nan_to_num(omega * (eps_real - eps_fake))
        loss = surrogate_loss(x0, grad)
        self.keep_for_auxiliary(x0, batch)
        logs = {
            "loss_vsd": float(loss.detach()),
            "vsd_grad_norm": float(grad.norm()),
            "vsd_t_mean": float(t.float().mean()),
            "guidance_scale": w_real,
        }
        logs.update(self.x0_stats(x0))
        logs["loss_generator"] = float(loss.detach())
        return loss, logs

    def auxiliary_loss(
        self, batch: Batch, *, timesteps=None, noise=None, drop_condition: bool | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        x0, batch = self.auxiliary_sample(batch)
        n = x0.shape[0]
        t = self._timesteps_or(timesteps, n, x0.device, lambda: self.sample_timesteps(n, x0.device, 0.0, 1.0))
        eps = torch.randn_like(x0) if noise is None else noise
        if drop_condition is None:
            drop_condition = cfg["fake_cond_dropout"] > 0 and float(torch.rand(())) < cfg["fake_cond_dropout"]
        embeds = cond_only(batch.embeds) if drop_condition else batch.embeds
        weight = None
        if cfg["fake_loss_weighting"] == "alpha_sq":
            weight = self.schedule.alpha(t, x0.double()).reshape(-1) ** 2
        loss = self.denoising_loss(self.fake_unet, x0, embeds, t, eps, weight=weight)
        return loss, {"loss_fake": float(loss.detach()), "loss_auxiliary": float(loss.detach()), "cond_dropped": float(drop_condition)}
