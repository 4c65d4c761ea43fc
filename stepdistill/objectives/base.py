"""The interface every distillation objective implements.

An objective receives the frozen :class:`~stepdistill.models.teacher.Teacher` and the :class:`~stepdistill.models.generators.Generator`,
builds its own auxiliary networks (fake score, discriminator head), and returns

- ``generator_loss(batch) -> (loss, logs)``: backpropagating ``loss`` puts gradient on the generator only;
- ``auxiliary_loss(batch) -> (loss, logs)``: backpropagating ``loss`` puts gradient on the auxiliary networks only;

together with ``aux_updates_per_generator_update`` (the "dfake" two time-scale ratio) and
``auxiliary_parameters()`` (one optimizer per entry). Before anything is built, :meth:`Objective.requirements` declares
what a run needs (:class:`Requirements`: the student kind, real images, teacher ODE pairs, an image embedder, the
teacher networks in the gradient, ...); before each update the trainer asks :meth:`Objective.plan_update` what to do
(:class:`UpdatePlan`). The trainer and ``distill`` know nothing else about an objective (docs/CONTRACTS.md).
Subclasses shape ``plan_update`` through :meth:`set_train_step`, :meth:`in_ode_warmup`, :meth:`auxiliary_active`,
:meth:`generator_update_first`, :meth:`request_auxiliary_reset` and :meth:`take_final_experts`.

Maths shared by several objectives lives in :mod:`stepdistill.objectives.common` (distribution matching, surrogate
loss, fake-score initialisation) and :mod:`stepdistill.objectives.regression` (ODE pairs, the ODE-pair warm-up).

Test hooks: ``generator_loss``/``auxiliary_loss`` accept keyword-only ``timesteps=`` and ``noise=`` that replace the
random draws, and :meth:`Objective.generate` (the generator's x₀ for a batch) can be monkeypatched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from stepdistill.core.validation import bool_problem, int_problem, number_problem
from stepdistill.models.conditioning import unet_forward
from stepdistill.models.shared_base import AdapterView
from stepdistill.models.generators import trainable_parameters  # noqa: F401 (re-exported for the objectives)


# --- data --------------------------------------------------------------------------------------------------------
@dataclass
class RealImages:
    """What ``Requirements.real_images`` asks for: encoded real images (``latents``, (B, C, H, W)) and, when they
    have their own captions, those captions' embeddings (``embeds``; None: they are judged under the batch's own
    prompts, row for row)."""

    latents: torch.Tensor
    embeds: Any | None = None  # PromptEmbeds


@dataclass
class RegressionPairs:
    """What ``Requirements.regression_pairs_needed()`` asks for: the teacher's ODE pairs (z_ref, c_ref, y_ref) of
    :mod:`stepdistill.objectives.regression`: ``noise`` (N, C, H, W), ``embeds`` (PromptEmbeds of N rows; CFG rows
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


@dataclass
class Batch:
    """One training batch: the prompts' embeddings (with ``uncond`` when the objective uses classifier-free guidance)
    and the generator's input noise, plus the data an objective declared it needs (:class:`Requirements`), each in its
    own record: ``real`` (:class:`RealImages`) and ``pairs`` (:class:`RegressionPairs`); None when not asked for."""

    embeds: Any  # PromptEmbeds
    noise: torch.Tensor
    real: RealImages | None = None
    pairs: RegressionPairs | None = None


@dataclass(frozen=True)
class Requirements:
    """What a run with one objective config needs, declared before anything is built
    (:meth:`Objective.requirements`); ``distill`` provides it, the trainer reads it.

    ``student``: the Generator kind (``"few_step"``, ``"phase_experts"``, ``"teacher_sampler"``, ``"consistency"``).
    ``real_images``: encoded real images in ``Batch.real`` (a GAN term, noised real states).
    ``regression_pairs``: the teacher's ODE pairs in ``Batch.pairs`` at every update (DMD's regression);
    ``ode_warmup_steps``: the first N generator updates regress on them alone (they need the pairs too).
    ``image_embedder``: the image embedding a reward needs (``"toy"`` or a local CLIP folder), built lazily through
    :attr:`Objective.image_embedder_loader`.
    ``teacher_in_gradient``: the frozen teacher components (``"unet"``, ``"vae"``) whose *input* the generator loss
    backpropagates through; ``distill`` runs them in float32 whatever the preset's dtype, and gradient checkpointing
    covers them.
    ``min_train_steps``: the fewest generator updates a run needs (phases that must all run).
    ``uses_run_folder``: the objective writes into the run folder (DisBack's degradation path): ``distill`` calls its
    ``attach_run`` before training.
    ``warmup_cost_ratio``: the estimated cost of an update after the ODE-pair warm-up over one in it (the progress
    bar's ETA until the second phase is measured)."""

    student: str = "few_step"
    real_images: bool = False
    regression_pairs: bool = False
    ode_warmup_steps: int = 0
    image_embedder: str | None = None
    teacher_in_gradient: tuple[str, ...] = ()
    min_train_steps: int = 1
    uses_run_folder: bool = False
    warmup_cost_ratio: float | None = None

    def regression_pairs_needed(self, from_step: int = 0) -> bool:
        """Whether training from generator update ``from_step`` on (a resumed run starts past 0) needs the pairs."""
        return self.regression_pairs or self.ode_warmup_steps > from_step


@dataclass(frozen=True)
class UpdatePlan:
    """What the trainer does at one generator update (:meth:`Objective.plan_update`): the generator update before the
    auxiliary updates (DMD2 / SwiftBrush order) or after; the auxiliary updates at all; whether this is an ODE-pair
    warm-up update (``optimizer.warmup_generator_lr``, not counted in distill-cost); whether the auxiliary optimizers'
    state is cleared first (the objective re-initialised its auxiliary networks: a new Phased DMD phase, DisBack's
    fake score from ψ_N); how many leading experts of a phase-experts student became final at this update (with a
    generator EMA the trainer gives them their EMA weights: :func:`stepdistill.training.stages.finalise_experts`)."""

    generator_first: bool = False
    auxiliary: bool = True
    ode_warmup: bool = False
    reset_auxiliary_optimizers: bool = False
    final_experts: int = 0


# --- config validation ------------------------------------------------------------------------------------------
class ObjectiveConfigError(ValueError):
    """A bad ``objective_config`` value; ``key`` names it (``distill`` adds the recipe file and the override)."""

    def __init__(self, objective: str, key: str, problem: str) -> None:
        self.objective = objective
        self.key = key
        self.problem = problem
        super().__init__(f"{objective} config {key!r} {problem}")


def resolve_config(name: str, defaults: Mapping[str, Any], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``defaults`` updated by ``config``; an unknown key is an error naming it and the allowed keys."""
    config = dict(config or {})
    unknown = [k for k in config if k not in defaults]
    if unknown:
        raise ObjectiveConfigError(name, unknown[0], f"is an unknown config key of objective {name!r}; allowed keys: "
                                   f"{', '.join(sorted(defaults))}")
    return {**dict(defaults), **config}


def check_number(name: str, key: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    """A finite int or float (NaN and ±inf are refused: no objective key means anything at infinity) in
    [``low``, ``high``] where given."""
    problem = number_problem(value, low, high)
    if problem is not None:
        raise ObjectiveConfigError(name, key, problem)


def check_int(name: str, key: str, value: Any, low: int | None = None, high: int | None = None, optional: bool = False) -> None:
    problem = int_problem(value, low, high, optional)
    if problem is not None:
        raise ObjectiveConfigError(name, key, problem)


def check_bool(name: str, key: str, value: Any) -> None:
    problem = bool_problem(value)
    if problem is not None:
        raise ObjectiveConfigError(name, key, problem)


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
        self.validate_config(self.config, teacher.schedule.num_train_timesteps)
        self.aux_updates_per_generator_update = int(self.config.get("aux_updates_per_generator_update", 1))

    # --- validation -------------------------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: Mapping[str, Any] | None, num_train_timesteps: int = 1000) -> dict[str, Any]:
        """The resolved config (``DEFAULTS`` updated by ``config``) after every check, *without building any network*
        (``distill`` calls it before a model loads). Raises :class:`ObjectiveConfigError` naming the key."""
        cfg = resolve_config(cls.name, cls.DEFAULTS, config)
        cls.validate_config(cfg, num_train_timesteps)
        return cfg

    @classmethod
    def validate_config(cls, cfg: dict[str, Any], num_train_timesteps: int = 1000) -> None:
        """Type and range checks; subclasses extend. Errors name the key."""
        check_int(cls.name, "aux_updates_per_generator_update", cfg["aux_updates_per_generator_update"], low=1)
        if "min_t_ratio" in cfg or "max_t_ratio" in cfg:
            lo, hi = cfg.get("min_t_ratio", 0.0), cfg.get("max_t_ratio", 1.0)
            check_number(cls.name, "min_t_ratio", lo, 0.0, 1.0)
            check_number(cls.name, "max_t_ratio", hi, 0.0, 1.0)
            if lo > hi:
                raise ObjectiveConfigError(cls.name, "min_t_ratio", f"({lo}) must not exceed 'max_t_ratio' ({hi})")
        if "fake_lora_rank" in cfg:
            check_int(cls.name, "fake_lora_rank", cfg["fake_lora_rank"], low=1, optional=True)
        if cfg.get("fake_lora_alpha") is not None:
            check_number(cls.name, "fake_lora_alpha", cfg["fake_lora_alpha"], low=0.0)

    # --- training phase (defaults: no phases) -----------------------------------------------------------------------
    #: generator updates done before the current one (set by the trainer through :meth:`set_train_step`)
    train_step: int = 0

    def set_train_step(self, step: int) -> None:
        """Called by the trainer before each update with the number of generator updates done so far."""
        self.train_step = int(step)

    def in_ode_warmup(self) -> bool:
        """Whether this update is in an ODE-pair warm-up (see :class:`~stepdistill.objectives.regression.ODEPairWarmup`)."""
        return False

    def auxiliary_active(self) -> bool:
        """Whether the trainer should run the auxiliary updates before this generator update."""
        return True

    def generator_update_first(self) -> bool:
        """Whether this update runs the generator before the auxiliary updates (default: after them)."""
        return False

    @classmethod
    def requirements(cls, cfg: Mapping[str, Any]) -> Requirements:
        """What a run with config ``cfg`` needs (:class:`Requirements`); subclasses and mixins extend it with
        ``dataclasses.replace(super().requirements(cfg), ...)``. Nothing here."""
        return Requirements()

    #: a zero-argument callable returning the embedding ``requirements(cfg).image_embedder`` names (set by ``distill``)
    image_embedder_loader: Callable[[], torch.nn.Module] | None = None

    def plan_update(self, step: int) -> UpdatePlan:
        """Called by the trainer before each generator update with the number of updates done so far: moves the
        objective to that update (:meth:`set_train_step`: phases, DisBack's target, SiD's mixture step) and says what
        the trainer does (:class:`UpdatePlan`)."""
        self.set_train_step(step)
        return UpdatePlan(generator_first=self.generator_update_first(), auxiliary=self.auxiliary_active(),
                          ode_warmup=self.in_ode_warmup(), reset_auxiliary_optimizers=self.take_auxiliary_reset(),
                          final_experts=self.take_final_experts())

    def checkpoint_objects(self) -> list[Any]:
        """State the trainer's checkpoints must hold besides the trainable weights (objects with ``state_dict`` /
        ``load_state_dict``): a network that receives no gradient yet changes during training (LCM's target network).
        None by default."""
        return []

    def after_generator_update(self) -> None:
        """Called by the trainer after each generator optimizer step (LCM / TCD move their target network here);
        nothing by default."""

    def take_final_experts(self) -> int:
        """The number of leading experts that became final at this update (0: none; Phased DMD at a phase start)."""
        return 0

    _auxiliary_reset_pending: bool = False

    def request_auxiliary_reset(self) -> None:
        """Called by an objective that re-initialised its auxiliary networks (a new Phased DMD phase, DisBack's fake
        score from ψ_N): the trainer then clears the auxiliary optimizers' state."""
        self._auxiliary_reset_pending = True

    def take_auxiliary_reset(self) -> bool:
        """True once after :meth:`request_auxiliary_reset` (the trainer asks after :meth:`set_train_step`)."""
        pending, self._auxiliary_reset_pending = self._auxiliary_reset_pending, False
        return pending

    @classmethod
    def generator_timesteps_problem(cls, cfg: Mapping[str, Any], timesteps: list[int], schedule) -> str | None:
        """What is wrong with the generator's ``timesteps`` for a run with config ``cfg`` on a teacher with
        ``schedule`` (None: nothing). ``distill`` asks before anything is written; the objective asks again when
        it is built."""
        return None

    def grad_clip_values(self) -> dict[str, float]:
        """Clip-by-value thresholds per auxiliary parameter group (applied before the norm clipping); none here."""
        return {}

    # --- the contract ---------------------------------------------------------------------------------------------
    def auxiliary_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        raise NotImplementedError

    def generator_loss(self, batch: Batch, **overrides) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def auxiliary_loss(self, batch: Batch, **overrides) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # --- helpers every objective uses -------------------------------------------------------------------------------
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
            return unet_forward(self.real_score_unet(), x_t, self.teacher.schedule.model_timestep(t), embeds, guidance_scale)

    @property
    def shares_teacher_base(self) -> bool:
        """True when the student is a LoRA adapter on the teacher's own network (``generator.share_teacher_base``);
        a LoRA fake score then becomes a second adapter on that base (:func:`~.common.make_fake_score`)."""
        return isinstance(self.generator.unet, AdapterView)

    def real_score_unet(self) -> torch.nn.Module:
        """The network that plays the real score: the frozen teacher's UNet (DisBack moves it along a recorded
        path, :mod:`stepdistill.objectives.disback`)."""
        return self.teacher.unet

    def score_prediction(self, unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embeds, guidance_scale: float = 1.0) -> torch.Tensor:
        """Raw output of a score network (autograd follows the caller's grad mode)."""
        if guidance_scale != 1.0 and embeds.uncond is None:
            raise ValueError(f"guidance scale {guidance_scale} needs unconditional embeddings (PromptEmbeds.uncond)")
        return unet_forward(unet, x_t, self.teacher.schedule.model_timestep(t), embeds, guidance_scale=guidance_scale)

    def denoising_loss(
        self,
        unet: torch.nn.Module,
        x0: torch.Tensor,
        embeds,
        t: torch.Tensor,
        noise: torch.Tensor,
        weight: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Denoising loss of a score network on sg(x₀): ``w_t·(out(x_t, t, c) − target)²`` reduced over all elements
        (``reduction`` "mean", or "sum_per_sample": the sum divided by the batch size), with ``x_t = a_t·x₀ + σ_t·ε``
        and ``target = NoiseSchedule.target(x₀, ε, t)`` (ε for ε-prediction, v for v-prediction); ``weight`` is an
        optional per-sample factor (None = 1); ``guidance_scale`` ≠ 1 regresses the network's CFG combination
        ``out(∅) + w·(out(c) − out(∅))`` onto the target (SiD-LSG's κ₁). Gradient reaches ``unet`` only."""
        x0 = x0.detach()
        x_t = self.schedule.add_noise(x0, noise, t)
        out = self.score_prediction(unet, x_t, t, embeds, guidance_scale).float()
        target = self.schedule.target(x0.float(), noise.float(), t)
        err = (out - target) ** 2
        if weight is not None:
            err = err * weight.to(err).reshape(-1, *([1] * (err.ndim - 1)))
        if reduction == "mean":
            return err.mean()
        if reduction == "sum_per_sample":
            return err.sum() / err.shape[0]
        raise ValueError(f"reduction must be 'mean' or 'sum_per_sample', got {reduction!r}")

    @staticmethod
    def x0_stats(x0: torch.Tensor) -> dict[str, float]:
        x0 = x0.detach().float()
        return {"x0_mean": float(x0.mean()), "x0_std": float(x0.std())}
