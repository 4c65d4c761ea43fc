"""Reading exported folders back: load a pipeline folder offline, read its export record, and the call an exported
student is made with (its own steps and guidance; what it cannot do is refused in one line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from stepdistill.core.assets import read_call_kwargs, toy_flow_teacher_path, toy_teacher_path
from stepdistill.export.common import GUIDANCE_DISTILLED_METHODS
from stepdistill.models.teacher import _dtype_kwarg, absent_components


class PipelineLoadError(ValueError):
    """A pipeline folder that does not exist or is not a diffusers pipeline."""


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """``DiffusionPipeline.from_pretrained`` on a local folder, offline; ``"toy"`` names the shipped toy teacher and
    ``"toy-flow"`` the shipped toy flow teacher. Components the folder records as absent (an SD3 pipeline without
    T5) are passed as None, as diffusers requires."""
    from diffusers import DiffusionPipeline

    if str(path) == "toy":
        path = toy_teacher_path()
    elif str(path) == "toy-flow":
        path = toy_flow_teacher_path()
    path = Path(path)
    if not path.exists():
        raise PipelineLoadError(f"pipeline path {path} does not exist: pass a diffusers pipeline folder or 'toy'")
    if not (path / "model_index.json").is_file():
        raise PipelineLoadError(
            f"{path} is not a diffusers pipeline folder: expected {path / 'model_index.json'} "
            "(save one with pipe.save_pretrained(folder))"
        )
    kwargs: dict[str, Any] = {"local_files_only": True, _dtype_kwarg(): dtype}
    if "safety_checker" in (path / "model_index.json").read_text():
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    kwargs.update(absent_components(path))
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
    path = Path(folder) / "stepdistill_export.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PipelineLoadError(f"{path} is not valid JSON ({e}); re-export the student") from e


def pipeline_call_kwargs(pipe: Any) -> dict[str, Any]:
    """The call arguments the folder a loaded pipeline came from records for every call of it
    (``stepdistill_pipeline.json``'s ``call_kwargs``, e.g. the toy flow teacher's ``max_sequence_length``; {} for any
    other pipeline)."""
    folder = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not folder:
        return {}
    try:
        return read_call_kwargs(folder)
    except ValueError as e:
        raise PipelineLoadError(str(e)) from e


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
    it already embeds (every student is called at guidance 1, except a consistency student with a guidance embedding,
    which takes any scale as its embedded w), or another step count than it was trained for (except a
    guidance-distilled student, whose DDIM sampler takes any step count, and a consistency student)."""
    if not info:
        return
    method = info.get("method", "distilled")
    own = float(info.get("guidance_scale", 1.0))
    if guidance > 1.0 and guidance != own and not info.get("guidance_embedded"):
        raise ValueError(f"{folder} is a {method} student that already embeds the teacher's guidance: call it with "
                         f"guidance {own:g} (its default), not {guidance:g} (CFG on top would apply guidance twice)")
    trained = int(info.get("steps") or 0)
    if trained and steps != trained and method not in GUIDANCE_DISTILLED_METHODS and not info.get("any_step_count"):
        timesteps = info.get("timesteps")
        raise ValueError(f"{folder} is a {trained}-step {method} student (timesteps {timesteps}): it samples in "
                         f"exactly {trained} step{'s' if trained != 1 else ''}, not {steps}; leave the step count out "
                         f"or give {trained}")


def step_kwargs(pipe: Any, steps: int) -> dict[str, Any]:
    """The step arguments of a pipeline call for ``steps`` steps, plus the folder's own call arguments
    (:func:`pipeline_call_kwargs`): ``num_inference_steps=steps``, except for an
    exported stepdistill student whose timesteps that call does not reproduce (``stepdistill_export.json`` says
    ``num_inference_steps_reproduces_timesteps: false``, e.g. a one-step student conditioned at t = 399), which is
    called with its own ``timesteps=[...]`` as its model card recommends. Asking such a student for another step
    count than it was trained for is an error."""
    folder = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    info = pipeline_export_info(pipe)
    own = pipeline_call_kwargs(pipe)
    if not info:
        return {"num_inference_steps": steps, **own}
    timesteps = [int(t) for t in info.get("timesteps") or []]
    if info.get("num_inference_steps_reproduces_timesteps", True) or not timesteps:
        return {"num_inference_steps": steps, **own}
    if steps != len(timesteps):
        raise ValueError(
            f"{folder} is a {len(timesteps)}-step student trained at timesteps {timesteps}, which "
            f"num_inference_steps cannot reproduce; it can only be sampled in {len(timesteps)} step(s), not {steps}"
        )
    return {"timesteps": timesteps, **own}
