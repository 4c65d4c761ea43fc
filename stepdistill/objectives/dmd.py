"""DMD — One-step Diffusion with Distribution Matching Distillation (Yin, Gharbi, Zhang, Shechtman, Durand,
Freeman, Park; CVPR 2024, arXiv:2311.18828). No official code was released; the distribution-matching term follows
the authors' own re-implementation in tianweiy/DMD2 (``main/sd_guidance.py``), which is the same formula.

Generator update:
  x₀ = G_θ(z, c); t ~ U{⌊0.02T⌋ … ⌊0.98T⌋}; x_t = a_t·sg(x₀) + σ_t·ε;
  μ_real = x̂₀ of the frozen teacher with CFG ``real_guidance_scale``; μ_fake = x̂₀ of the online fake score (no CFG);
  weight = 1 / mean_{C,H,W}|x₀ − μ_real| (per sample, no grad); grad = (μ_fake − μ_real)·weight;
  loss_DM = ½·mean((x₀ − sg(x₀ − grad))²)   (shared helper: ``Objective.distribution_matching``)
  loss_reg = distance(G_θ(z_ref, c_ref), y_ref) on precomputed teacher ODE pairs (``Batch.ref_*``);
  loss = loss_DM + regression_weight·loss_reg, regression_weight = λ_reg = 0.25 (paper).
Optional ODE-pair warm-up (``ode_warmup_steps``, default 0 = the paper): the first N generator updates use loss_reg
alone and skip the fake-score updates (see ``stepdistill.objectives.base``).
Fake-score update: ε-prediction denoising loss (``NoiseSchedule.target``) on sg(x₀) at t ~ U{0 … T−1}.

Regression distance — honest note: the paper uses LPIPS (VGG features, on decoded images). LPIPS needs pretrained
VGG/AlexNet weights and torchvision, neither of which this project can ship or download, so the default here is
``regression_distance: "mse"`` in latent space (``regression_space: "latent"``). Users who have LPIPS can plug it in:
``regression_distance`` accepts a callable ``(pred, ref) -> scalar loss`` or a ``"module:attribute"`` import path to
one (a class is instantiated without arguments), and ``regression_space: "image"`` decodes both sides with
``teacher.decode`` (images in [−1, 1], gradient through the frozen VAE decoder) before measuring. ``"lpips"`` as a bare
string is rejected with this explanation rather than silently replaced.

The regression pairs come from :func:`make_regression_pairs`: the teacher's deterministic DDIM ODE (η = 0) from
pure noise z_ref at t = T−1 ("trailing" spacing), returning the x̂₀ of its last step.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from stepdistill.objectives.base import (
    Batch,
    Objective,
    check_int,
    check_number,
    make_fake_score,
    trainable_parameters,
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


# --- regression pairs ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RegressionPairs:
    """DMD's precomputed (z_ref, c_ref, y_ref): ``noise`` (N, C, H, W), ``embeds`` (PromptEmbeds of N rows; CFG rows
    included when the teacher used guidance) and ``latents`` (N, C, H, W) = the teacher ODE's output from ``noise``."""

    noise: torch.Tensor
    embeds: Any
    latents: torch.Tensor

    def __len__(self) -> int:
        return self.noise.shape[0]

    def select(self, index) -> "RegressionPairs":
        return RegressionPairs(self.noise[index], self.embeds.select(index), self.latents[index])

    def to(self, device=None, dtype=None) -> "RegressionPairs":
        return RegressionPairs(
            self.noise.to(device=device, dtype=dtype),
            self.embeds.to(device=device, dtype=dtype),
            self.latents.to(device=device, dtype=dtype),
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
            x = schedule.add_noise(x0, eps, ts[i + 1]).to(noise.dtype)
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
    from stepdistill.teacher import PromptEmbeds

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


# --- the objective ----------------------------------------------------------------------------------------------------
class DMD(Objective):
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
    }

    def __init__(self, teacher, generator, config=None) -> None:
        super().__init__(teacher, generator, config)
        cfg = self.config
        self.distance = resolve_distance(cfg["regression_distance"])
        self.fake_unet = make_fake_score(teacher, cfg["fake_lora_rank"], cfg["fake_lora_alpha"])

    def validate_config(self, cfg) -> None:
        super().validate_config(cfg)
        check_number(self.name, "real_guidance_scale", cfg["real_guidance_scale"])
        check_number(self.name, "regression_weight", cfg["regression_weight"], low=0.0)
        if cfg["regression_space"] not in ("latent", "image"):
            raise ValueError(f"dmd config 'regression_space' must be 'latent' or 'image', got {cfg['regression_space']!r}")

    def auxiliary_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"fake_score": trainable_parameters(self.fake_unet)}

    def needs_regression_pairs(self, from_step: int = 0) -> bool:
        """DMD's regression loss uses the pairs at every update (unless its weight is 0); the warm-up needs them too."""
        return self.config["regression_weight"] > 0 or self.ode_warmup_steps > from_step

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
        if cfg["regression_weight"] > 0:
            loss_reg = self.regression_loss(batch)
            loss = loss + cfg["regression_weight"] * loss_reg
            logs["loss_reg"] = float(loss_reg.detach())
        logs.update(self.x0_stats(x0))
        logs["loss_generator"] = float(loss.detach())
        return loss, logs

    def auxiliary_loss(self, batch: Batch, *, timesteps=None, noise=None) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = self.generate(batch, grad=False).detach()
        n = x0.shape[0]
        t = self._timesteps_or(timesteps, n, x0.device, lambda: self.sample_timesteps(n, x0.device, 0.0, 1.0))
        eps = torch.randn_like(x0) if noise is None else noise
        loss = self.denoising_loss(self.fake_unet, x0, batch.embeds, t, eps)
        return loss, {"loss_fake": float(loss.detach()), "loss_auxiliary": float(loss.detach())}
