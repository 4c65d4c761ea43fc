"""Export a student of a flow-matching teacher (SD3 / SD3.5, FLUX.1) as a plain ``StableDiffusion3Pipeline`` /
``FluxPipeline`` folder, loadable without stepdistill.

The folder holds the teacher's VAE, text encoders and tokenizers, the student transformer (LoRA merged into the
weights for a LoRA student, which also gets ``pytorch_lora_weights.safetensors`` with ``transformer.``-prefixed keys
for ``pipe.load_lora_weights(folder)`` on the teacher pipeline, as diffusers' ``train_dreambooth_lora_sd3.py`` /
``..._flux.py`` save them), a scheduler under which the pipeline reproduces the student's sampling, a model card and
``stepdistill_export.json``.

Scheduler (:func:`~stepdistill.export.schedulers.flow_student_scheduler`): students that re-noise with fresh noise
between steps (the ``few_step`` kind: DMD2's backward simulation, SiD) get ``FlowMatchLCMScheduler`` (x̂₀ = x − σ·v̂,
x' = (1 − σ')·x̂₀ + σ'·ξ), with no shift and ``shift_terminal`` = the last σ, so that ``num_inference_steps=K``
reproduces a uniform σ list ``linspace(1, σ_K, K)``; any other list is passed as ``sigmas=[...]``. The
guidance-distilled ``teacher_sampler`` kind keeps the teacher's own FlowMatchEulerDiscreteScheduler (its Euler steps
on the pipeline's default list), and the ``consistency`` kind (LCM on a flow teacher) ``FlowMatchLCMScheduler`` of the
teacher's config, at any step count. For FLUX, the σ list does not depend on the resolution any more (dynamic shifting
off), and the student's ``guidance_scale`` is the embedded guidance it was trained with (FLUX.1-dev) or none.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from stepdistill.core.assets import write_call_kwargs
from stepdistill.core.outputs import staged_folder
from stepdistill.export.common import (
    EXPORT_INFO_FILE,
    LORA_WEIGHT_NAME,
    ExportError,
    base_model_name,
    has_lora,
    save_student_pipeline,
    saved_network,
    teacher_folder,
)
from stepdistill.export.model_card import flow_model_card
from stepdistill.export.schedulers import SchedulerPlan, flow_student_scheduler
from stepdistill.models.ema import GeneratorEMA


def student_sigmas(teacher, timesteps: list[int]) -> list[float]:
    """σ of each of the student's table indices (rounded to float32, as the scheduler stores them)."""
    return teacher.schedule.sigmas[timesteps].float().tolist()


def plain_loading_kwargs(teacher) -> dict[str, None]:
    """The components the teacher pipeline lacks (e.g. SD3 without T5): diffusers loads such a folder only when they
    are passed as None, so the model card's call names them."""
    return {name: None for name in ("text_encoder_3", "tokenizer_3")
            if name in teacher.pipeline.components and teacher.pipeline.components[name] is None}


def export_flow_student(teacher, generator, out_dir: Path, method: str, steps_info: dict[str, Any],
                        ema_obj: GeneratorEMA | None, dtype: torch.dtype, example_prompt: str) -> Path:
    """The exporter of the ``few_step``, ``teacher_sampler`` and ``consistency`` kinds on an SD3 / FLUX teacher (see
    the module docstring); ``out_dir`` already checked."""
    timesteps = [int(t) for t in generator.timesteps]
    if "timesteps" in steps_info and [int(t) for t in steps_info["timesteps"]] != timesteps:
        raise ExportError(f"steps_info timesteps {steps_info['timesteps']} differ from the generator's {timesteps}")
    pipeline = teacher.pipeline
    sigmas = student_sigmas(teacher, timesteps)
    if generator.kind == "teacher_sampler":
        plan = SchedulerPlan(type(pipeline.scheduler).from_config(pipeline.scheduler.config), default_call_ok=True)
    elif generator.kind == "consistency":  # FlowMatchLCMScheduler of the teacher's config: any step count
        template = generator.scheduler_template
        plan = SchedulerPlan(type(template).from_config(template.config), default_call_ok=True)
    else:
        if generator.scaled_input_noise and sigmas[0] != 1.0:
            raise ExportError("a flow student with scaled input noise must start at σ = 1 (its input is then z)")
        plan = flow_student_scheduler(pipeline.scheduler, sigmas)
    is_lora = generator.is_lora or has_lora(generator.unet)
    use_ema = ema_obj is not None
    with staged_folder(out_dir, "the student") as tmp:
        with ema_obj.applied() if use_ema else contextlib.nullcontext(), torch.no_grad():
            transformer, layers, meta = saved_network(generator, is_lora, dtype)
            save_student_pipeline(tmp, pipeline, "transformer", transformer, plan.scheduler, dtype, layers, meta)
        info = {
            "method": method,
            "timesteps": timesteps,
            "sigmas": sigmas,
            "steps": len(timesteps),
            "any_step_count": generator.kind in ("consistency", "teacher_sampler"),
            "base_model": base_model_name(str(teacher.source)),
            "family": teacher.family,
            "prediction_type": teacher.prediction_type,
            "lora": is_lora,
            "lora_file": LORA_WEIGHT_NAME if layers is not None else None,
            "ema": use_ema,
            "guidance_scale": teacher.embedded_guidance if teacher.embedded_guidance is not None else 1.0,
            "num_inference_steps_reproduces_timesteps": plan.default_call_ok,
            "scheduler": type(plan.scheduler).__name__,
            "scaled_input_noise": bool(generator.scaled_input_noise),
            "trust_remote_code": False,
            "image_size": list(teacher.image_size),
            "loading_kwargs": sorted(plain_loading_kwargs(teacher)),
            "dtype": str(dtype).replace("torch.", ""),
            "steps_info": steps_info,
        }
        if teacher.call_kwargs:  # e.g. the toy flow teacher's max_sequence_length: the student needs it too
            info["call_kwargs"] = dict(teacher.call_kwargs)
            write_call_kwargs(tmp, info["call_kwargs"])
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        (tmp / "README.md").write_text(flow_model_card(
            folder=str(out_dir), base_model=info["base_model"], base_path=teacher_folder(teacher), method=method,
            pipeline_class=type(pipeline).__name__, sigmas=sigmas, plan=plan, lora_file=layers is not None,
            ema=use_ema, family=teacher.family, guidance_scale=info["guidance_scale"],
            image_size=teacher.image_size, absent=sorted(plain_loading_kwargs(teacher)), steps_info=steps_info,
            example_prompt=example_prompt, call_kwargs=teacher.call_kwargs), encoding="utf-8")
    return out_dir
