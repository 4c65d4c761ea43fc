"""The interface every distillation objective implements, and the pieces the score-distillation objectives share.

An objective receives the frozen :class:`~stepdistill.teacher.Teacher` and the :class:`~stepdistill.student.Generator`,
builds its own auxiliary networks (fake score, discriminator head), and returns

- ``generator_loss(batch) -> (loss, logs)``: backpropagating ``loss`` puts gradient on the generator only;
- ``auxiliary_loss(batch) -> (loss, logs)``: backpropagating ``loss`` puts gradient on the auxiliary networks only;

together with ``aux_updates_per_generator_update`` (the "dfake" two time-scale ratio) and
``auxiliary_parameters()`` (one optimizer per entry). The trainer knows nothing else about an objective.

Shared helpers (used by DMD, DMD2 and VSD, written once here):

- :func:`surrogate_loss` — ``½·mean((x₀ − sg(x₀ − g))²)``, whose gradient w.r.t. x₀ is exactly ``g / numel`` (the
  way SwiftBrush, DMD and DMD2 inject a score-difference gradient through autograd);
- :func:`distribution_matching_gradient` — the DMD/DMD2 normalised gradient
  ``(p_real − p_fake) / mean_{C,H,W}|p_real|`` with ``p = x₀ − x̂₀`` in float64, NaNs → 0
  (tianweiy/DMD2 ``main/sd_guidance.py::compute_distribution_matching_loss``);
- :meth:`Objective.denoising_loss` — the fake score's denoising loss on ``sg(x₀)`` against
  ``NoiseSchedule.target`` (ε for ε-prediction teachers, v for v-prediction), optionally weighted per sample.

ODE-pair warm-up (``ode_warmup_steps``, DMD and DMD2): the first N generator updates train only a regression of the
generator's x₀ onto the teacher's deterministic ODE output from the same noise (the precomputed pairs in
``Batch.ref_*``), with no auxiliary (fake-score / discriminator) updates; distribution matching starts at update N
with the fake score still equal to its initialisation. DMD2's one-step SDXL recipe warms its generator up on ODE
pairs this way before distribution matching (Yin et al. 2024, arXiv:2405.14867; ../shared/OBJECTIVES.md). The trainer
tells the objective which update it is on through :meth:`Objective.set_train_step` and asks
:meth:`Objective.auxiliary_active` before the auxiliary updates.

Test hooks: ``generator_loss``/``auxiliary_loss`` accept keyword-only ``timesteps=`` and ``noise=`` that replace the
random draws, and :meth:`Objective.generate` (the generator's x₀ for a batch) can be monkeypatched.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from stepdistill.student import add_lora, copy_unet, trainable_parameters  # noqa: F401 (re-exported)


# --- data --------------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One training batch.

    ``embeds`` must carry ``uncond`` when the objective uses classifier-free guidance. ``real_latents`` (DMD2 GAN) are
    encoded real images; they are discriminated under ``real_embeds`` when given, else under ``embeds`` (then the
    rows must correspond). ``ref_noise``/``ref_embeds``/``ref_latents`` are DMD's regression pairs (z_ref, c, y_ref).
    ``real_embeds`` is an optional addition to the contract in docs/CONTRACTS.md (defaults to None).
    """

    embeds: Any  # PromptEmbeds
    noise: torch.Tensor
    real_latents: torch.Tensor | None = None
    ref_noise: torch.Tensor | None = None
    ref_embeds: Any | None = None
    ref_latents: torch.Tensor | None = None
    real_embeds: Any | None = None


# --- config validation ------------------------------------------------------------------------------------------
def resolve_config(name: str, defaults: Mapping[str, Any], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``defaults`` updated by ``config``; an unknown key is a ValueError naming it and the allowed keys."""
    config = dict(config or {})
    unknown = [k for k in config if k not in defaults]
    if unknown:
        raise ValueError(
            f"unknown config key {unknown[0]!r} for objective {name!r}; allowed keys: {', '.join(sorted(defaults))}"
        )
    return {**dict(defaults), **config}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_number(name: str, key: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    if not _is_number(value):
        raise ValueError(f"{name} config {key!r} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} config {key!r} must lie in [{low}, {high}], got {value!r}")


def check_int(name: str, key: str, value: Any, low: int | None = None, high: int | None = None, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} config {key!r} must be an integer{' or null' if optional else ''}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} config {key!r} must lie in [{low}, {high}], got {value!r}")


def check_bool(name: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} config {key!r} must be true or false, got {value!r}")


# --- shared maths -------------------------------------------------------------------------------------------------
def surrogate_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``½·MSE(x₀, sg(x₀ − grad))`` (mean over all elements): ∂loss/∂x₀ = grad / x₀.numel()."""
    target = (x0.detach().double() - grad.detach().double()).float()
    return 0.5 * F.mse_loss(x0.float(), target, reduction="mean")


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
    carries gradient to its *inputs* only (e.g. the generator's GAN term through the discriminator)."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def make_fake_score(
    teacher, lora_rank: int | None = None, lora_alpha: float | None = None, lora_targets=None
) -> torch.nn.Module:
    """A fake-score network initialised from the teacher's UNet: a full trainable float32 copy, or a frozen copy with
    LoRA adapters (only those trainable). LoRA B matrices start at zero, so both start equal to the teacher."""
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


# --- the interface ------------------------------------------------------------------------------------------------
class Objective(torch.nn.Module):
    """Base class (see the module docstring). Subclasses set ``name``, ``DEFAULTS`` (every allowed config key with its
    default) and implement ``generator_loss``/``auxiliary_loss``; ``config`` is validated against ``DEFAULTS``.

    The teacher and the generator are held as plain attributes (not submodules): the objective's ``state_dict`` and
    ``parameters()`` hold its auxiliary networks only."""

    name: str = "base"
    DEFAULTS: dict[str, Any] = {"aux_updates_per_generator_update": 1}

    def __init__(self, teacher, generator, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "generator", generator)
        self.config = resolve_config(self.name, self.DEFAULTS, config)
        self.validate_config(self.config)
        self.aux_updates_per_generator_update = int(self.config.get("aux_updates_per_generator_update", 1))

    # --- validation -------------------------------------------------------------------------------------------------
    def validate_config(self, cfg: dict[str, Any]) -> None:
        """Type and range checks; subclasses extend. Errors name the key."""
        check_int(self.name, "aux_updates_per_generator_update", cfg["aux_updates_per_generator_update"], low=1)
        if "min_t_ratio" in cfg or "max_t_ratio" in cfg:
            lo, hi = cfg.get("min_t_ratio", 0.0), cfg.get("max_t_ratio", 1.0)
            check_number(self.name, "min_t_ratio", lo, 0.0, 1.0)
            check_number(self.name, "max_t_ratio", hi, 0.0, 1.0)
            if lo > hi:
                raise ValueError(f"{self.name} config 'min_t_ratio' ({lo}) must not exceed 'max_t_ratio' ({hi})")
        if "ode_warmup_steps" in cfg:
            check_int(self.name, "ode_warmup_steps", cfg["ode_warmup_steps"], low=0)
        if "regression_pairs" in cfg:
            check_int(self.name, "regression_pairs", cfg["regression_pairs"], low=1, optional=True)
        if "regression_steps" in cfg:
            check_int(self.name, "regression_steps", cfg["regression_steps"], low=1)
        if cfg.get("regression_guidance") is not None:
            check_number(self.name, "regression_guidance", cfg["regression_guidance"])
        if "fake_lora_rank" in cfg:
            check_int(self.name, "fake_lora_rank", cfg["fake_lora_rank"], low=1, optional=True)
        if cfg.get("fake_lora_alpha") is not None:
            check_number(self.name, "fake_lora_alpha", cfg["fake_lora_alpha"], low=0.0)

    # --- training phase ---------------------------------------------------------------------------------------------
    #: generator updates done before the current one (set by the trainer through :meth:`set_train_step`)
    train_step: int = 0

    def set_train_step(self, step: int) -> None:
        """Called by the trainer before each update with the number of generator updates done so far."""
        self.train_step = int(step)

    @property
    def ode_warmup_steps(self) -> int:
        return int(self.config.get("ode_warmup_steps") or 0)

    def in_ode_warmup(self) -> bool:
        """True during the first ``ode_warmup_steps`` generator updates (regression on ODE pairs only)."""
        return self.train_step < self.ode_warmup_steps

    def auxiliary_active(self) -> bool:
        """Whether the trainer should run the auxiliary updates before this generator update (not in the warm-up)."""
        return not self.in_ode_warmup()

    def needs_regression_pairs(self, from_step: int = 0) -> bool:
        """Whether training from generator update ``from_step`` on (a resumed run starts past 0) needs the teacher's
        (noise, ODE output) pairs in ``Batch.ref_*``: here only while the ODE-pair warm-up lasts."""
        return self.ode_warmup_steps > from_step

    def ode_regression_loss(self, batch: Batch, distance=None, space: str = "latent") -> torch.Tensor:
        """``distance(G_θ(z_ref, c_ref), y_ref)`` on the precomputed teacher ODE pairs (``Batch.ref_*``); ``distance``
        defaults to the MSE; ``space="image"`` decodes both sides with ``teacher.decode`` first (gradient through the
        frozen decoder)."""
        if batch.ref_noise is None or batch.ref_embeds is None or batch.ref_latents is None:
            raise ValueError(
                f"{self.name}: the regression on teacher ODE pairs needs Batch.ref_noise/ref_embeds/ref_latents (see "
                "stepdistill.objectives.dmd.make_regression_pairs; `stepdistill distill` makes them when the recipe "
                "asks for them)"
            )
        pred = self.generator(batch.ref_noise, batch.ref_embeds, step_index=0)
        ref = batch.ref_latents.to(pred)
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

    def ode_warmup_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator loss during the ODE-pair warm-up: the regression alone."""
        loss = self.ode_regression_loss(batch, *self.regression_distance_and_space())
        value = float(loss.detach())
        return loss, {"loss_reg": value, "loss_generator": value, "ode_warmup": 1.0}

    # --- the contract ---------------------------------------------------------------------------------------------
    def auxiliary_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        raise NotImplementedError

    def generator_loss(self, batch: Batch, **overrides) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def auxiliary_loss(self, batch: Batch, **overrides) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # --- shared machinery -------------------------------------------------------------------------------------------
    @property
    def schedule(self):
        return self.teacher.schedule

    def generate(self, batch: Batch, grad: bool = True) -> torch.Tensor:
        """The generator's x₀ for ``batch.noise`` / ``batch.embeds``. One-step: ``G(z, c)``. Few-step: DMD2 backward
        simulation (a random step k, steps < k without grad) and the x₀ of step k. ``grad=False`` runs without
        autograd (the auxiliary step trains on sg(x₀))."""
        gen = self.generator
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if gen.num_steps > 1:
                x_t, k = gen.backward_simulate(batch.noise, batch.embeds)
                return gen(batch.noise, batch.embeds, step_index=k, x_t=x_t)
            return gen(batch.noise, batch.embeds)

    def sample_timesteps(self, n: int, device, min_ratio: float | None = None, max_ratio: float | None = None) -> torch.Tensor:
        """t ~ U{⌊min·T⌋ … ⌊max·T⌋} (defaults: the config's ``min_t_ratio``/``max_t_ratio``)."""
        lo = self.config.get("min_t_ratio", 0.0) if min_ratio is None else min_ratio
        hi = self.config.get("max_t_ratio", 1.0) if max_ratio is None else max_ratio
        return self.schedule.sample_timesteps(n, lo, hi, device=device)

    @staticmethod
    def _timesteps_or(timesteps, n: int, device, sampler) -> torch.Tensor:
        if timesteps is None:
            return sampler()
        t = torch.as_tensor(timesteps, dtype=torch.long, device=device).reshape(-1)
        return t.expand(n).clone() if t.numel() == 1 else t

    def teacher_prediction(self, x_t: torch.Tensor, t: torch.Tensor, embeds, guidance_scale: float) -> torch.Tensor:
        """The frozen teacher's raw output (no autograd), in ``x_t``'s dtype (``unet_forward`` casts inputs to the
        teacher's dtype, e.g. bf16, and the output back); needs ``embeds.uncond`` when ``guidance_scale != 1``."""
        if guidance_scale != 1.0 and embeds.uncond is None:
            raise ValueError(
                f"real guidance scale {guidance_scale} needs unconditional embeddings: build the batch with "
                "teacher.encode_prompt(..., with_uncond=True)"
            )
        with torch.no_grad():
            return self.teacher.predict(x_t, t, embeds, guidance_scale=guidance_scale)

    def score_prediction(self, unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embeds, guidance_scale: float = 1.0) -> torch.Tensor:
        """Raw output of an auxiliary score network (autograd follows the caller's grad mode)."""
        from stepdistill.teacher import unet_forward

        if guidance_scale != 1.0 and embeds.uncond is None:
            raise ValueError(f"fake guidance scale {guidance_scale} needs unconditional embeddings (PromptEmbeds.uncond)")
        return unet_forward(unet, x_t, t, embeds, guidance_scale=guidance_scale)

    def denoising_loss(
        self,
        unet: torch.nn.Module,
        x0: torch.Tensor,
        embeds,
        t: torch.Tensor,
        noise: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoising loss of a score network on sg(x₀): mean over elements of ``w_t·(out(x_t, t, c) − target)²`` with
        ``x_t = a_t·x₀ + σ_t·ε`` and ``target = NoiseSchedule.target(x₀, ε, t)`` (ε for ε-prediction); ``weight`` is
        an optional per-sample factor (None = 1). Gradient reaches ``unet`` only."""
        x0 = x0.detach()
        x_t = self.schedule.add_noise(x0, noise, t)
        out = self.score_prediction(unet, x_t, t, embeds, 1.0).float()
        target = self.schedule.target(x0.float(), noise.float(), t)
        err = (out - target) ** 2
        if weight is not None:
            err = err * weight.to(err).reshape(-1, *([1] * (err.ndim - 1)))
        return err.mean()

    def generate_and_match(self, batch: Batch, timesteps=None, noise=None):
        """The step DMD and DMD2 share: x₀ = G_θ(z, c) with gradient, then :meth:`distribution_matching` against the
        fake score at t ~ U[min_t_ratio·T, max_t_ratio·T] (or the given ``timesteps``/``noise``).
        Returns ``(x0, loss_dm, logs)``."""
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
            out_real = self.teacher_prediction(x_t, t, embeds, real_guidance_scale)
            out_fake = self.score_prediction(fake_unet, x_t, t, embeds, 1.0)
            x_t64 = x_t.double()
            x0_real = self.schedule.to_x0(out_real.double(), x_t64, t)
            x0_fake = self.schedule.to_x0(out_fake.double(), x_t64, t)
            grad = distribution_matching_gradient(x0, x0_real, x0_fake)
        loss = surrogate_loss(x0, grad)
        logs = {
            "loss_dm": float(loss.detach()),
            "dm_grad_norm": float(grad.norm()),
            "dm_t_mean": float(t.float().mean()),
            "pred_real_x0_std": float(x0_real.std()),
            "pred_fake_x0_std": float(x0_fake.std()),
        }
        return loss, logs

    @staticmethod
    def x0_stats(x0: torch.Tensor) -> dict[str, float]:
        x0 = x0.detach().float()
        return {"x0_mean": float(x0.mean()), "x0_std": float(x0.std())}
