"""Export a consistency student (LCM, LCM-LoRA, TCD: the ``consistency`` kind) as a plain SD / SDXL pipeline folder
that samples with diffusers' own ``LCMScheduler`` or ``TCDScheduler``, built from the teacher's scheduler config
(``LCMScheduler.from_config(pipe.scheduler.config)``, the idiom LCM users know), so any step count works.

The folder holds the teacher's VAE, text encoder(s) and tokenizer(s), the student UNet (LoRA merged into the weights
for a LoRA student, which also gets ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(folder)`` on the
teacher pipeline), the scheduler, a model card and ``stepdistill_export.json``. A full LCM student's UNet has a
guidance embedding (``time_cond_proj_dim``): diffusers' SD / SDXL pipelines then embed ``guidance_scale − 1`` and run
no classifier-free guidance. A TCD student's γ is recorded as the call argument ``eta`` (``stepdistill_pipeline.json``;
the SD pipeline forwards ``eta`` to ``TCDScheduler.step``, whose own default is 0.3 but the pipeline's is 0). A
flow-matching teacher's student is an SD3 / FLUX folder with ``FlowMatchLCMScheduler``
(:func:`~stepdistill.export.flow.export_flow_student`).
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
    base_model_name,
    has_lora,
    save_student_pipeline,
    saved_network,
    teacher_folder,
)
from stepdistill.export.flow import export_flow_student
from stepdistill.export.model_card import consistency_model_card
from stepdistill.models.ema import GeneratorEMA


def export_consistency_student(teacher, generator, out_dir: Path, method: str, steps_info: dict[str, Any],
                               ema_obj: GeneratorEMA | None, dtype: torch.dtype, example_prompt: str) -> Path:
    """The exporter of the ``consistency`` kind (see the module docstring); ``out_dir`` already checked."""
    if teacher.is_flow:  # an SD3 / FLUX folder with FlowMatchLCMScheduler
        return export_flow_student(teacher, generator, out_dir, method, steps_info, ema_obj, dtype, example_prompt)
    pipeline = teacher.pipeline
    scheduler = type(generator.scheduler_template).from_config(generator.scheduler_template.config)
    is_lora = generator.is_lora or has_lora(generator.unet)
    use_ema = ema_obj is not None
    call_kwargs = {"eta": generator.gamma} if generator.sampler == "tcd" else {}
    with staged_folder(out_dir, "the student") as tmp:
        with ema_obj.applied() if use_ema else contextlib.nullcontext(), torch.no_grad():
            student_unet, layers, meta = saved_network(generator, is_lora, dtype)
            save_student_pipeline(tmp, pipeline, "unet", student_unet, scheduler, dtype, layers, meta)
        if call_kwargs:
            write_call_kwargs(tmp, call_kwargs)
        info = {
            "method": method,
            "timesteps": [int(t) for t in generator.timesteps],
            "steps": generator.num_inference_steps,
            "any_step_count": True,
            "base_model": base_model_name(str(getattr(teacher, "source", ""))),
            "family": getattr(teacher, "family", "sd"),
            "prediction_type": teacher.prediction_type,
            "lora": is_lora,
            "lora_file": LORA_WEIGHT_NAME if layers is not None else None,
            "ema": use_ema,
            "guidance_scale": generator.guidance_scale,
            "guidance_embedded": generator.guidance_embedding_dim is not None,
            "num_inference_steps_reproduces_timesteps": True,
            "scheduler": type(scheduler).__name__,
            "gamma": generator.gamma if generator.sampler == "tcd" else None,
            "call_kwargs": call_kwargs,
            "scaled_input_noise": False,
            "trust_remote_code": False,
            "dtype": str(dtype).replace("torch.", ""),
            "steps_info": steps_info,
        }
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        (tmp / "README.md").write_text(consistency_model_card(
            folder=str(out_dir), base_model=info["base_model"], base_path=teacher_folder(teacher), method=method,
            pipeline_class=type(pipeline).__name__, scheduler_class=info["scheduler"],
            steps=generator.num_inference_steps, timesteps=info["timesteps"], guidance_scale=generator.guidance_scale,
            guidance_embedded=info["guidance_embedded"], gamma=info["gamma"], lora_file=layers is not None,
            ema=use_ema, steps_info=steps_info, example_prompt=example_prompt), encoding="utf-8")
    return out_dir
