"""Export a trained student as a plain diffusers pipeline folder (loadable without stepdistill).

The folder holds the teacher's VAE, text encoder(s) and tokenizer(s), the student UNet (LoRA merged into the weights
for a LoRA student), a scheduler under which the pipeline reproduces the student's sampling exactly, a model card
``README.md`` and ``stepdistill_export.json``; a LoRA student also gets ``pytorch_lora_weights.safetensors`` for
``pipe.load_lora_weights(folder)`` on the teacher pipeline.

The natural call works: ``pipe(prompt, num_inference_steps=<the student's steps>, guidance_scale=1.0)`` samples at the
student's own timesteps, because the exported scheduler carries the teacher's noise schedule *truncated after the
student's first timestep t₀* (``num_train_timesteps = t₀ + 1``; the betas up to t₀ are the teacher's, so ᾱ_t is
unchanged where the student uses it). A one-step student at t₀ = 399 is then simply the last timestep of that
schedule. (Setting ``steps_offset`` instead cannot work: StableDiffusionPipeline resets any ``steps_offset`` ≠ 1 at
load.) ``timesteps=[...]`` keeps working. See :func:`student_scheduler` for the scheduler chosen per student:

- ``LCMScheduler`` for students whose first input is pure noise: ``LCMScheduler.step`` computes
  ``denoised = c_out·x̂₀ + c_skip·x_t`` and ``prev = √ᾱ_prev·denoised + √(1−ᾱ_prev)·ε_fresh`` (the last step returns
  ``denoised``), with ``init_noise_sigma = 1`` and no input scaling — the students' re-noising with fresh noise. Its
  boundary-condition scalings use ``timestep_scaling`` (10 by default, giving c_skip≈2.5e-9 at t=999 but 0.0025 at
  t=1); the export sets it to 1e4 so that c_skip < 1e-8 and c_out = 1 for every t ≥ 1;
- ``EulerDiscreteScheduler`` (trailing) for one-step students whose input is σ_{t₀}·z (SiD-LSG);
- ``ScaledNoiseLCMScheduler`` (``scheduling_scaled_lcm.py``, shipped in the folder; ``trust_remote_code=True``) for
  few-step students whose first input is σ_{t₀}·z.

Guidance: the student already embeds the teacher's guidance; call the pipeline with ``guidance_scale=1.0`` (in
diffusers' SD/SDXL pipelines ``guidance_scale <= 1`` disables classifier-free guidance: one UNet pass per step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from stepdistill.core.outputs import check_output_folder, staged_folder
from stepdistill.export.common import (
    EXPORT_INFO_FILE,
    LORA_WEIGHT_NAME,
    ExportError,
    base_model_name,
    has_lora,
    save_student_pipeline,
    saved_network,
    module_dtype,
    teacher_folder,
)
from stepdistill.export.model_card import (
    GENERIC_EXAMPLE_PROMPT,
    NASA_MODULE,
    model_card,
)
from stepdistill.export.consistency import export_consistency_student
from stepdistill.export.flow import export_flow_student
from stepdistill.export.phased import export_phased_student
from stepdistill.export.schedulers import (
    SchedulerPlan,
    ship_custom_scheduler,
    student_scheduler,
)
from stepdistill.export.shipped import shipped_file
from stepdistill.models.ema import GeneratorEMA, get_ema

logger = logging.getLogger(__name__)


# --- export -------------------------------------------------------------------------------------------------------


def export_student(
    teacher,
    generator,
    out_dir: str | Path,
    method: str,
    steps_info: Mapping[str, Any] | None = None,
    ema: Any = True,
    *,
    dtype: torch.dtype | None = None,
    example_prompt: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the student as a diffusers pipeline folder at ``out_dir`` (atomically) and return its path.
    ``out_dir`` may be absent, empty or an earlier student folder; anything else is refused unless ``overwrite``
    (:func:`stepdistill.core.outputs.check_output_folder`).

    ``method``: the distillation method (model card, tags). ``steps_info``: optional training facts for the model
    card (e.g. the trainer's summary: steps, wall time); when it holds ``"timesteps"`` they must equal the
    generator's. ``ema``: True uses the EMA the trainer attached to the generator when there is one (else the raw
    weights), False the raw weights, or pass a :class:`~stepdistill.models.ema.GeneratorEMA`. ``dtype``: dtype of
    the saved weights (default: the teacher's). The teacher and the generator are not modified.
    """
    out_dir = check_output_folder(out_dir, overwrite=overwrite)
    steps_info = dict(steps_info or {})
    if example_prompt is None:
        example_prompt = GENERIC_EXAMPLE_PROMPT
    if generator.kind not in EXPORTERS:
        raise ExportError(f"no exporter for the student kind {generator.kind!r} ({type(generator).__name__}); "
                          f"exporters exist for: {', '.join(EXPORTERS)}")
    ema_obj = ema if isinstance(ema, GeneratorEMA) else (get_ema(generator) if ema else None)
    return EXPORTERS[generator.kind](teacher, generator, out_dir, method, steps_info, ema_obj,
                                     dtype or module_dtype(teacher.unet), example_prompt)


def export_pipeline_student(teacher, generator, out_dir: Path, method: str, steps_info: dict[str, Any],
                            ema_obj: GeneratorEMA | None, dtype: torch.dtype, example_prompt: str) -> Path:
    """The exporter of the ``few_step`` and ``teacher_sampler`` kinds: a standard SD / SDXL pipeline folder whose
    scheduler reproduces the student's sampling (see the module docstring), or for an SD3 / FLUX teacher the
    flow pipeline folder of :func:`stepdistill.export.flow.export_flow_student`; ``out_dir`` already checked."""
    if teacher.is_flow:
        return export_flow_student(teacher, generator, out_dir, method, steps_info, ema_obj, dtype, example_prompt)
    timesteps = [int(t) for t in generator.timesteps]
    if "timesteps" in steps_info and [int(t) for t in steps_info["timesteps"]] != timesteps:
        raise ExportError(f"steps_info timesteps {steps_info['timesteps']} differ from the generator's {timesteps}")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])) or not timesteps:
        raise ExportError(f"the generator's timesteps must be non-empty and strictly decreasing, got {timesteps}")
    if timesteps[-1] == 0:
        logger.warning("timestep 0 in %s: LCMScheduler returns its input unchanged at t=0 (c_skip=1), so the "
                       "exported pipeline's last step differs from the student's x0 prediction", timesteps)
    family = getattr(teacher, "family", "sd")
    pipeline = teacher.pipeline

    use_ema = ema_obj is not None
    is_lora = generator.is_lora or has_lora(generator.unet)

    scaled = generator.scaled_input_noise
    guidance_distilled = generator.kind == "teacher_sampler"  # DDIM at guidance 1, N steps
    if guidance_distilled:
        plan = SchedulerPlan(generator._fresh_scheduler(), default_call_ok=True)
    else:
        plan = student_scheduler(pipeline.scheduler, timesteps, scaled_input_noise=scaled)
    scheduler = plan.scheduler
    reference = getattr(teacher, "schedule", None)
    if reference is not None:
        ac = scheduler.alphas_cumprod.double()
        ref = reference.alphas_cumprod[: ac.shape[0]]
        if ac.shape != ref.shape or not torch.allclose(ac, ref, atol=1e-6):
            raise ExportError(f"the exported {type(scheduler).__name__}'s alphas_cumprod differ from the teacher's "
                              "noise schedule")

    with staged_folder(out_dir, "the student") as tmp:
        with ema_obj.applied() if use_ema else contextlib.nullcontext(), torch.no_grad():
            # saved below, while the EMA weights are still swapped in (a shared-base student is copied here)
            student_unet, lora_layers, lora_meta = saved_network(generator, is_lora, dtype)

            save_student_pipeline(tmp, pipeline, "unet", student_unet, scheduler, dtype, lora_layers, lora_meta)
            if plan.custom_module is not None:
                ship_custom_scheduler(tmp, plan.custom_module, type(scheduler).__name__)
            if family == "sd":  # negative prompts without CFG (SNOOPI's NASA), loadable as a custom pipeline
                shutil.copyfile(shipped_file(NASA_MODULE), tmp / f"{NASA_MODULE}.py")

        info = {
            "method": method,
            "timesteps": timesteps,
            "steps": len(timesteps),
            "base_model": base_model_name(str(getattr(teacher, "source", ""))),
            "family": family,
            "prediction_type": getattr(teacher, "prediction_type", pipeline.scheduler.config.get("prediction_type")),
            "lora": is_lora,
            "lora_file": LORA_WEIGHT_NAME if lora_layers is not None else None,
            "ema": use_ema,
            "guidance_scale": 1.0,
            "num_inference_steps_reproduces_timesteps": plan.default_call_ok,
            "scheduler": type(scheduler).__name__,
            "scaled_input_noise": scaled,
            "trust_remote_code": plan.trust_remote_code,
            "dtype": str(dtype).replace("torch.", ""),
            "nasa_pipeline": f"{NASA_MODULE}.py" if family == "sd" else None,
            "steps_info": steps_info,
        }
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        (tmp / "README.md").write_text(
            model_card(
                folder=str(out_dir),
                base_model=base_model_name(str(getattr(teacher, "source", ""))),
                base_path=teacher_folder(teacher),
                method=method,
                timesteps=timesteps,
                plan=plan,
                scaled_input_noise=scaled,
                lora=is_lora,
                lora_file=lora_layers is not None,
                ema=use_ema,
                family=family,
                prediction_type=str(info["prediction_type"]),
                steps_info=steps_info,
                example_prompt=example_prompt,
            ),
            encoding="utf-8",
        )
    return out_dir


#: the exporter of each student kind (``Generator.kind``); the routed multi-student folder is written from finished
#: student folders by :func:`stepdistill.export.multi_student.export_multi_student`
EXPORTERS = {"few_step": export_pipeline_student, "teacher_sampler": export_pipeline_student,
             "phase_experts": export_phased_student, "consistency": export_consistency_student}
