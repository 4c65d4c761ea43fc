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

All schedule arithmetic is delegated to :mod:`stepdistill.schedule`.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch

from stepdistill.schedule import NoiseSchedule

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
    """

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
    ) -> "Generator":
        """Initialise from ``teacher.unet``: a full trainable copy (``lora_rank=None``) or a frozen copy with LoRA
        adapters of rank ``lora_rank`` (``lora_alpha`` defaults to the rank, i.e. scale 1). The teacher is untouched.
        ``scaled_input_noise``: the first step's input is σ_{t₀}·z (SiD-LSG), see the module docstring."""
        if lora_rank is None:
            unet = copy_unet(teacher.unet, dtype=dtype, trainable=True)
        else:
            unet = copy_unet(teacher.unet, dtype=dtype, trainable=False)
            add_lora(unet, lora_rank, lora_alpha, lora_targets)
            unet.train()
        return cls(unet, teacher.schedule, timesteps, lora_rank, scaled_input_noise=scaled_input_noise)

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
        from stepdistill.teacher import unet_forward

        if not -self.num_steps <= step_index < self.num_steps:
            raise IndexError(f"step_index {step_index} out of range for {self.num_steps} step(s)")
        t = self.timesteps[step_index]
        x_in = self.initial_input(noise) if x_t is None else x_t
        t_batch = torch.full((x_in.shape[0],), t, dtype=torch.long, device=x_in.device)
        out = unet_forward(self.unet, x_in, t_batch, embeds, guidance_scale=1.0)
        # DMD2 converts to x0 in float64; gradients flow through the casts.
        x0 = self.schedule.to_x0(out.double(), x_in.double(), t_batch)
        return x0.to(x_in.dtype)

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
                x_t = self.renoise(x0, i + 1, generator)
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
                    x_t = self.renoise(x0, i + 1, generator)
        return x_t.detach(), k
