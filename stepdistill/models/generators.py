"""The student: a one- or few-step generator initialised from the teacher's UNet.

``Generator`` wraps a trainable copy of the teacher UNet (full fine-tuning) or a frozen copy carrying peft LoRA
adapters (``unet.add_adapter``, so that ``peft.get_peft_model_state_dict`` + diffusers'
``convert_state_dict_to_diffusers`` give a standard diffusers LoRA file, see :meth:`Generator.lora_state_dict`).

Sampling (DMD / DMD2, Yin et al. 2023, 2024; official code tianweiy/DMD2 ``main/sd_unified_model.py``):

- one step: the UNet is evaluated on pure noise ``z`` at a fixed conditioning timestep ``t*`` (default 999) with the
  conditional text embeddings only (guidance 1, no CFG); its output is turned into x₀ by the schedule
  (``NoiseSchedule.to_x0``, done in float64 as DMD2 does). With ``scaled_input_noise`` the first step's input is
  ``σ_{t*}·z`` instead of ``z`` — SiD-LSG's Stable Diffusion convention (mingyuanzhou/SiD-LSG
  ``training/sid_sd_util.py::sid_sd_sampler``: ``add_noise(0, z, t_init)`` at ``t_init = 625``), i.e. the marginal of
  x_{t*} with the signal term dropped;
- few steps (e.g. 999, 749, 499, 249): after each step the predicted x₀ is re-noised to the next timestep with
  *fresh* noise (``NoiseSchedule.add_noise``) and fed to the next step;
- backward simulation (DMD2 §4.4): during training of a few-step generator a step ``k`` is drawn uniformly (one per
  batch, as in the official code), steps ``0 … k−1`` run without gradient from pure noise, and the re-noised result
  is the training input of step ``k``, so training inputs match what inference sees.

All schedule arithmetic is delegated to :mod:`stepdistill.core.schedule`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import torch

from stepdistill.core.schedule import NoiseSchedule
from stepdistill.models.conditioning import architecture, guidance_scale_embedding, unet_forward
from stepdistill.models.shared_base import AdapterView

#: LoRA targets of the generator: the attention projections (diffusers' SD LoRA convention).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def copy_unet(unet: torch.nn.Module, dtype: torch.dtype | None = torch.float32, trainable: bool = True) -> torch.nn.Module:
    """An independent copy of ``unet`` (e.g. to initialise a fake score or a generator from the teacher).

    The copy is cast to ``dtype`` (float32 by default: trainable weights should not live in bf16/fp16; pass
    ``None`` to keep the source dtype), put in train mode and made trainable (``requires_grad=True``) unless
    ``trainable=False`` (then frozen and in eval mode). The source is not modified.
    """
    out = copy.deepcopy(unet)
    if dtype is not None and any(p.dtype != dtype for p in out.parameters()):
        out = out.to(dtype=dtype)
    out.requires_grad_(trainable)
    out.train(trainable)
    return out


def add_lora(
    unet: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    adapter_name: str = "default",
) -> torch.nn.Module:
    """Freeze ``unet`` and attach peft LoRA adapters (``LoraConfig(r=rank, lora_alpha=alpha or rank, ...)``) through
    diffusers' ``add_adapter``; only the adapter weights are trainable afterwards. LoRA's B matrices start at zero,
    so the adapted network initially equals the base network. Returns ``unet`` (modified in place)."""
    from peft import LoraConfig

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank must be a positive integer, got {rank!r}")
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights=True,
        target_modules=list(target_modules),
    )
    unet.add_adapter(config, adapter_name=adapter_name)
    return unet


def lora_targets(config: Any) -> tuple[str, ...]:
    """The LoRA target modules a recipe's ``generator`` section names (``lora_targets``; null: the default)."""
    return tuple(getattr(config, "lora_targets", None) or DEFAULT_LORA_TARGETS)


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; drawn on ``generator``'s device, then moved to ``x``'s."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


class Generator(torch.nn.Module):
    """One-/few-step student ``G_θ(z, c)`` (see the module docstring).

    Attributes: ``unet`` (trainable copy, or frozen copy + LoRA), ``schedule`` (:class:`NoiseSchedule`),
    ``timesteps`` (conditioning timesteps, strictly decreasing; ``[999]`` for one step), ``lora_rank``.
    ``kind`` names the student kind (:data:`GENERATOR_KINDS`; an objective asks for one in
    ``Requirements.student``, and export picks the exporter registered for it).
    """

    kind: ClassVar[str] = "few_step"

    def __init__(
        self,
        unet: torch.nn.Module,
        schedule: NoiseSchedule,
        timesteps: Iterable[int] = (999,),
        lora_rank: int | None = None,
        scaled_input_noise: bool = False,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.timesteps = [int(t) for t in timesteps]
        self.lora_rank = lora_rank
        self.scaled_input_noise = bool(scaled_input_noise)
        T = schedule.num_train_timesteps
        if not self.timesteps:
            raise ValueError("timesteps must hold at least one timestep")
        if any(not 0 <= t < T for t in self.timesteps):
            raise ValueError(f"timesteps must lie in [0, {T - 1}], got {self.timesteps}")
        if any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError(f"timesteps must be strictly decreasing, got {self.timesteps}")

    # --- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_teacher(
        cls,
        teacher,
        timesteps: Iterable[int] = (999,),
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        dtype: torch.dtype = torch.float32,
        scaled_input_noise: bool = False,
        init_unet: str | Path | None = None,
        share_teacher_base: bool = False,
    ) -> "Generator":
        """Initialise from ``teacher.unet``: a full trainable copy (``lora_rank=None``) or a frozen copy with LoRA
        adapters of rank ``lora_rank`` (``lora_alpha`` defaults to the rank, i.e. scale 1). The teacher is untouched.
        ``scaled_input_noise``: the first step's input is σ_{t₀}·z (SiD-LSG), see the module docstring.
        ``init_unet``: start from the UNet saved in this diffusers folder instead (e.g. a smaller MSD student after
        its TSM stage); it must take the teacher's latents and text embeddings.
        ``share_teacher_base``: the LoRA adapters sit on the teacher's own network (an
        :class:`~stepdistill.models.shared_base.AdapterView`, adapter "student"): no copy of the base is made."""
        if share_teacher_base:
            if lora_rank is None or init_unet is not None:
                raise ValueError("share_teacher_base needs a LoRA student (lora_rank) that starts from the teacher")
            view = AdapterView(teacher.unet, "student", lora_rank, lora_alpha, lora_targets)
            return cls(view, teacher.schedule, timesteps, lora_rank, scaled_input_noise=scaled_input_noise)
        source = teacher.unet
        if init_unet is not None:
            folder = Path(init_unet)
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"init_unet: {folder / 'config.json'} not found (a diffusers UNet folder "
                                        "written by save_pretrained is needed)")
            source = type(teacher.unet).from_pretrained(folder, local_files_only=True)
        if lora_rank is None:
            unet = copy_unet(source, dtype=dtype, trainable=True)
        else:
            unet = copy_unet(source, dtype=dtype, trainable=False)
            add_lora(unet, lora_rank, lora_alpha, lora_targets)
            unet.train()
        return cls(unet, teacher.schedule, timesteps, lora_rank, scaled_input_noise=scaled_input_noise)

    @classmethod
    def from_config(cls, teacher, config: Any) -> "Generator":
        """The generator a recipe's ``generator`` section (:class:`~stepdistill.training.config.GeneratorConfig`)
        describes, from ``teacher``."""
        return cls.from_teacher(teacher, timesteps=tuple(config.timesteps), lora_rank=config.lora_rank,
                                lora_alpha=config.lora_alpha, lora_targets=lora_targets(config),
                                scaled_input_noise=config.scaled_input_noise,
                                init_unet=config.init_unet, share_teacher_base=config.share_teacher_base)

    @property
    def is_lora(self) -> bool:
        return self.lora_rank is not None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the generator optimizer should update (only the LoRA weights for a LoRA generator)."""
        return trainable_parameters(self.unet)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter weights in diffusers' LoRA format (for ``StableDiffusionPipeline.save_lora_weights``)."""
        if not self.is_lora:
            raise ValueError("this generator is fully fine-tuned (lora_rank=None); it has no LoRA weights")
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        if isinstance(self.unet, AdapterView):
            return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet.base,
                                                                             adapter_name=self.unet.adapter_name))
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))

    # --- sampling -------------------------------------------------------------------------------------------------
    def initial_input(self, noise: torch.Tensor) -> torch.Tensor:
        """The first step's input: ``z`` itself, or ``σ_{t₀}·z`` with ``scaled_input_noise``."""
        if not self.scaled_input_noise:
            return noise
        return self.schedule.sigma(self.timesteps[0], noise) * noise

    def forward(self, noise: torch.Tensor, embeds, step_index: int = 0, x_t: torch.Tensor | None = None) -> torch.Tensor:
        """x₀ predicted by step ``step_index`` (conditioning timestep ``timesteps[step_index]``) from the input
        ``x_t``; ``x_t=None`` means the first step's input built from ``noise`` (:meth:`initial_input`)."""
        if not -self.num_steps <= step_index < self.num_steps:
            raise IndexError(f"step_index {step_index} out of range for {self.num_steps} step(s)")
        t = self.timesteps[step_index]
        x_in = self.initial_input(noise) if x_t is None else x_t
        t_batch = torch.full((x_in.shape[0],), t, dtype=torch.long, device=x_in.device)
        out = unet_forward(self.unet_for_step(step_index), x_in, self.schedule.model_timestep(t_batch), embeds,
                           guidance_scale=1.0)
        # DMD2 converts to x0 in float64; gradients flow through the casts.
        x0 = self.schedule.to_x0(out.double(), x_in.double(), t_batch)
        return x0.to(x_in.dtype)

    def unet_for_step(self, step_index: int) -> torch.nn.Module:
        """The network that runs step ``step_index`` (one UNet for every step here; one expert per step in
        :class:`PhasedGenerator`)."""
        return self.unet

    def next_input(
        self, x0: torch.Tensor, x_in: torch.Tensor, step_index: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The input of step ``step_index`` from the previous step's input ``x_in`` and its x₀: DMD2's re-noising
        with fresh noise (:meth:`renoise`; ``x_in`` is unused here)."""
        return self.renoise(x0, step_index, generator)

    def renoise(self, x0: torch.Tensor, step_index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The input of step ``step_index`` built from a previous x₀ with fresh noise: x_t = a_t·x₀ + σ_t·ε."""
        t = self.timesteps[step_index]
        return self.schedule.add_noise(x0, _randn_like(x0, generator), t)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, embeds, generator: torch.Generator | None = None) -> torch.Tensor:
        """Inference: run every step (no gradient), re-noising each x₀ to the next timestep with fresh noise drawn
        from ``generator``; returns the last x₀."""
        x_t = self.initial_input(noise)
        x0 = noise
        for i in range(self.num_steps):
            x0 = self(noise, embeds, step_index=i, x_t=x_t)
            if i + 1 < self.num_steps:
                x_t = self.next_input(x0, x_t, i + 1, generator)
        return x0

    def backward_simulate(
        self, noise: torch.Tensor, embeds, generator: torch.Generator | None = None, k: int | None = None
    ) -> tuple[torch.Tensor, int]:
        """DMD2 backward simulation: draw ``k ~ U{0 … K−1}`` (one for the whole batch, as in the official
        ``sample_backward``; or use the given ``k``), run steps ``0 … k−1`` without gradient starting from
        ``noise`` and return ``(x_t, k)``: the (detached) input of step ``k``. For ``k = 0`` this is the first
        step's input (:meth:`initial_input`)."""
        if k is None:
            if generator is None:
                k = int(torch.randint(0, self.num_steps, (1,)))
            else:
                k = int(torch.randint(0, self.num_steps, (1,), generator=generator, device=generator.device))
        if not 0 <= k < self.num_steps:
            raise IndexError(f"step {k} out of range for {self.num_steps} step(s)")
        x_t = self.initial_input(noise)
        if k > 0:
            with torch.no_grad():
                for i in range(k):
                    x0 = self(noise, embeds, step_index=i, x_t=x_t)
                    x_t = self.next_input(x0, x_t, i + 1, generator)
        return x_t.detach(), k


class PhasedGenerator(Generator):
    """Phased DMD's few-step student (Fan et al. 2025, arXiv:2510.27684): one *expert* per SNR phase.

    The noise axis is cut at ``timesteps`` t₀ > t₁ > … > t_{K−1} (the starts of :meth:`NoiseSchedule.snr_phases`) and
    clean data; expert k maps x_{t_k} to x_{t_{k+1}} (x₀ for the last): it predicts x̂₀ and ε̂ at t_k and takes the
    deterministic DDIM step ``x_{t_{k+1}} = a_{t_{k+1}}·x̂₀ + σ_{t_{k+1}}·ε̂`` (:meth:`NoiseSchedule.ddim_step`), the
    ε-prediction counterpart of the paper's flow-matching Euler step. The first input is pure noise z at t₀.

    Experts are full UNet copies (``unet`` is expert 0, ``extra_experts`` the rest) or LoRA adapters
    ``phase_0 … phase_{K−1}`` on one frozen base (``lora_rank``). Every expert's weights stay trainable (so the
    optimizer and the checkpoints hold them all); an expert gets gradient only in its own phase, because earlier
    experts run under ``no_grad`` (:meth:`phase_output`) and later ones do not run.
    """

    kind: ClassVar[str] = "phase_experts"

    @classmethod
    def from_config(cls, teacher, config: Any) -> "PhasedGenerator":
        return cls.from_teacher(teacher, timesteps=tuple(config.timesteps), lora_rank=config.lora_rank,
                                lora_alpha=config.lora_alpha, lora_targets=lora_targets(config))

    def __init__(
        self,
        experts: Sequence[torch.nn.Module],
        schedule: NoiseSchedule,
        timesteps: Iterable[int],
        lora_rank: int | None = None,
    ) -> None:
        experts = list(experts)
        timesteps = [int(t) for t in timesteps]
        if lora_rank is None and len(experts) != len(timesteps):
            raise ValueError(f"need one expert per timestep, got {len(experts)} experts for {timesteps}")
        if lora_rank is not None and len(experts) != 1:
            raise ValueError("LoRA experts live on one base UNet: pass [base] with adapters phase_0 … phase_{K-1}")
        super().__init__(experts[0], schedule, timesteps, lora_rank)
        self.extra_experts = torch.nn.ModuleList(experts[1:])

    @classmethod
    def from_teacher(  # type: ignore[override]
        cls,
        teacher,
        timesteps: Iterable[int],
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        dtype: torch.dtype = torch.float32,
    ) -> "PhasedGenerator":
        """K experts initialised from ``teacher.unet``: K full copies, or one frozen copy with K LoRA adapters."""
        timesteps = [int(t) for t in timesteps]
        if lora_rank is None:
            experts = [copy_unet(teacher.unet, dtype=dtype, trainable=True) for _ in timesteps]
        else:
            base = copy_unet(teacher.unet, dtype=dtype, trainable=False)
            for k in range(len(timesteps)):
                add_lora(base, lora_rank, lora_alpha, lora_targets, adapter_name=cls.adapter_name(k))
            base.train()
            experts = [base]
        gen = cls(experts, teacher.schedule, timesteps, lora_rank)
        gen._all_adapters_trainable()
        return gen

    @staticmethod
    def adapter_name(k: int) -> str:
        return f"phase_{k}"

    def _all_adapters_trainable(self) -> None:
        if self.is_lora:
            for name, p in self.unet.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)

    def expert_parameters(self, k: int) -> list[torch.nn.Parameter]:
        """Expert ``k``'s own weights: its adapter's for LoRA experts, its network's otherwise."""
        if self.is_lora:
            return [p for n, p in self.unet.named_parameters() if f".{self.adapter_name(k)}." in n]
        return list(self.expert(k).parameters())

    def expert(self, k: int) -> torch.nn.Module:
        """Expert ``k``'s network (for LoRA experts: the base with adapter ``phase_k`` active)."""
        if not 0 <= k < self.num_steps:
            raise IndexError(f"expert {k} out of range for {self.num_steps} phase(s)")
        if self.is_lora:
            self.unet.set_adapter(self.adapter_name(k))
            self._all_adapters_trainable()  # peft's set_adapter freezes the inactive adapters; keep them all saved
            return self.unet
        return self.unet if k == 0 else self.extra_experts[k - 1]

    def unet_for_step(self, step_index: int) -> torch.nn.Module:
        return self.expert(step_index % self.num_steps)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def boundary(self, k: int) -> int | None:
        """t_k, the start of phase k; ``None`` (clean data) for k = K, the end of the last phase."""
        return self.timesteps[k] if k < self.num_steps else None

    def next_input(self, x0, x_in, step_index, generator=None):
        """DDIM step from the previous boundary to t_{step_index} with the previous expert's own ε̂."""
        eps = self.schedule.x0_to_eps(x0.double(), x_in.double(), self.timesteps[step_index - 1])
        return self.schedule.ddim_step(x0.double(), eps, self.boundary(step_index)).to(x0.dtype)

    def phase_output(self, noise: torch.Tensor, embeds, k: int, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_{t_{k+1}}, x̂₀)`` of phase ``k``: experts 0 … k−1 run without gradient from ``noise`` (back-simulation
        that stops at the phase's start), expert k runs with gradient; ``x_{t_{k+1}}`` is x̂₀ itself in the last
        phase. ``grad=False`` runs expert k without autograd too (the fake-score update trains on sg(x_s))."""
        x_in, _ = self.backward_simulate(noise, embeds, k=k)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x0 = self(noise, embeds, step_index=k, x_t=x_in)
            if k + 1 == self.num_steps:
                return x0, x0
            return self.next_input(x0, x_in, k + 1), x0


class TeacherSamplerGenerator(Generator):
    """A guidance-distilled student (CFG distillation, LoRA-enhanced distillation): a denoiser that predicts *without*
    CFG what the teacher predicts with it, sampled by DDIM (η = 0) on the teacher's noise schedule — diffusers'
    ``DDIMScheduler.from_config(teacher scheduler config)``, the toy teacher's own sampler — in ``num_inference_steps``
    steps with one UNet pass per step: the teacher's sampler at half its NFE, not a few-step generator. ``timesteps``
    are that scheduler's timesteps; the export ships that scheduler. With ``share_base`` (LoRA only) the LoRA adapters sit on the teacher's own UNet — one UNet in
    memory; the teacher is then evaluated with the adapters disabled (:meth:`teacher_unet_mode`)."""

    kind: ClassVar[str] = "teacher_sampler"

    @classmethod
    def from_config(cls, teacher, config: Any) -> "TeacherSamplerGenerator":
        return cls.from_teacher(teacher, config.teacher_sampler_steps, lora_rank=config.lora_rank,
                                lora_alpha=config.lora_alpha, lora_targets=lora_targets(config),
                                share_base=config.share_teacher_base)

    def __init__(self, unet: torch.nn.Module, schedule: NoiseSchedule, scheduler, num_inference_steps: int,
                 lora_rank: int | None = None, share_base: bool = False, mu: float | None = None) -> None:
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        if schedule.family == "rectified_flow":
            self.scheduler_template = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        else:
            self.scheduler_template = DDIMScheduler.from_config(scheduler.config)
        self.mu = mu
        probe = self._fresh_scheduler(num_inference_steps)
        super().__init__(unet, schedule, self._table_indices(probe, schedule), lora_rank)
        self.num_inference_steps = int(num_inference_steps)
        self.share_base = bool(share_base)

    @classmethod
    def from_teacher(cls, teacher, num_inference_steps: int = 25, lora_rank: int | None = None,  # type: ignore[override]
                     lora_alpha: float | None = None, lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
                     share_base: bool = False, dtype: torch.dtype = torch.float32) -> "TeacherSamplerGenerator":
        """A full trainable copy of the teacher's UNet, a frozen copy with LoRA, or (``share_base``) LoRA on the
        teacher's own UNet (``teacher.unet`` then carries the adapters; the teacher must be float32 to train them)."""
        if share_base:
            if lora_rank is None:
                raise ValueError("share_base needs a LoRA student (set generator.lora_rank)")
            unet = teacher.unet
            add_lora(unet, lora_rank, lora_alpha, lora_targets)
            for p in trainable_parameters(unet):  # adapters train in float32 even on a half-precision base
                p.data = p.data.float()
        elif lora_rank is None:
            unet = copy_unet(teacher.unet, dtype=dtype, trainable=True)
        else:
            unet = copy_unet(teacher.unet, dtype=dtype, trainable=False)
            add_lora(unet, lora_rank, lora_alpha, lora_targets)
            unet.train()
        _, h, w = teacher.latent_shape  # FLUX: the dynamic shift of the teacher's resolution (2×2-packed tokens)
        mu = teacher.schedule.resolution_mu((h // 2) * (w // 2))
        return cls(unet, teacher.schedule, teacher.pipeline.scheduler, num_inference_steps, lora_rank, share_base, mu)

    def _fresh_scheduler(self, num_inference_steps: int | None = None):
        """The teacher's sampler at K steps: DDIM (it keeps no state between steps, so a copy is cheap), or for a
        flow teacher FlowMatchEulerDiscreteScheduler with the list its pipeline uses (SD3: the default grid; FLUX:
        ``sigmas = linspace(1, 1/K, K)`` shifted by ``e^mu``)."""
        import copy as _copy

        steps = int(num_inference_steps or self.num_inference_steps)
        scheduler = _copy.deepcopy(self.scheduler_template)
        if self.mu is not None:
            scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], mu=self.mu)
        else:
            scheduler.set_timesteps(steps)
        return scheduler

    @staticmethod
    def _table_indices(scheduler, schedule: NoiseSchedule) -> list[int]:
        """The schedule's table index of each sampler step: the timestep itself for DDIM; for a flow sampler the
        index whose σ is nearest the step's σ (the losses address noise levels by index; the sampler itself runs at
        the exact σ)."""
        if schedule.family != "rectified_flow":
            return [int(t) for t in scheduler.timesteps]
        return [int(i) for i in schedule.timesteps_for_sigmas(scheduler.sigmas[:-1].double())]

    def teacher_unet_mode(self):
        """Context in which ``teacher.unet`` is the teacher: the adapters disabled when the base is shared (else a
        no-op, the teacher's UNet carries no adapters)."""
        import contextlib

        if not self.share_base:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def disabled():
            self.unet.disable_adapters()
            try:
                yield
            finally:
                self.unet.enable_adapters()

        return disabled()

    def _scheduler_chain(self, noise: torch.Tensor, embeds, last: int | None = None,
                         grad_from: int | None = None) -> Iterator[tuple[int, int | None, torch.Tensor]]:
        """The teacher's DDIM scheduler (diffusers' ``step``: the exported pipeline's own arithmetic) run from
        ``noise`` with the student's conditional prediction. Yields ``(i, t_i, x)`` before step i and, after the
        last step, ``(n, None, x)``; stops after yielding step ``last`` when given. Autograd runs through steps
        ``i ≥ grad_from`` only (None: none), within the caller's grad mode."""
        scheduler = self._fresh_scheduler()
        flow = self.schedule.family == "rectified_flow"
        x = noise
        for i, t in enumerate(scheduler.timesteps):
            yield i, self.timesteps[i], x
            if last is not None and i >= last:
                return
            with torch.set_grad_enabled(grad_from is not None and i >= grad_from and torch.is_grad_enabled()):
                out = unet_forward(self.unet, x, t.float() if flow else int(t), embeds, guidance_scale=1.0)
                x = scheduler.step(out, t, x, return_dict=False)[0]
        yield len(scheduler.timesteps), None, x

    def rollout(self, noise: torch.Tensor, embeds, stop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's own sampler without gradient (the on-policy states): from ``noise`` run the teacher's scheduler
        with the student's conditional prediction and return, for each row i, the state *before* step ``stop[i]`` and
        its timestep ``(x_t, t)`` (``stop[i] = 0``: the initial noisy latent)."""
        stop = stop.to(noise.device).long()
        states, ts = noise.clone(), None
        with torch.no_grad():
            for i, t, x in self._scheduler_chain(noise, embeds, last=int(stop.max())):
                if t is None:
                    break
                if ts is None:  # step 0 comes first: every row starts at the first timestep
                    ts = torch.full_like(stop, t)
                here = stop == i
                states[here], ts[here] = x[here], t
        return states, ts

    def sample_with_grad(self, noise: torch.Tensor, embeds, grad_steps: int) -> torch.Tensor:
        """The sampler's output with autograd through its last ``grad_steps`` steps only (the earlier ones run without
        gradient; DRaFT-K, Clark et al. 2024): the pathwise reward gradient of :mod:`stepdistill.objectives.cfg_distill`."""
        first_grad = self.num_inference_steps - int(grad_steps)
        for _, _, x in self._scheduler_chain(noise, embeds, grad_from=first_grad):
            pass
        return x

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, embeds, generator: torch.Generator | None = None) -> torch.Tensor:
        """Inference as the exported pipeline does it: the teacher's scheduler, guidance 1, one pass per step."""
        for _, _, x in self._scheduler_chain(noise, embeds):
            pass
        return x


class ConsistencyGenerator(Generator):
    """A latent consistency student (LCM, Luo et al. 2023, arXiv:2310.04378; LCM-LoRA, Luo et al. 2023,
    arXiv:2311.05556; TCD, Zheng et al. 2024, arXiv:2402.19159): one network f_θ(x_t, t, c[, w]) that maps any state
    of the teacher's guided ODE to its end, sampled by diffusers' own multistep consistency sampler — ``LCMScheduler``
    (each step: ``denoised = c_skip·x + c_out·x̂₀``, then re-noised with fresh noise to the next timestep) or
    ``TCDScheduler`` (strategic stochastic sampling with γ = ``gamma``: a DDIM jump to ``s = ⌊(1 − γ)·t_prev⌋``, then
    re-noised from s to t_prev) — built from the teacher's scheduler config, on LCM's 50-point grid
    ``(1 … 50)·⌊T/50⌋ − 1``. Any step count works; ``num_inference_steps`` is the default one.

    The student is the teacher's UNet, full (with, when ``guidance_embedding_dim`` is set, a new ``cond_proj`` that adds
    the embedding of LCM's guidance scale w to the timestep embedding: diffusers' ``time_cond_proj_dim``) or under LoRA
    (a frozen copy, or adapter "student" on the teacher's own UNet). ``guidance_scale`` is the pipeline's value at
    inference: a student with a guidance embedding is conditioned on w = ``guidance_scale`` − 1 (what diffusers'
    pipelines embed); one without runs at guidance 1 (no CFG). ``timesteps`` are the sampler's at the default step
    count (the base class's list; training draws its own)."""

    kind: ClassVar[str] = "consistency"
    SAMPLERS: ClassVar[tuple[str, ...]] = ("lcm", "tcd")

    def __init__(self, unet: torch.nn.Module, schedule: NoiseSchedule, scheduler_config: Any, num_inference_steps: int,
                 sampler: str = "lcm", gamma: float = 0.3, guidance_scale: float = 1.0,
                 lora_rank: int | None = None, mu: float | None = None) -> None:
        from diffusers import FlowMatchLCMScheduler, LCMScheduler, TCDScheduler

        if sampler not in self.SAMPLERS:
            raise ValueError(f"the consistency sampler must be one of {', '.join(self.SAMPLERS)}, got {sampler!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"the TCD sampler's gamma must lie in [0, 1], got {gamma}")
        self.flow = schedule.family == "rectified_flow"
        if self.flow and sampler != "lcm":
            raise ValueError("a flow-matching teacher's consistency student samples with FlowMatchLCMScheduler: use "
                             "scheduler: lcm (diffusers has no flow-matching TCD scheduler)")
        if self.flow:
            self.scheduler_template = FlowMatchLCMScheduler.from_config(scheduler_config)
        else:
            self.scheduler_template = (LCMScheduler if sampler == "lcm" else TCDScheduler).from_config(scheduler_config)
        self.mu = mu
        self.sampler = sampler
        self.gamma = float(gamma)
        self.num_inference_steps = int(num_inference_steps)
        timesteps = self._timesteps_of(self.fresh_scheduler(self.num_inference_steps), schedule, self.flow)
        super().__init__(unet, schedule, timesteps, lora_rank)
        dim = self.guidance_embedding_dim
        if dim is None and guidance_scale > 1.0:
            raise ValueError(f"guidance_scale {guidance_scale} needs a guidance embedding (a full student with "
                             "guidance_embedding_dim); a student without one samples at guidance 1")
        self.guidance_scale = float(guidance_scale)

    @classmethod
    def from_config(cls, teacher, config: Any) -> "ConsistencyGenerator":
        c = config.consistency
        if c is None:
            raise ValueError("a consistency student needs the recipe's generator.consistency section (steps, "
                             "scheduler, guidance)")
        return cls.from_teacher(teacher, c.steps, sampler=c.scheduler, gamma=c.gamma, guidance_scale=c.guidance_scale,
                                guidance_embedding_dim=c.guidance_embedding_dim, lora_rank=config.lora_rank,
                                lora_alpha=config.lora_alpha,
                                lora_targets=lora_targets(config),
                                share_teacher_base=config.share_teacher_base)

    @classmethod
    def from_teacher(cls, teacher, num_inference_steps: int = 4, *, sampler: str = "lcm",  # type: ignore[override]
                     gamma: float = 0.3, guidance_scale: float = 1.0, guidance_embedding_dim: int | None = None,
                     lora_rank: int | None = None, lora_alpha: float | None = None,
                     lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS, share_teacher_base: bool = False,
                     dtype: torch.dtype = torch.float32) -> "ConsistencyGenerator":
        """The student from ``teacher.unet``: a full trainable copy — with ``guidance_embedding_dim``, a UNet of the
        teacher's config plus ``time_cond_proj_dim`` holding the teacher's weights and a new ``cond_proj`` (Linear,
        no bias, PyTorch's default init), as diffusers' ``train_lcm_distill_sd_wds.py`` builds it (a teacher that
        already has ``time_cond_proj_dim`` keeps its own) — or LoRA of rank ``lora_rank`` on a frozen copy or
        (``share_teacher_base``) on the teacher's own UNet."""
        if lora_rank is not None:
            if guidance_embedding_dim is not None:
                raise ValueError("a LoRA consistency student has no guidance embedding (LCM-LoRA): set "
                                 "guidance_embedding_dim to null, or train a full student")
            if share_teacher_base:
                unet = AdapterView(teacher.unet, "student", lora_rank, lora_alpha, lora_targets)
            else:
                unet = copy_unet(teacher.unet, dtype=dtype, trainable=False)
                add_lora(unet, lora_rank, lora_alpha, lora_targets)
                unet.train()
        elif share_teacher_base:
            raise ValueError("share_teacher_base needs a LoRA student (lora_rank)")
        elif guidance_embedding_dim is not None and teacher.unet.config.get("time_cond_proj_dim") is None:
            if teacher.is_flow:
                raise ValueError("a guidance embedding (time_cond_proj_dim) is a UNet input: a flow transformer's "
                                 "consistency student has none (set guidance_embedding_dim to null)")
            unet = with_guidance_embedding(teacher.unet, int(guidance_embedding_dim), dtype)
        else:
            unet = copy_unet(teacher.unet, dtype=dtype, trainable=True)
        mu = None
        if teacher.is_flow:  # FLUX: the dynamic shift of the teacher's resolution (2×2-packed tokens)
            _, h, w = teacher.latent_shape
            mu = teacher.schedule.resolution_mu((h // 2) * (w // 2))
        return cls(unet, teacher.schedule, teacher.pipeline.scheduler.config, num_inference_steps, sampler, gamma,
                   guidance_scale, lora_rank, mu)

    @property
    def guidance_embedding_dim(self) -> int | None:
        """The UNet's ``time_cond_proj_dim`` (None: the student takes no guidance embedding)."""
        return architecture(self.unet).config.get("time_cond_proj_dim")

    def guidance_condition(self, w: torch.Tensor | float, batch: int, device=None) -> torch.Tensor | None:
        """``timestep_cond`` for LCM guidance scales ``w`` (a number or (B,)): their embedding
        (:func:`~stepdistill.models.conditioning.guidance_scale_embedding`), None for a student without one."""
        dim = self.guidance_embedding_dim
        if dim is None:
            return None
        w = torch.as_tensor(w, dtype=torch.float32).reshape(-1).expand(batch)
        return guidance_scale_embedding(w, dim).to(device)

    def fresh_scheduler(self, num_inference_steps: int | None = None):
        """The sampler (a copy of the template) set to ``num_inference_steps`` (default: the student's) as the
        exported pipeline sets it: FLUX passes ``sigmas = linspace(1, 1/K, K)`` and its resolution's ``mu``."""
        steps = int(num_inference_steps or self.num_inference_steps)
        scheduler = copy.deepcopy(self.scheduler_template)
        if self.mu is not None:
            scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], mu=self.mu)
        else:
            scheduler.set_timesteps(steps)
        return scheduler

    def sampler_timesteps(self, num_inference_steps: int) -> list[int]:
        """The timesteps the sampler visits in ``num_inference_steps`` steps (LCM: 4 → [999, 759, 499, 259]); for a
        flow sampler the schedule's table indices nearest its σ list."""
        return self._timesteps_of(self.fresh_scheduler(num_inference_steps), self.schedule, self.flow)

    @staticmethod
    def _timesteps_of(scheduler, schedule: NoiseSchedule, flow: bool) -> list[int]:
        if flow:
            return [int(i) for i in schedule.timesteps_for_sigmas(scheduler.sigmas[:-1].double())]
        return [int(t) for t in scheduler.timesteps]

    def forward(self, noise: torch.Tensor, embeds, step_index: int = 0, x_t: torch.Tensor | None = None, *,
                t: torch.Tensor | None = None, w: torch.Tensor | float | None = None) -> torch.Tensor:
        """With ``t`` (training: the consistency objectives call the student through here, so the trainer counts its
        evaluations): x̂₀ of the student at ``(x_t, t)`` and LCM guidance ``w`` (:meth:`predict_x0`). Without: the
        consistency output ``c_skip·x + c_out·x̂₀`` of step ``step_index`` of the default sampler (the scheduler's own
        boundary scalings), at the inference guidance."""
        x = noise if x_t is None else x_t
        if t is not None:
            return self.predict_x0(x, t, embeds, w=w)
        if not -self.num_steps <= step_index < self.num_steps:
            raise IndexError(f"step_index {step_index} out of range for {self.num_steps} step(s)")
        t = self.timesteps[step_index]
        scheduler = self.fresh_scheduler()
        lcm = self.sampler == "lcm" and not self.flow  # FlowMatchLCMScheduler's denoised is x̂₀ itself
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t) if lcm else (0.0, 1.0)
        x0 = self.predict_x0(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), embeds)
        return (c_skip * x.double() + c_out * x0.double()).to(x.dtype)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, embeds, w: torch.Tensor | float | None = None,
                   net: torch.nn.Module | None = None) -> torch.Tensor:
        """x̂₀ of ``net`` (default: the student's UNet) at ``(x_t, t)`` conditioned on LCM guidance ``w`` (default: the
        inference one, ``guidance_scale − 1``), converted by the schedule in float64."""
        w = self.guidance_scale - 1.0 if w is None else w
        cond = self.guidance_condition(w, x_t.shape[0], x_t.device)
        out = unet_forward(self.unet if net is None else net, x_t, self.schedule.model_timestep(t), embeds,
                           timestep_cond=cond)
        return self.schedule.to_x0(out.double(), x_t.double(), t).to(x_t.dtype)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, embeds, generator: torch.Generator | None = None,
               num_inference_steps: int | None = None) -> torch.Tensor:
        """Inference as the exported pipeline runs it: the sampler's ``step`` on the student's raw output (its fresh
        noise drawn from ``generator``), from ``noise`` (the scheduler's ``init_noise_sigma`` is 1)."""
        scheduler = self.fresh_scheduler(num_inference_steps)
        cond = self.guidance_condition(self.guidance_scale - 1.0, noise.shape[0], noise.device)
        x, denoised = noise * getattr(scheduler, "init_noise_sigma", 1.0), noise
        extra = {"eta": self.gamma} if self.sampler == "tcd" else {}
        for t in scheduler.timesteps:
            out = unet_forward(self.unet, x, t.float() if self.flow else int(t), embeds, timestep_cond=cond)
            stepped = scheduler.step(out, t, x, generator=generator, return_dict=False, **extra)
            # FlowMatchLCMScheduler returns the next state only; its last step's is x̂₀ (σ_next = 0)
            x, denoised = (stepped[0], stepped[0]) if self.flow else stepped
        return denoised

    def backward_simulate(self, noise, embeds, generator=None, k=None):
        raise NotImplementedError("a consistency student is trained on noised states of the teacher's ODE, not by "
                                  "backward simulation")


def with_guidance_embedding(unet: torch.nn.Module, dim: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A trainable UNet of ``unet``'s config with ``time_cond_proj_dim = dim``: ``unet``'s weights, plus the new
    ``time_embedding.cond_proj`` (Linear dim → time-embedding input, no bias, default init) that LCM's guidance
    embedding enters through. Nothing but ``cond_proj`` may be missing."""
    # the private keys go: "_use_default_values" would reset time_cond_proj_dim to its default
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = int(dim)
    out = type(unet).from_config(config)
    missing, unexpected = out.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj.") for k in missing):
        raise ValueError(f"adding a guidance embedding to {type(unet).__name__} left weights unmatched (does the "
                         f"teacher's UNet carry adapters?): missing {missing[:4]}, unexpected {unexpected[:4]}")
    if any(p.dtype != dtype for p in out.parameters()):
        out = out.to(dtype=dtype)
    return out.requires_grad_(True).train()


#: every student kind a run can train, by ``Generator.kind`` (``Requirements.student`` names one)
GENERATOR_KINDS: dict[str, type[Generator]] = {cls.kind: cls for cls in (Generator, PhasedGenerator,
                                                                        TeacherSamplerGenerator, ConsistencyGenerator)}


def generator_class(kind: str) -> type[Generator]:
    """The Generator class of student kind ``kind``."""
    if kind not in GENERATOR_KINDS:
        raise ValueError(f"unknown student kind {kind!r}; known: {', '.join(GENERATOR_KINDS)}")
    return GENERATOR_KINDS[kind]
