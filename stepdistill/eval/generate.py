"""Deterministic, batched image generation from any diffusers pipeline folder (teacher or exported student)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm


class PipelineLoadError(ValueError):
    """A pipeline folder that does not exist or is not a diffusers pipeline."""


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """``DiffusionPipeline.from_pretrained`` on a local folder, offline; ``"toy"`` names the shipped toy teacher."""
    from diffusers import DiffusionPipeline

    if str(path) == "toy":
        from stepdistill.toy.assets import toy_teacher_path

        path = toy_teacher_path()
    path = Path(path)
    if not path.exists():
        raise PipelineLoadError(f"pipeline path {path} does not exist: pass a diffusers pipeline folder or 'toy'")
    if not (path / "model_index.json").is_file():
        raise PipelineLoadError(
            f"{path} is not a diffusers pipeline folder: expected {path / 'model_index.json'} "
            "(save one with pipe.save_pretrained(folder))"
        )
    from stepdistill.teacher import _dtype_kwarg

    kwargs: dict[str, Any] = {"local_files_only": True, _dtype_kwarg(): dtype}
    if "safety_checker" in (path / "model_index.json").read_text():
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if export_info(path).get("trust_remote_code"):  # a stepdistill export shipping its own scheduler file
        kwargs["trust_remote_code"] = True
    try:
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - one clear error naming the folder
        msg = " ".join(str(e).split())
        raise PipelineLoadError(
            f"cannot load the diffusers pipeline at {path}: {type(e).__name__}: {msg} — check that every component's "
            "weights are complete (a truncated .safetensors file is the usual cause); re-export or copy the folder "
            "again") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def export_info(folder: str | Path) -> dict[str, Any]:
    """``stepdistill_export.json`` of an exported student folder ({} for any other folder)."""
    import json

    path = Path(folder) / "stepdistill_export.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PipelineLoadError(f"{path} is not valid JSON ({e}); re-export the student") from e


def pipeline_export_info(pipe: Any) -> dict[str, Any]:
    """``stepdistill_export.json`` of the folder a loaded pipeline came from ({} for a teacher or any other
    pipeline)."""
    folder = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return export_info(folder) if folder and Path(folder).is_dir() else {}


def student_call_defaults(info: dict[str, Any]) -> tuple[int, float]:
    """(steps, guidance) an exported student is sampled with by default: its own step count and guidance (1: it
    embeds the teacher's); (25, 3.0) for a teacher or any other pipeline (``info`` empty)."""
    if not info:
        return 25, 3.0
    return int(info.get("steps") or len(info.get("timesteps") or [1])), float(info.get("guidance_scale", 1.0))


def check_student_call(info: dict[str, Any], steps: int, guidance: float, folder: str | Path = "the student") -> None:
    """Refuse, in one line, a call an exported student cannot do: classifier-free guidance on top of the guidance
    it already embeds (every student is called at guidance 1), or another step count than it was trained for
    (except a guidance-distilled student, whose DDIM sampler takes any step count)."""
    if not info:
        return
    from stepdistill.pipelines.export import GUIDANCE_DISTILLED_METHODS

    method = info.get("method", "distilled")
    own = float(info.get("guidance_scale", 1.0))
    if guidance > 1.0 and guidance != own:
        raise ValueError(f"{folder} is a {method} student that already embeds the teacher's guidance: call it with "
                         f"guidance {own:g} (its default), not {guidance:g} (CFG on top would apply guidance twice)")
    trained = int(info.get("steps") or 0)
    if trained and steps != trained and method not in GUIDANCE_DISTILLED_METHODS:
        timesteps = info.get("timesteps")
        raise ValueError(f"{folder} is a {trained}-step {method} student (timesteps {timesteps}): it samples in "
                         f"exactly {trained} step{'s' if trained != 1 else ''}, not {steps}; leave the step count out "
                         f"or give {trained}")


def step_kwargs(pipe: Any, steps: int) -> dict[str, Any]:
    """The step arguments of a pipeline call for ``steps`` steps: ``num_inference_steps=steps``, except for an
    exported stepdistill student whose timesteps that call does not reproduce (``stepdistill_export.json`` says
    ``num_inference_steps_reproduces_timesteps: false``, e.g. a one-step student conditioned at t = 399), which is
    called with its own ``timesteps=[...]`` as its model card recommends. Asking such a student for another step
    count than it was trained for is an error."""
    folder = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    info = pipeline_export_info(pipe)
    if not info:
        return {"num_inference_steps": steps}
    timesteps = [int(t) for t in info.get("timesteps") or []]
    if info.get("num_inference_steps_reproduces_timesteps", True) or not timesteps:
        return {"num_inference_steps": steps}
    if steps != len(timesteps):
        raise ValueError(
            f"{folder} is a {len(timesteps)}-step student trained at timesteps {timesteps}, which "
            f"num_inference_steps cannot reproduce; it can only be sampled in {len(timesteps)} step(s), not {steps}"
        )
    return {"timesteps": timesteps}


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
    ``guidance <= 1``) it is applied by SNOOPI's NASA attention (:mod:`stepdistill.pipelines.pipeline_nasa`) instead
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
    """``pipe``'s components in a :class:`~stepdistill.pipelines.pipeline_nasa.NASAStableDiffusionPipeline` (Stable
    Diffusion 1.x/2.x pipelines only); the UNet's attention processors become NASA's (exact SDPA without a negative)."""
    from diffusers import StableDiffusionPipeline

    from stepdistill.pipelines.pipeline_nasa import NASAStableDiffusionPipeline

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
