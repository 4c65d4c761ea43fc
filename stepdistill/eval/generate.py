"""Deterministic, batched image generation from any diffusers pipeline folder (teacher or exported student)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from stepdistill.export.loading import (  # noqa: F401 (re-exported: generate's callers read folders through it)
    PipelineLoadError,
    check_student_call,
    export_info,
    load_pipeline,
    pipeline_export_info,
    step_kwargs,
    student_call_defaults,
)
from stepdistill.export.shipped.pipeline_nasa import NASAStableDiffusionPipeline


@contextlib.contextmanager
def quiet_custom_timesteps() -> Iterator[None]:
    """Silence diffusers' LCMScheduler warning that a custom schedule does not start at T−1 (expected for students
    conditioned at an intermediate timestep; it would otherwise print on every call)."""
    log = logging.getLogger("diffusers.schedulers.scheduling_lcm")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def sample_seeds(num_prompts: int, samples_per_prompt: int, base_seed: int = 0) -> list[int]:
    """Seed of sample j of prompt i: base + i * samples_per_prompt + j, so a sample never depends on batching."""
    return [base_seed + i * samples_per_prompt + j for i in range(num_prompts) for j in range(samples_per_prompt)]


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    batch_size: int = 256,
    negative_prompt: str | list[str] | None = None,
    desc: str = "generate",
    progress: bool = True,
    nasa_alpha: float | None = None,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] for ``prompts[i]`` drawn from ``seeds[i]`` (one torch.Generator each).

    ``negative_prompt``: one string for every prompt, or a list aligned with ``prompts``. With ``nasa_alpha`` (and
    ``guidance <= 1``) it is applied by SNOOPI's NASA attention (:mod:`stepdistill.export.shipped.pipeline_nasa`) instead
    of CFG: the pipeline's components are wrapped in ``NASAStableDiffusionPipeline``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds")
    if isinstance(negative_prompt, list) and len(negative_prompt) != len(prompts):
        raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompts)} prompts")
    if nasa_alpha is not None:
        if negative_prompt is None:
            raise ValueError("nasa_alpha needs a negative prompt")
        if guidance > 1:
            raise ValueError(f"NASA replaces CFG for negative prompts: use guidance <= 1 with nasa_alpha, got {guidance}")
        pipe = nasa_pipeline(pipe)
    if not prompts:
        raise ValueError("no prompts to generate: the prompt list is empty")
    out = []
    check_student_call(pipeline_export_info(pipe), steps, guidance,
                       getattr(getattr(pipe, "config", None), "_name_or_path", None) or "the student")
    steps_kw = step_kwargs(pipe, steps)
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        batch_prompts = prompts[start:start + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[start:start + batch_size]]
        kwargs: dict[str, Any] = dict(**steps_kw, guidance_scale=guidance, generator=gens,
                                      output_type="pt")
        if isinstance(negative_prompt, list):
            kwargs["negative_prompt"] = negative_prompt[start:start + batch_size]
        elif negative_prompt is not None:
            kwargs["negative_prompt"] = [negative_prompt] * len(batch_prompts)
        if nasa_alpha is not None:
            kwargs["nasa_alpha"] = float(nasa_alpha)
        with quiet_custom_timesteps():
            images = pipe(batch_prompts, **kwargs).images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out)


def nasa_pipeline(pipe: Any) -> Any:
    """``pipe``'s components in a :class:`~stepdistill.export.shipped.pipeline_nasa.NASAStableDiffusionPipeline` (Stable
    Diffusion 1.x/2.x pipelines only); the UNet's attention processors become NASA's (exact SDPA without a negative)."""
    from diffusers import StableDiffusionPipeline

    if isinstance(pipe, NASAStableDiffusionPipeline):
        return pipe
    if not isinstance(pipe, StableDiffusionPipeline):
        raise ValueError(f"NASA negative prompts need a Stable Diffusion 1.x/2.x pipeline, got {type(pipe).__name__}")
    out = NASAStableDiffusionPipeline(**pipe.components)
    out.register_to_config(_name_or_path=getattr(pipe.config, "_name_or_path", None))
    out.set_progress_bar_config(disable=True)
    return out


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to 8-bit levels (as saved PNGs would be) and map back to [-1, 1]."""
    levels = ((images.clamp(-1, 1) + 1) * 127.5).round()
    return levels / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, rows: int, cols: int, scale: int = 1):
    """A PIL grid of the first rows*cols images, each enlarged ``scale`` times (nearest)."""
    from PIL import Image

    arr = to_uint8(images[: rows * cols])
    n, h, w, _ = arr.shape
    canvas = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = arr[k]
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
