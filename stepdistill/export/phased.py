"""Export of a Phased DMD student (:class:`~stepdistill.models.generators.PhasedGenerator`) as one diffusers folder.

The folder holds the teacher's VAE, text encoder, tokenizer and scheduler, one UNet per phase expert (``unet`` for
expert 0, ``unet_1`` … after; LoRA experts are merged into full UNets) and ``pipeline_phased_experts.py``, the
pipeline class (:mod:`stepdistill.export.shipped.pipeline_phased_experts`, which imports only diffusers and torch). Its
``model_index.json`` names that file in ``_class_name``, so diffusers' own custom-pipeline mechanism loads it::

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

and the pipeline samples in ``num_inference_steps=K`` steps, expert k at the k-th timestep (DDIM steps between the
phase boundaries, as the generator samples). Stable Diffusion 1.x/2.x teachers only.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from stepdistill.core.outputs import staged_folder
from stepdistill.export.common import (
    EXPORT_INFO_FILE,
    ExportError,
    base_model_name,
    cast_module,
    merged_unet,
    remote_code_loading_call,
)
from stepdistill.export.shipped import shipped_file
from stepdistill.export.shipped.pipeline_phased_experts import (
    MAX_EXPERTS,
    PhasedExpertsPipeline,
)

PIPELINE_MODULE = "pipeline_phased_experts"
PIPELINE_CLASS = "PhasedExpertsPipeline"


def _card(folder: str, base_model: str, method: str, timesteps: list[int], ema: bool, lora: bool,
          steps_info: Mapping[str, Any], example_prompt: str) -> str:
    import yaml

    n = len(timesteps)
    meta = {"library_name": "diffusers", "base_model": base_model, "tags": ["stepdistill", method, "phased-experts",
                                                                             f"{n}-step"],
            "inference": False}
    call = remote_code_loading_call(folder)
    info = "\n".join(f"- {k}: `{v}`" for k, v in sorted(steps_info.items()))
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
        f"# {n}-step {method} student with one expert per SNR phase (stepdistill)\n\n"
        f"Distilled from `{base_model}`. Step k runs its own UNet (expert k: `unet`, `unet_1` … `unet_{n - 1}`) at "
        f"timestep {timesteps} (k-th entry) on x_t, predicts ε̂ and x̂₀ and takes a deterministic DDIM step to the next "
        f"timestep; the last step returns x̂₀. The first input is pure noise z. One UNet evaluation per step "
        f"(guidance_scale 1).\n\n"
        f"The pipeline class ships in this folder (`{PIPELINE_MODULE}.py`, imports only diffusers and torch) and "
        f"diffusers' custom-pipeline mechanism loads it, hence `trust_remote_code=True`:\n\n"
        f"```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
        f"pipe = {call}\n"
        f'image = pipe("{example_prompt}", num_inference_steps={n}, guidance_scale=1.0).images[0]\n```\n\n'
        f"Weights: {'EMA' if ema else 'raw'}{'; LoRA experts merged into full UNets' if lora else ''}.\n\n"
        f"## Training facts\n\n{info or '- (none recorded)'}\n"
    )


def export_phased_student(teacher, generator, out_dir: Path, method: str, steps_info: dict[str, Any], ema_obj: Any,
                          dtype: torch.dtype, example_prompt: str) -> Path:
    """Write the phased student at ``out_dir`` (atomically). Called by :func:`~stepdistill.export.export_student`,
    which resolves the arguments: ``ema_obj`` is the GeneratorEMA whose weights to save (None: the raw weights)."""
    family = getattr(teacher, "family", "sd")
    if family != "sd":
        raise ExportError(f"phase-expert students export for Stable Diffusion 1.x/2.x teachers only, not {family!r}")
    timesteps = [int(t) for t in generator.timesteps]
    if len(timesteps) > MAX_EXPERTS:
        raise ExportError(f"the exported pipeline holds at most {MAX_EXPERTS} experts, the student has {len(timesteps)}")
    pipeline = teacher.pipeline

    with staged_folder(out_dir, "the student") as tmp:
        with ema_obj.applied() if ema_obj is not None else contextlib.nullcontext(), torch.no_grad():
            experts = []
            for k in range(len(timesteps)):
                net = generator.expert(k)
                experts.append(merged_unet(net, dtype=dtype) if generator.is_lora else cast_module(net, dtype))
            extra = {f"unet_{k}": e for k, e in enumerate(experts) if k > 0}
            pipe = PhasedExpertsPipeline(
                vae=cast_module(pipeline.vae, dtype), text_encoder=cast_module(pipeline.text_encoder, dtype),
                tokenizer=pipeline.tokenizer, unet=experts[0], scheduler=pipeline.scheduler,
                expert_timesteps=timesteps, **extra)
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        shutil.copyfile(shipped_file(PIPELINE_MODULE), tmp / f"{PIPELINE_MODULE}.py")
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        base_model = base_model_name(str(getattr(teacher, "source", "")))
        info = {
            "method": method, "timesteps": timesteps, "steps": len(timesteps), "base_model": base_model,
            "family": family, "prediction_type": pipeline.scheduler.config.get("prediction_type"),
            "lora": generator.is_lora, "lora_file": None, "ema": ema_obj is not None, "guidance_scale": 1.0,
            "num_inference_steps_reproduces_timesteps": True, "scheduler": type(pipeline.scheduler).__name__,
            "scaled_input_noise": False, "trust_remote_code": True, "experts": len(timesteps),
            "pipeline_class": f"{PIPELINE_MODULE}.{PIPELINE_CLASS}",
            "loading_call": remote_code_loading_call(str(out_dir)),
            "dtype": str(dtype).replace("torch.", ""), "steps_info": steps_info,
        }
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        (tmp / "README.md").write_text(
            _card(str(out_dir), base_model, method, timesteps, ema_obj is not None, generator.is_lora, steps_info,
                  example_prompt), encoding="utf-8")
    return out_dir
