"""The scheduler an exported student folder ships, chosen so that the plain diffusers call reproduces the student's
sampling (see :mod:`stepdistill.export.students` for the choice per student), and the copy of a shipped custom
scheduler into the folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from stepdistill.export.common import (
    ExportError,
)
from stepdistill.export.shipped import shipped_file
from stepdistill.export.shipped.scheduling_scaled_lcm import ScaledNoiseLCMScheduler

TIMESTEP_SCALING = 10_000.0


SCALED_LCM_MODULE = "scheduling_scaled_lcm"


SCALED_LCM_CLASS = "ScaledNoiseLCMScheduler"


@dataclasses.dataclass
class SchedulerPlan:
    """The exported scheduler and how the student is called: ``default_call_ok`` says whether
    ``num_inference_steps=len(timesteps)`` reproduces the student's timesteps (``timesteps=[...]`` always does);
    ``custom_module`` names the scheduler file shipped in ``scheduler/`` (loading then needs
    ``trust_remote_code=True``), None for a stock diffusers scheduler."""

    scheduler: Any
    default_call_ok: bool
    custom_module: str | None = None

    @property
    def trust_remote_code(self) -> bool:
        return self.custom_module is not None


def _truncated_betas(teacher_scheduler: Any, num_train_timesteps: int) -> list[float]:
    """The teacher's betas for t = 0 … num_train_timesteps − 1 (float32 values, so ᾱ_t is bit-identical)."""
    betas = getattr(teacher_scheduler, "betas", None)
    if betas is None:
        ac = teacher_scheduler.alphas_cumprod.double()
        betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
    return [float(b) for b in betas.float()[:num_train_timesteps]]


def student_scheduler(teacher_scheduler: Any, timesteps: list[int], scaled_input_noise: bool = False) -> SchedulerPlan:
    """A scheduler with the teacher's noise schedule *truncated after t₀ = timesteps[0]* (``num_train_timesteps``
    = t₀ + 1, the teacher's betas up to t₀: ᾱ_t unchanged for t ≤ t₀), under which the pipeline reproduces the
    student's sampler exactly:

    - first input z, re-noising with fresh noise (DMD/DMD2/VSD students): ``LCMScheduler``; ``original_inference_steps``
      m is the first for which ``set_timesteps(n)`` yields the student's timesteps (its schedule is
      (1 … m)·⌊(t₀+1)/m⌋ − 1, so t₀ itself is always its last entry: one step at any t₀ works with m = 1); when none
      does, m = t₀ + 1 (every timestep is on the schedule) and the student is called with ``timesteps=[...]``,
      which then prints no warning;
    - first input σ_{t₀}·z (SiD-LSG), one step: ``EulerDiscreteScheduler`` with "trailing" spacing, whose initial
      noise is ``z·σ_max`` in its variance-exploding space (σ_max = √((1−ᾱ)/ᾱ) at t₀, the `init_noise_sigma` of the
      trailing/linspace spacings) and whose model input is divided by √(σ²+1): the UNet sees σ_{t₀}·z, and its one
      Euler step to σ = 0 returns x̂₀ = x − σ·ε̂, the same x̂₀;
    - first input σ_{t₀}·z, several steps: :class:`ScaledNoiseLCMScheduler` (an LCMScheduler whose initial noise is
      σ_{t₀}·z), shipped as a file in the folder (load with ``trust_remote_code=True``).
    """
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    timesteps = [int(t) for t in timesteps]
    n = len(timesteps)
    T = timesteps[0] + 1
    config = teacher_scheduler.config
    base = dict(num_train_timesteps=T, trained_betas=_truncated_betas(teacher_scheduler, T),
                prediction_type=config.get("prediction_type", "epsilon"), steps_offset=1)
    if scaled_input_noise and n == 1:
        scheduler = EulerDiscreteScheduler(**base, timestep_spacing="trailing", interpolation_type="linear",
                                           use_karras_sigmas=False, final_sigmas_type="zero")
        scheduler.set_timesteps(1)
        if [int(t) for t in scheduler.timesteps] != timesteps:
            raise ExportError(f"EulerDiscreteScheduler does not reproduce {timesteps}: {scheduler.timesteps.tolist()}")
        return SchedulerPlan(scheduler, default_call_ok=True)

    cls = ScaledNoiseLCMScheduler if scaled_input_noise else LCMScheduler
    # timestep_scaling: LCM's boundary condition c_skip·x_t + c_out·x̂₀ returns x̂₀ (c_skip < 1e-8 for t ≥ 1)
    fixed = dict(**base, timestep_scaling=TIMESTEP_SCALING, clip_sample=False, thresholding=False)
    probe = cls(**fixed)
    found = None
    for m in range(n, T + 1):
        try:
            probe.set_timesteps(n, original_inference_steps=m)
        except ValueError:
            continue
        if [int(t) for t in probe.timesteps] == timesteps:
            found = m
            break
    scheduler = cls(**fixed, original_inference_steps=found if found is not None else T)
    return SchedulerPlan(scheduler, default_call_ok=found is not None,
                         custom_module=SCALED_LCM_MODULE if scaled_input_noise else None)


def flow_student_scheduler(teacher_scheduler: Any, sigmas: list[float]) -> SchedulerPlan:
    """The scheduler of a flow-matching student (SD3 / FLUX) whose steps are at ``sigmas`` (σ of each step, from 1
    down) and re-noise with fresh noise: ``FlowMatchLCMScheduler``, whose step is x̂₀ = x − σ·v̂,
    x' = (1 − σ')·x̂₀ + σ'·ξ (x̂₀ itself after the last step), with no shift (``shift=1``, dynamic shifting off) and
    ``shift_terminal`` = the last σ: both pipelines' lists then become ``linspace(1, σ_last, K)`` at
    ``num_inference_steps=K`` (SD3's default grid and FLUX's ``linspace(1, 1/K, K)`` are both linear from 1, and the
    terminal stretch is affine in 1 − σ), which reproduces a uniform σ list exactly. Any other list is reproduced by
    passing ``sigmas=[...]`` to the pipeline (``default_call_ok`` False; without a shift the list is used as given).
    A one-step student at σ = 1 is ``[1]`` at K = 1 under either rule."""
    from diffusers import FlowMatchLCMScheduler

    sigmas = [float(s) for s in sigmas]
    k = len(sigmas)
    if not sigmas or any(a <= b for a, b in zip(sigmas, sigmas[1:])) or not 0 < sigmas[-1] <= sigmas[0] <= 1:
        raise ExportError(f"a flow student's σ list must be strictly decreasing within (0, 1], got {sigmas}")
    uniform = abs(sigmas[0] - 1.0) < 1e-6 and all(
        abs(s - (1 + (sigmas[-1] - 1) * i / max(k - 1, 1))) < 1e-6 for i, s in enumerate(sigmas))
    config = dict(num_train_timesteps=int(teacher_scheduler.config.num_train_timesteps), shift=1.0,
                  use_dynamic_shifting=False, shift_terminal=sigmas[-1] if uniform and k > 1 else None)
    scheduler = FlowMatchLCMScheduler(**config)
    default_ok = False
    if uniform:
        probe = FlowMatchLCMScheduler(**config)
        probe.set_timesteps(k)
        default_ok = torch.allclose(probe.sigmas[:-1].double(), torch.tensor(sigmas, dtype=torch.float64), atol=1e-5)
    return SchedulerPlan(scheduler, default_call_ok=default_ok)


def ship_custom_scheduler(folder: Path, module: str, class_name: str) -> None:
    """Copy the custom scheduler's source into ``folder/scheduler/<module>.py`` and point model_index.json at it,
    so that diffusers' custom-component loading (``trust_remote_code=True``) finds it without stepdistill."""
    source = shipped_file(module)
    shutil.copyfile(source, folder / "scheduler" / f"{module}.py")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["scheduler"] = [module, class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
