"""Maths shared by several score-distillation objectives, written once (the role NVlabs/FastGen's
``common_loss.py`` plays there). Every function states its formula; none of them knows which objective calls it.

- :func:`surrogate_loss` — ``½·mean((x₀ − sg(x₀ − g))²)``, whose gradient w.r.t. x₀ is exactly ``g / numel`` (the way
  SwiftBrush, DMD and DMD2 inject a score-difference gradient through autograd);
- :func:`distribution_matching_gradient` — the DMD/DMD2 normalised gradient ``(p_real − p_fake) / mean_{C,H,W}|p_real|``
  with ``p = x₀ − x̂₀`` in float64, NaNs → 0 (tianweiy/DMD2 ``main/sd_guidance.py::compute_distribution_matching_loss``);
- :class:`DistributionMatching` — the DMD/DMD2 generator step built on those two (teacher with CFG against the online
  fake score at ``x_t = a_t·sg(x₀) + σ_t·ε``);
- :func:`make_fake_score`, :func:`frozen`, :func:`cond_only` — the fake-score network initialised from the teacher,
  a context that freezes parameters but keeps autograd through the inputs, and classifier-free conditioning dropout;
- :func:`real_guidance` — the official DMD2 rule for when the teacher's CFG applies (scale > 1);
- :class:`GeneratorFirstSchedule` — the official DMD2 / SwiftBrush / DMD update order: the generator update first,
  and its own sample trains the first fake-score update after it.

The ODE-pair regression (DMD's regression loss, the warm-up of DMD2's one-step SDXL recipe) lives in
:mod:`stepdistill.objectives.regression`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from stepdistill.models.generators import add_lora, copy_unet
from stepdistill.models.shared_base import AdapterView
from stepdistill.objectives.base import ObjectiveConfigError


def surrogate_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``½·MSE(x₀, sg(x₀ − grad))`` (mean over all elements): ∂loss/∂x₀ = grad / x₀.numel()."""
    target = (x0.detach().double() - grad.detach().double()).float()
    return 0.5 * F.mse_loss(x0.float(), target, reduction="mean")


def real_guidance(scale: float) -> float:
    """The CFG scale the teacher is evaluated at: ``scale`` when it is above 1, else 1 (no guidance, one conditional
    pass) — tianweiy/DMD2 ``predict_noise``: ``CFG_GUIDANCE = guidance_scale > 1``."""
    return float(scale) if scale > 1 else 1.0


AUX_SAMPLES = ("reuse", "fresh")


class GeneratorFirstSchedule:
    """The update schedule of the official DMD2 code (``train_sd.py``: the generator turn, then the guidance turn on
    ``guidance_data_dict``), of SwiftBrush (``train_swiftbrush.py``: the student step, then the LoRA step on the same
    ``pred_original_samples.detach()``) and of DMD's Algorithm 1: each iteration runs the generator update first, and
    the first fake-score update after it trains on that update's own sample — sg(x₀) of the generator *before* its
    step, with the same prompts (and real images) — while the other ``aux_updates_per_generator_update − 1`` draw
    fresh samples. No generator forward is spent on the first one.

    ``aux_sample: fresh`` is the schedule this library ran before: the fake-score updates first, each on a fresh
    sample, then the generator update — one more generator forward (for few-step students, one more backward
    simulation) per generator update. Mixed into objectives before :class:`Objective`; ``auxiliary_loss`` takes its
    sample from :meth:`auxiliary_sample`, ``generator_loss`` hands it over with :meth:`keep_for_auxiliary`."""

    SCHEDULE_DEFAULTS = {"aux_sample": "reuse"}
    _kept: deque | None = None

    @classmethod
    def validate_schedule_config(cls, cfg) -> None:
        if cfg["aux_sample"] not in AUX_SAMPLES:
            raise ObjectiveConfigError(cls.name, "aux_sample", f"must be one of {', '.join(AUX_SAMPLES)}, got "
                                       f"{cfg['aux_sample']!r}")

    def generator_update_first(self) -> bool:
        """Whether the trainer runs this step's generator update before its auxiliary updates."""
        return self.config["aux_sample"] == "reuse"

    def set_train_step(self, step: int) -> None:
        super().set_train_step(step)
        self._kept = deque()  # a sample is reused within its own step only

    def keep_for_auxiliary(self, x0: torch.Tensor, batch: Any) -> None:
        """Hand the generator update's sample (and its batch) to the next fake-score update (``reuse`` only); one
        entry per micro-batch, taken back in order."""
        if self.generator_update_first():
            if self._kept is None:
                self._kept = deque()
            self._kept.append((x0.detach(), batch))

    def auxiliary_sample(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """(sg(x₀), the batch it belongs to) for a fake-score update: the generator update's own when one is kept,
        else a fresh sample of ``batch``."""
        if self._kept:
            return self._kept.popleft()
        return self.generate(batch, grad=False).detach(), batch


def distribution_matching_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD/DMD2 gradient on x₀ (float64, no autograd): with ``p_real = x₀ − x̂₀_real`` and ``p_fake = x₀ − x̂₀_fake``,
    ``(p_real − p_fake) / mean_{C,H,W}|p_real|`` with NaN/inf mapped by ``torch.nan_to_num`` (as the official code).

    Equivalently ``(x̂₀_fake − x̂₀_real) / mean|x₀ − x̂₀_real|`` — DMD's (Yin et al. 2023, eq. 8) normalised
    ``(μ_fake − μ_real)·w`` with ``w = 1/mean|x₀ − μ_real|``."""
    with torch.no_grad():
        x0 = x0.detach().double()
        p_real = x0 - x0_real.double()
        p_fake = x0 - x0_fake.double()
        dims = tuple(range(1, x0.ndim))
        grad = (p_real - p_fake) / p_real.abs().mean(dim=dims, keepdim=True)
        return torch.nan_to_num(grad)


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on the parameters of ``modules`` that have it, so a forward pass
    carries gradient to its *inputs* only (e.g. the generator's GAN term through the discriminator, or SiD's
    generator loss through the fake score)."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def make_fake_score(
    teacher, lora_rank: int | None = None, lora_alpha: float | None = None, lora_targets=None,
    share_base: bool = False,
) -> torch.nn.Module:
    """A fake-score network initialised from the teacher's network: a full trainable float32 copy, or a frozen copy
    with LoRA adapters (only those trainable), or with ``share_base`` (the student's adapters sit on the teacher's
    network) a LoRA adapter "fake_score" on that same base. LoRA B matrices start at zero, so all start equal to the
    teacher."""
    if share_base and lora_rank is not None:
        kwargs = {} if lora_targets is None else {"target_modules": list(lora_targets)}
        return AdapterView(teacher.unet, "fake_score", lora_rank, lora_alpha, **kwargs)
    if lora_rank is None:
        return copy_unet(teacher.unet, dtype=torch.float32, trainable=True)
    unet = copy_unet(teacher.unet, dtype=torch.float32, trainable=False)
    kwargs = {} if lora_targets is None else {"target_modules": list(lora_targets)}
    add_lora(unet, lora_rank, lora_alpha, **kwargs)
    unet.train()
    return unet


def cond_only(embeds):
    """The same prompt embeddings with the *unconditional* rows used as the condition (classifier-free dropout)."""
    if embeds.uncond is None:
        raise ValueError("conditioning dropout needs PromptEmbeds.uncond (encode_prompt(..., with_uncond=True))")
    return dataclasses.replace(embeds, cond=embeds.uncond, cond_added=embeds.uncond_added)


def drop_rows(embeds, drop: torch.Tensor):
    """Per-sample classifier-free dropout: the rows where ``drop`` (a (B,) bool tensor) is True take the
    unconditional embeddings (the empty prompt) as their condition; the others keep theirs."""
    if embeds.uncond is None:
        raise ValueError("conditioning dropout needs PromptEmbeds.uncond (encode_prompt(..., with_uncond=True))")
    drop = drop.to(embeds.cond.device)

    def pick(cond, uncond):
        mask = drop.reshape(-1, *([1] * (cond.ndim - 1)))
        return torch.where(mask, uncond, cond)

    cond_added = None
    if embeds.cond_added is not None:
        cond_added = {k: pick(v, embeds.uncond_added[k]) for k, v in embeds.cond_added.items()}
    return dataclasses.replace(embeds, cond=pick(embeds.cond, embeds.uncond), cond_added=cond_added)


class DistributionMatching:
    """The DMD/DMD2 generator step, mixed into objectives that own a ``fake_unet`` and a ``real_guidance_scale``."""

    def generate_and_match(self, batch, timesteps=None, noise=None):
        """x₀ = G_θ(z, c) with gradient, then :meth:`distribution_matching` against the fake score at
        t ~ U[min_t_ratio·T, max_t_ratio·T] (or the given ``timesteps``/``noise``). Returns ``(x0, loss_dm, logs)``."""
        x0 = self.generate(batch, grad=True)
        n = x0.shape[0]
        t = self._timesteps_or(timesteps, n, x0.device, lambda: self.sample_timesteps(n, x0.device))
        eps = torch.randn_like(x0) if noise is None else noise
        loss, logs = self.distribution_matching(x0, batch.embeds, self.fake_unet, self.config["real_guidance_scale"], t, eps)
        return x0, loss, logs

    def distribution_matching(
        self,
        x0: torch.Tensor,
        embeds,
        fake_unet: torch.nn.Module,
        real_guidance_scale: float,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """DMD/DMD2 distribution-matching loss: x_t = noise(sg(x₀), t, ε); x̂₀ of the teacher (CFG ``real_guidance_scale``)
        and of the fake score (no CFG), both converted in float64; gradient :func:`distribution_matching_gradient`;
        loss :func:`surrogate_loss`. Returns the loss and logs."""
        with torch.no_grad():
            x_t = self.schedule.add_noise(x0.detach(), noise.to(x0), t)
        grad, logs = self.matching_gradient(x0, x_t, t, embeds, fake_unet, real_guidance_scale)
        loss = surrogate_loss(x0, grad)
        logs["loss_dm"] = float(loss.detach())
        return loss, logs

    def matching_gradient(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        embeds,
        fake_unet: torch.nn.Module,
        real_guidance_scale: float,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Without autograd: x̂₀ of the teacher (CFG ``real_guidance_scale`` when above 1, :func:`real_guidance`) and of
        the fake score (no CFG) at x_t, both converted in float64, and :func:`distribution_matching_gradient`
        normalised against ``x0`` (the generator's x̂₀). Returns the gradient and logs."""
        with torch.no_grad():
            out_real = self.teacher_prediction(x_t, t, embeds, real_guidance(real_guidance_scale))
            out_fake = self.score_prediction(fake_unet, x_t, t, embeds, 1.0)
            x_t64 = x_t.double()
            x0_real = self.schedule.to_x0(out_real.double(), x_t64, t)
            x0_fake = self.schedule.to_x0(out_fake.double(), x_t64, t)
            grad = distribution_matching_gradient(x0, x0_real, x0_fake)
        logs = {
            "dm_grad_norm": float(grad.norm()),
            "dm_t_mean": float(t.float().mean()),
            "pred_real_x0_std": float(x0_real.std()),
            "pred_fake_x0_std": float(x0_fake.std()),
        }
        return grad, logs
