"""Exponential moving average of the generator's trainable weights.

A thin layer over diffusers' :class:`~diffusers.training_utils.EMAModel` (the library's implementation; its decay at
optimisation step ``s`` is ``min(decay, (1 + s)/(10 + s))``, i.e. a built-in warm-up) that adds what the trainer and
the exporter need:

- ``state_dict`` / ``load_state_dict`` for ``accelerator.register_for_checkpointing`` — loading moves the shadow
  weights back onto the parameters' device (accelerate loads custom states on the CPU);
- :meth:`GeneratorEMA.applied`, a context manager that swaps the EMA weights into the live parameters (sampling,
  export) and restores the trained weights afterwards;
- :func:`attach_ema` / :func:`get_ema`, so that ``export_student(..., ema=True)`` finds the EMA of a generator.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

_ATTR = "_stepdistill_ema"


class GeneratorEMA:
    """EMA of ``parameters`` (the generator's trainable ones: all UNet weights, or only the LoRA weights)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float) -> None:
        from diffusers.training_utils import EMAModel

        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.parameters = list(parameters)
        if not self.parameters:
            raise ValueError("GeneratorEMA needs at least one parameter")
        self.ema = EMAModel(self.parameters, decay=decay)

    @property
    def decay(self) -> float:
        return float(self.ema.decay)

    @property
    def optimization_step(self) -> int:
        return int(self.ema.optimization_step)

    @property
    def shadow_params(self) -> list[torch.Tensor]:
        return self.ema.shadow_params

    @torch.no_grad()
    def step(self) -> None:
        """Update the average from the current parameter values (call after each generator update)."""
        self.ema.step(self.parameters)

    def copy_to(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Overwrite ``parameters`` (default: the tracked ones) with the EMA weights."""
        self.ema.copy_to(self.parameters if parameters is None else list(parameters))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the tracked parameters."""
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            yield
        finally:
            self.ema.restore(self.parameters)

    def to(self, device: torch.device | str | None = None) -> "GeneratorEMA":
        self.ema.to(device=device)
        return self

    # --- checkpointing (accelerate custom object protocol) ------------------------------------------------------------
    def state_dict(self) -> dict:
        state = self.ema.state_dict()
        if any(hasattr(s, "full_tensor") for s in state.get("shadow_params") or []):
            # FSDP: the shadows are shards (DTensors); the checkpoint holds whole tensors (every process gathers,
            # accelerate writes the main process's copy)
            state = dict(state, shadow_params=[s.full_tensor() if hasattr(s, "full_tensor") else s
                                               for s in state["shadow_params"]])
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        shadow = state_dict.get("shadow_params")
        if shadow is not None and len(shadow) != len(self.parameters):
            raise ValueError(
                f"EMA checkpoint holds {len(shadow)} tensors but the generator has {len(self.parameters)} trainable "
                "parameters (was it saved for a different generator, e.g. LoRA vs full?)"
            )
        self.ema.load_state_dict(state_dict)
        for s, p in zip(self.ema.shadow_params, self.parameters):
            if s.shape != p.shape:
                raise ValueError(f"EMA checkpoint tensor of shape {tuple(s.shape)} does not match parameter {tuple(p.shape)}")
        if any(hasattr(p, "device_mesh") for p in self.parameters):  # FSDP: each process keeps its shard again
            from torch.distributed.tensor import distribute_tensor

            self.ema.shadow_params = [
                distribute_tensor(s.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements)
                if hasattr(p, "device_mesh") else s.to(device=p.device, dtype=p.dtype)
                for s, p in zip(self.ema.shadow_params, self.parameters)
            ]
            return
        self.ema.shadow_params = [s.to(device=p.device, dtype=p.dtype) for s, p in zip(self.ema.shadow_params, self.parameters)]


class HalflifeEMA(GeneratorEMA):
    """The EMA of EDM and the official SiD code (NVlabs/edm ``training_loop.py``; mingyuanzhou/SiD-LSG
    ``sid_training_loop.py`` 553–563): after each generator update, with ``n`` the images seen *before* it,

        h = min(halflife_kimg·1000, n·rampup_ratio)   (no min without a ramp-up ratio),
        β = 0.5^(images_per_update / max(h, 1e−8)),   shadow ← β·shadow + (1 − β)·θ,

    so the average starts as the weights themselves and its half-life grows with the images seen until it reaches
    ``halflife_kimg``. Written here because diffusers' EMAModel has no half-life schedule; the rest of the interface
    (applied, copy_to, checkpointing) is :class:`GeneratorEMA`'s."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], halflife_kimg: float, rampup_ratio: float | None,
                 images_per_update: int) -> None:
        super().__init__(parameters, decay=0.5)  # the EMAModel keeps the shadow copies; its decay is not used
        if not halflife_kimg > 0 or images_per_update < 1:
            raise ValueError(f"need halflife_kimg > 0 and images_per_update >= 1, got {halflife_kimg}, {images_per_update}")
        self.halflife_kimg = float(halflife_kimg)
        self.rampup_ratio = None if rampup_ratio is None else float(rampup_ratio)
        self.images_per_update = int(images_per_update)

    def beta(self, images_seen: int) -> float:
        halflife = self.halflife_kimg * 1000
        if self.rampup_ratio is not None:
            halflife = min(halflife, images_seen * self.rampup_ratio)
        return 0.5 ** (self.images_per_update / max(halflife, 1e-8))

    @property
    def decay(self) -> float:
        return self.beta(self.optimization_step * self.images_per_update)

    @torch.no_grad()
    def step(self) -> None:
        beta = self.beta(self.optimization_step * self.images_per_update)
        for shadow, param in zip(self.ema.shadow_params, self.parameters):
            shadow.copy_(param.detach().to(shadow.dtype).lerp(shadow, beta))
        self.ema.optimization_step += 1


@torch.no_grad()
def ema_update_(target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], decay: float) -> None:
    """``θ⁻ ← decay·θ⁻ + (1 − decay)·θ`` in place, tensor by tensor, with no warm-up (the target network of
    consistency distillation: diffusers ``train_lcm_distill_sd_wds.py::update_ema``, called after every optimiser
    step)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    for t, s in zip(target, source, strict=True):
        t.mul_(decay).add_(s.detach().to(t.dtype), alpha=1.0 - decay)


def attach_ema(generator: torch.nn.Module, ema: GeneratorEMA | None) -> None:
    """Remember ``ema`` on ``generator`` (a plain attribute, not a submodule or state-dict entry)."""
    object.__setattr__(generator, _ATTR, ema)


def get_ema(generator: torch.nn.Module) -> GeneratorEMA | None:
    return getattr(generator, _ATTR, None)
