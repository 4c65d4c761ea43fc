"""DMD — One-step Diffusion with Distribution Matching Distillation (Yin, Gharbi, Zhang, Shechtman, Durand,
Freeman, Park; CVPR 2024, arXiv:2311.18828). No official code was released; the distribution-matching term follows
the authors' own re-implementation in tianweiy/DMD2 (``main/sd_guidance.py``), which is the same formula.

Generator update:
  x₀ = G_θ(z, c); t ~ U{⌊0.02T⌋ … ⌊0.98T⌋}; x_t = a_t·sg(x₀) + σ_t·ε;
  μ_real = x̂₀ of the frozen teacher with CFG ``real_guidance_scale``; μ_fake = x̂₀ of the online fake score (no CFG);
  weight = 1 / mean_{C,H,W}|x₀ − μ_real| (per sample, no grad); grad = (μ_fake − μ_real)·weight;
  loss_DM = ½·mean((x₀ − sg(x₀ − grad))²)   (shared: ``objectives.common.DistributionMatching``)
  loss_reg = distance(G_θ(z_ref, c_ref), y_ref) on precomputed teacher ODE pairs (``Batch.ref_*``);
  loss = loss_DM + regression_weight·loss_reg, regression_weight = λ_reg = 0.25 (paper).
Optional ODE-pair warm-up (``ode_warmup_steps``, default 0 = the paper): the first N generator updates use loss_reg
alone and skip the fake-score updates (``objectives.regression.ODEPairWarmup``).
Fake-score update: ε-prediction denoising loss (``NoiseSchedule.target``) on sg(x₀) at t ~ U{0 … T−1}, after the
generator update and on its sample (the paper's Algorithm 1; ``aux_sample: fresh`` runs it first on a fresh sample).
The teacher's CFG applies when ``real_guidance_scale`` > 1 (DMD2's rule, :func:`~stepdistill.objectives.common.real_guidance`).

Regression distance — honest note: the paper uses LPIPS (VGG features, on decoded images). LPIPS needs pretrained
VGG/AlexNet weights and torchvision, neither of which this project can ship or download, so the default here is
``regression_distance: "mse"`` in latent space (``regression_space: "latent"``). Users who have LPIPS can plug it in:
``regression_distance`` accepts a callable ``(pred, ref) -> scalar loss`` or a ``"module:attribute"`` import path to
one (a class is instantiated without arguments), and ``regression_space: "image"`` decodes both sides with
``teacher.decode`` (images in [−1, 1], gradient through the frozen VAE decoder) before measuring. ``"lpips"`` as a bare
string is rejected with this explanation rather than silently replaced.

The regression pairs come from :func:`stepdistill.objectives.regression.make_regression_pairs`: the teacher's deterministic DDIM ODE (η = 0) from
pure noise z_ref at t = T−1 ("trailing" spacing), returning the x̂₀ of its last step.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import torch
import torch.nn.functional as F

from stepdistill.objectives.base import (
    Batch,
    Objective,
    ObjectiveConfigError,
    Requirements,
    check_number,
    trainable_parameters,
)
from stepdistill.objectives.common import (
    DistributionMatching,
    GeneratorFirstSchedule,
    make_fake_score,
)
from stepdistill.objectives.disback import DisBackOption
from stepdistill.objectives.regression import (  # noqa: F401 (RegressionPairs, make_regression_pairs re-exported)
    ODEPairWarmup,
    RegressionPairs,
    make_regression_pairs,
)

_LPIPS_MESSAGE = (
    "regression_distance 'lpips' cannot be provided by stepdistill: LPIPS needs pretrained VGG/AlexNet weights and "
    "torchvision, which are unavailable here. Pass a callable (pred, ref) -> loss, or a 'module:attribute' path to "
    "one, e.g. a wrapper around lpips.LPIPS(net='vgg'), together with regression_space: image; or use 'mse'/'l1'."
)


def _mse(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), ref.float())


def _l1(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred.float(), ref.float())


def resolve_distance(spec: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``"mse"`` | ``"l1"`` | a callable | ``"module:attribute"`` (callable, or a class instantiated without arguments)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"dmd config 'regression_distance' must be 'mse', 'l1', a callable or 'module:attr', got {spec!r}")
    if spec == "mse":
        return _mse
    if spec == "l1":
        return _l1
    if spec.lower() == "lpips":
        raise ValueError(_LPIPS_MESSAGE)
    if ":" in spec:
        module_name, attr = spec.split(":", 1)
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"dmd config 'regression_distance': cannot import {spec!r}: {exc}") from exc
        if isinstance(obj, type):
            obj = obj()
        if not callable(obj):
            raise ValueError(f"dmd config 'regression_distance': {spec!r} is not callable")
        return obj
    raise ValueError(f"dmd config 'regression_distance' must be 'mse', 'l1', a callable or 'module:attr', got {spec!r}")


# --- the objective ----------------------------------------------------------------------------------------------------
class DMD(DisBackOption, GeneratorFirstSchedule, ODEPairWarmup, DistributionMatching, Objective):
    """See the module docstring. Config keys: real_guidance_scale (3.0, the paper's SD1.5 FID model), min_t_ratio
    0.02, max_t_ratio 0.98, aux_updates_per_generator_update 1, fake_lora_rank null / fake_lora_alpha null,
    regression_weight 0.25, regression_distance "mse", regression_space "latent" | "image", regression_pairs (number
    of teacher (noise, image) pairs made before training; null: 4 x the batch size), regression_steps 25 (DDIM steps
    of the teacher's ODE for those pairs), regression_guidance null (CFG of that ODE; null: real_guidance_scale),
    ode_warmup_steps 0 (generator updates of regression alone before distribution matching starts)."""

    name = "dmd"
    DEFAULTS = {
        "real_guidance_scale": 3.0,
        "min_t_ratio": 0.02,
        "max_t_ratio": 0.98,
        "aux_updates_per_generator_update": 1,
        "fake_lora_rank": None,
        "fake_lora_alpha": None,
        "regression_weight": 0.25,
        "regression_distance": "mse",
        "regression_space": "latent",
        "regression_pairs": None,
        "regression_steps": 25,
        "regression_guidance": None,
        "ode_warmup_steps": 0,
        **DisBackOption.DISBACK_DEFAULTS,
        **GeneratorFirstSchedule.SCHEDULE_DEFAULTS,
    }

    def __init__(self, teacher, generator, config=None) -> None:
        super().__init__(teacher, generator, config)
        cfg = self.config
        self.distance = resolve_distance(cfg["regression_distance"])
        self.fake_unet = make_fake_score(teacher, cfg["fake_lora_rank"], cfg["fake_lora_alpha"],
                                         share_base=self.shares_teacher_base)

    @classmethod
    def validate_config(cls, cfg, num_train_timesteps: int = 1000) -> None:
        super().validate_config(cfg, num_train_timesteps)
        cls.validate_regression_config(cfg)
        cls.validate_disback_config(cfg)
        cls.validate_schedule_config(cfg)
        try:
            resolve_distance(cfg["regression_distance"])
        except ValueError as e:
            raise ObjectiveConfigError("dmd", "regression_distance", str(e).split("regression_distance' ", 1)[-1]) from None
        check_number(cls.name, "real_guidance_scale", cfg["real_guidance_scale"])
        check_number(cls.name, "regression_weight", cfg["regression_weight"], low=0.0)
        if cfg["regression_space"] not in ("latent", "image"):
            raise ObjectiveConfigError("dmd", "regression_space", f"must be 'latent' or 'image', got {cfg['regression_space']!r}")

    @classmethod
    def requirements(cls, cfg) -> Requirements:
        """The regression uses the ODE pairs at every update (unless its weight is 0); ``regression_space: image``
        decodes the generator's output with the teacher's VAE inside the loss."""
        return dataclasses.replace(super().requirements(cfg), regression_pairs=cfg["regression_weight"] > 0,
                                   teacher_in_gradient=("vae",) if cfg["regression_space"] == "image" else ())

    def auxiliary_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"fake_score": trainable_parameters(self.fake_unet)}

    def regression_distance_and_space(self) -> tuple[Any, str]:
        return self.distance, self.config["regression_space"]

    def regression_loss(self, batch: Batch) -> torch.Tensor:
        """loss_reg = distance(G_θ(z_ref, c_ref), y_ref) with the configured distance and space (set
        regression_weight: 0 to train without it)."""
        return self.ode_regression_loss(batch, *self.regression_distance_and_space())

    def generator_loss(self, batch: Batch, *, timesteps=None, noise=None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        if self.in_ode_warmup():
            return self.ode_warmup_loss(batch)
        x0, loss, logs = self.generate_and_match(batch, timesteps, noise)
        self.keep_for_auxiliary(x0, batch)
        if cfg["regression_weight"] > 0:
            loss_reg = self.regression_loss(batch)
            loss = loss + cfg["regression_weight"] * loss_reg
            logs["loss_reg"] = float(loss_reg.detach())
        logs.update(self.x0_stats(x0))
        logs["loss_generator"] = float(loss.detach())
        return loss, logs

    def auxiliary_loss(self, batch: Batch, *, timesteps=None, noise=None) -> tuple[torch.Tensor, dict[str, float]]:
        x0, batch = self.auxiliary_sample(batch)
        n = x0.shape[0]
        t = self._timesteps_or(timesteps, n, x0.device, lambda: self.sample_timesteps(n, x0.device, 0.0, 1.0))
        eps = torch.randn_like(x0) if noise is None else noise
        loss = self.denoising_loss(self.fake_unet, x0, batch.embeds, t, eps)
        return loss, {"loss_fake": float(loss.detach()), "loss_auxiliary": float(loss.detach())}
