"""Regression on the teacher's deterministic ODE: (noise, image) pairs and the ODE-pair warm-up.

- :func:`make_regression_pairs` runs the teacher's multi-step deterministic DDIM ODE (η = 0, "trailing" timesteps,
  CFG) from noise z_ref and keeps (z_ref, c_ref, y_ref) — DMD's regression set (Yin et al. 2023, §3.3: the SD1.5
  teacher at guidance 3, 50 PNDM steps).
- :class:`ODEPairWarmup` is mixed into objectives that regress their generator on those pairs: DMD's regression loss
  ``distance(G_θ(z_ref, c_ref), y_ref)``, and the ODE-pair warm-up (``ode_warmup_steps``): the first N generator
  updates are that regression alone, with no auxiliary (fake-score / discriminator) updates, as DMD2 prepares its
  one-step SDXL generator (Yin et al. 2024, arXiv:2405.14867). The trainer tells the objective which update it is on
  through ``Objective.set_train_step`` and asks ``auxiliary_active`` before the auxiliary updates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from stepdistill.models.conditioning import PromptEmbeds
from stepdistill.objectives.base import (
    RegressionPairs,
    Requirements,
    check_int,
    check_number,
)


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """"Trailing" DDIM timesteps (Lin et al. 2024): the first is T−1, so the ODE starts from pure noise as G does."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must lie in [1, {num_train_timesteps}], got {num_steps}")
    step = num_train_timesteps / num_steps
    return [int(round(num_train_timesteps - i * step)) - 1 for i in range(num_steps)]


@torch.no_grad()
def teacher_ode(teacher, noise: torch.Tensor, embeds, num_steps: int, guidance: float) -> torch.Tensor:
    """Deterministic DDIM (η = 0) with the teacher (CFG ``guidance``) from pure noise: at each step
    x̂₀ = to_x0(out), ε̂ = to_eps(out), x_{t'} = a_{t'}·x̂₀ + σ_{t'}·ε̂; returns the last step's x̂₀."""
    schedule = teacher.schedule
    x = noise
    ts = ddim_timesteps(schedule.num_train_timesteps, num_steps)
    x0 = x
    for i, t in enumerate(ts):
        t_b = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        out = teacher.predict(x, t_b, embeds, guidance_scale=guidance)
        x0 = schedule.to_x0(out.double(), x.double(), t_b)
        if i + 1 < len(ts):
            eps = schedule.to_eps(out.double(), x.double(), t_b)
            x = schedule.ddim_step(x0, eps, ts[i + 1]).to(noise.dtype)
    return x0.to(noise.dtype)


@torch.no_grad()
def make_regression_pairs(
    teacher,
    prompts: Sequence[str],
    num_steps: int = 50,
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
    batch_size: int = 16,
    negative_prompts: Sequence[str] | None = None,
    progress: bool = False,
) -> RegressionPairs:
    """Run the teacher's multi-step deterministic ODE (DDIM, ``num_steps``, CFG ``guidance``) from noise z_ref drawn
    from ``generator`` for each prompt; returns :class:`RegressionPairs` (z_ref, c_ref, y_ref) on the teacher's
    device (``progress`` shows a progress bar). The DMD paper generated its pairs with the SD1.5 teacher at guidance 3
    (PNDM, 50 steps)."""
    device = next(teacher.unet.parameters()).device
    dtype = next(teacher.unet.parameters()).dtype
    prompts = list(prompts)
    if not prompts:
        raise ValueError("make_regression_pairs needs at least one prompt")
    shape = (len(prompts), *teacher.latent_shape)
    if generator is None:
        noise = torch.randn(shape, dtype=torch.float32)
    else:
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(device)
    with_uncond = guidance != 1.0
    embeds_parts, latents_parts = [], []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"teacher ODE pairs ({num_steps} steps)", unit="batch")
    for start in starts:
        chunk = prompts[start : start + batch_size]
        neg = None if negative_prompts is None else list(negative_prompts[start : start + batch_size])
        embeds = teacher.encode_prompt(chunk, negative_prompts=neg, with_uncond=with_uncond)
        z = noise[start : start + len(chunk)]
        y = teacher_ode(teacher, z.to(dtype), embeds, num_steps, guidance).float()
        embeds_parts.append(embeds)
        latents_parts.append(y)

    def cat(name):
        values = [getattr(e, name) for e in embeds_parts]
        if values[0] is None:
            return None
        if isinstance(values[0], dict):
            return {k: torch.cat([v[k] for v in values]) for k in values[0]}
        return torch.cat(values)

    embeds = PromptEmbeds(cond=cat("cond"), uncond=cat("uncond"), cond_added=cat("cond_added"), uncond_added=cat("uncond_added"))
    return RegressionPairs(noise, embeds, torch.cat(latents_parts))


class ODEPairWarmup:
    """Regression on the teacher's ODE pairs (``Batch.ref_*``) and the optional warm-up that uses it alone.

    Config keys it reads (validated by :meth:`validate_regression_config`; defaults :data:`REGRESSION_DEFAULTS`, which
    an objective merges into its own ``DEFAULTS``): ``ode_warmup_steps`` (0 = none), ``regression_pairs`` (null: 4 ×
    the batch size), ``regression_steps`` (DDIM steps of the teacher ODE), ``regression_guidance`` (its CFG)."""

    REGRESSION_DEFAULTS = {"ode_warmup_steps": 0, "regression_pairs": None, "regression_steps": 25,
                           "regression_guidance": None}

    @classmethod
    def validate_regression_config(cls, cfg) -> None:
        check_int(cls.name, "ode_warmup_steps", cfg["ode_warmup_steps"], low=0)
        check_int(cls.name, "regression_pairs", cfg["regression_pairs"], low=1, optional=True)
        check_int(cls.name, "regression_steps", cfg["regression_steps"], low=1)
        if cfg.get("regression_guidance") is not None:
            check_number(cls.name, "regression_guidance", cfg["regression_guidance"])

    @property
    def ode_warmup_steps(self) -> int:
        return int(self.config.get("ode_warmup_steps") or 0)

    def in_ode_warmup(self) -> bool:
        """True during the first ``ode_warmup_steps`` generator updates (regression on ODE pairs only)."""
        return self.train_step < self.ode_warmup_steps

    def auxiliary_active(self) -> bool:
        """Whether the trainer should run the auxiliary updates before this generator update (not in the warm-up)."""
        return not self.in_ode_warmup()

    @classmethod
    def requirements(cls, cfg) -> Requirements:
        """The warm-up's pairs (``Batch.ref_*``) while it lasts, and its cost estimate for the ETA."""
        return dataclasses.replace(super().requirements(cfg), ode_warmup_steps=int(cfg.get("ode_warmup_steps") or 0),
                                   warmup_cost_ratio=cls.phase_cost_ratio(cfg))

    def pair_guidance(self) -> float:
        """CFG of the teacher ODE that makes the pairs: ``regression_guidance``, else ``real_guidance_scale``."""
        g = self.config.get("regression_guidance")
        return float(self.config.get("real_guidance_scale", 1.0) if g is None else g)

    @classmethod
    def phase_cost_ratio(cls, cfg) -> float:
        """Estimated cost of one update after the warm-up over one warm-up update, in UNet passes (a backward counts
        as two forwards): warm-up = the generator's forward + backward (3); after it, the generator step adds the
        teacher (×2 with CFG) and the fake score (1), DMD's regression another 3, and each auxiliary update a
        generator forward plus a fake-score forward + backward (4). For the toy DMD recipe this gives 9.7; measured
        there: 8.2 (3.56 and 0.432 updates/s). The progress bar's ETA uses it until the second phase is measured."""
        teacher = 2 if cfg.get("real_guidance_scale", 1.0) != 1.0 else 1
        regression = 3 if cfg.get("regression_weight", 0) else 0
        aux = int(cfg.get("aux_updates_per_generator_update", 1)) * 4
        return (3 + teacher + 1 + regression + aux) / 3

    def ode_regression_loss(self, batch, distance=None, space: str = "latent") -> torch.Tensor:
        """``distance(G_θ(z_ref, c_ref), y_ref)`` on the precomputed teacher ODE pairs (``Batch.ref_*``); ``distance``
        defaults to the MSE; ``space="image"`` decodes both sides with ``teacher.decode`` first (gradient through the
        frozen decoder)."""
        if batch.pairs is None:
            raise ValueError(
                f"{self.name}: the regression on teacher ODE pairs needs Batch.pairs (see "
                "stepdistill.objectives.regression.make_regression_pairs; `stepdistill distill` makes them when the "
                "recipe asks for them)"
            )
        pred = self.generator(batch.pairs.noise, batch.pairs.embeds, step_index=0)
        ref = batch.pairs.latents.to(pred)
        if space == "image":
            pred = self.teacher.decode(pred)
            if not pred.requires_grad and torch.is_grad_enabled():
                raise RuntimeError("teacher.decode does not propagate gradients; regression_space 'image' needs it to")
            with torch.no_grad():
                ref = self.teacher.decode(ref)
        if distance is None:
            return F.mse_loss(pred.float(), ref.float())
        return distance(pred, ref)

    def regression_distance_and_space(self) -> tuple[Any, str]:
        """``(distance, space)`` of the regression on ODE pairs: the MSE on latents here; DMD uses its config's."""
        return None, "latent"

    def ode_warmup_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator loss during the ODE-pair warm-up: the regression alone."""
        loss = self.ode_regression_loss(batch, *self.regression_distance_and_space())
        value = float(loss.detach())
        return loss, {"loss_reg": value, "loss_generator": value, "ode_warmup": 1.0}
