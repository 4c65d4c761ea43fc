"""Export a trained student as a plain diffusers pipeline folder (loadable without stepdistill).

The folder holds the teacher's VAE, text encoder(s) and tokenizer(s), the student UNet (LoRA merged into the weights
for a LoRA student), an ``LCMScheduler`` configured to reproduce the student's sampling, a model card ``README.md``
and ``stepdistill_export.json``; a LoRA student also gets ``pytorch_lora_weights.safetensors`` for
``pipe.load_lora_weights(folder)`` on the teacher pipeline.

Why LCMScheduler: the student maps pure noise at ``t_0`` (e.g. 999) to x₀ and, for several steps, re-noises x₀ to the
next timestep with *fresh* noise (``x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε``). ``LCMScheduler.step`` computes exactly
``denoised = c_out·x̂₀ + c_skip·x_t`` and ``prev = √ᾱ_prev·denoised + √(1−ᾱ_prev)·ε_fresh`` (the last step returns
``denoised``), with ``init_noise_sigma = 1`` and no input scaling. Its boundary-condition scalings use
``timestep_scaling`` (10 by default, giving c_skip≈2.5e-9 at t=999 but 0.0025 at t=1); the export sets it to 1e4 so
that c_skip < 1e-8 and c_out = 1 (to float32 precision) for every t ≥ 1, i.e. the scheduler returns the student's x̂₀.
``original_inference_steps`` is chosen so that ``set_timesteps(len(timesteps))`` yields exactly the student's
timesteps (``[999]`` for one step, ``[999, 749, 499, 249]`` for four, …); when no value does, the model card tells
the user to pass ``timesteps=[...]`` to the pipeline call (LCMScheduler accepts custom timesteps). DDIM/Euler
schedulers do not fit: DDIM re-noises with the predicted ε (deterministic) and Euler integrates an ODE.

Guidance: the student already embeds the teacher's guidance; call the pipeline with ``guidance_scale=1.0`` (in
diffusers' SD/SDXL pipelines ``guidance_scale <= 1`` disables classifier-free guidance: one UNet pass per step).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EXPORT_INFO_FILE = "stepdistill_export.json"
TIMESTEP_SCALING = 10_000.0
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)


class ExportError(RuntimeError):
    """The student cannot be exported faithfully."""


# --- scheduler ----------------------------------------------------------------------------------------------------
def student_scheduler(teacher_scheduler_config: Mapping[str, Any], timesteps: list[int]):
    """An ``LCMScheduler`` with the teacher's noise schedule that reproduces ``timesteps``; returns
    ``(scheduler, reproduces_default_call)`` where the flag says whether ``set_timesteps(len(timesteps))`` alone
    gives the student's timesteps (else pass ``timesteps=`` to the pipeline)."""
    from diffusers import LCMScheduler

    cfg = {k: teacher_scheduler_config[k] for k in _SCHEDULE_KEYS if k in teacher_scheduler_config}
    if cfg.get("trained_betas") is not None:
        cfg["trained_betas"] = list(cfg["trained_betas"])
    n = len(timesteps)
    T = int(cfg.get("num_train_timesteps", 1000))
    # steps_offset is unused by LCMScheduler; 1 keeps the SD pipelines from flagging the config as outdated
    fixed = dict(timestep_scaling=TIMESTEP_SCALING, clip_sample=False, thresholding=False, steps_offset=1)
    probe = LCMScheduler(**cfg, **fixed)
    found = None
    for m in [n] + [m for m in range(n + 1, T + 1) if m != n]:
        try:
            probe.set_timesteps(n, original_inference_steps=m)
        except ValueError:
            continue
        if [int(t) for t in probe.timesteps] == list(timesteps):
            found = m
            break
    scheduler = LCMScheduler(
        **cfg,
        original_inference_steps=found if found is not None else max(50, n),
        **fixed,
    )
    return scheduler, found is not None


# --- UNet ---------------------------------------------------------------------------------------------------------
def _has_lora(unet: torch.nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def merged_unet(unet: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A plain copy of ``unet`` (same class and config) with every LoRA adapter merged into the base weights;
    ``unet`` itself is not modified. Works for diffusers' ``add_adapter`` LoRA and for a peft ``PeftModel``."""
    from accelerate import init_empty_weights
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = unet.get_base_model() if hasattr(unet, "get_base_model") else unet
    work = copy.deepcopy(base)
    for m in work.modules():
        if isinstance(m, BaseTunerLayer) and not m.merged:
            m.merge(safe_merge=True)
    state = {}
    for k, v in work.state_dict().items():
        if ".lora_" in k or k.startswith("lora_"):
            continue
        state[k.replace(".base_layer.", ".")] = v
    del work
    with init_empty_weights():
        plain = type(base).from_config(base.config)
    try:
        plain.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ExportError(f"cannot merge the LoRA student into a plain {type(base).__name__}: {e}") from e
    plain.requires_grad_(False)
    plain.eval()
    return plain.to(dtype=dtype) if dtype is not None and dtype != _module_dtype(plain) else plain


def _lora_layers(generator, unet: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The adapter weights in diffusers' LoRA format plus the LoraConfig (so a non-default alpha survives)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if hasattr(generator, "lora_state_dict"):
        layers = generator.lora_state_dict()
    else:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = None
    peft_config = getattr(unet, "peft_config", None)
    if isinstance(peft_config, Mapping) and peft_config:
        name = "default" if "default" in peft_config else next(iter(peft_config))
        metadata = peft_config[name].to_dict()
        for k, v in list(metadata.items()):
            if isinstance(v, set):
                metadata[k] = sorted(v)
    return layers, metadata


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def _cast(module: Any, dtype: torch.dtype) -> Any:
    """``module`` itself when it already has ``dtype``, else a cast copy (the teacher's modules are never cast)."""
    if not isinstance(module, torch.nn.Module) or _module_dtype(module) == dtype:
        return module
    return copy.deepcopy(module).to(dtype=dtype)


# --- model card ---------------------------------------------------------------------------------------------------
def _card(
    *,
    folder: str,
    base_model: str,
    method: str,
    timesteps: list[int],
    default_call_ok: bool,
    lora: bool,
    lora_file: bool,
    ema: bool,
    family: str,
    prediction_type: str,
    steps_info: Mapping[str, Any],
    example_prompt: str,
) -> str:
    import yaml

    n = len(timesteps)
    steps_kw = f"num_inference_steps={n}" if default_call_ok else f"timesteps={timesteps}"
    tags = ["stepdistill", "text-to-image", "stable-diffusion-xl" if family == "sdxl" else "stable-diffusion",
            "distillation", method, "one-step" if n == 1 else "few-step"]
    if lora:
        tags.append("lora")
    front = {
        "base_model": base_model,
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": tags,
        "method": method,
        "steps": n,
        "timesteps": list(timesteps),
        "guidance_scale": 1.0,
        "scheduler": "LCMScheduler",
        "lora": lora,
        "ema": ema,
    }
    if steps_info:
        front["training"] = json.loads(json.dumps(dict(steps_info), default=str))
    call = f'image = pipe("{example_prompt}", {steps_kw}, guidance_scale=1.0).images[0]'
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {method} student of `{base_model}` ({n} step{'s' if n > 1 else ''})",
        "",
        f"A {'one' if n == 1 else f'{n}'}-step text-to-image generator distilled with **{method}** by "
        f"stepdistill from `{base_model}` ({family}, {prediction_type} prediction). "
        f"It samples at timesteps {timesteps}: the UNet maps pure noise at t={timesteps[0]} to an image latent"
        + (" and, between steps, the prediction is re-noised with fresh noise to the next timestep." if n > 1 else "."),
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{folder}", torch_dtype=torch.float16).to("cuda")',
        call,
        "```",
        "",
        "- `guidance_scale=1.0`: the student already embeds the teacher's classifier-free guidance. In diffusers' "
        "Stable Diffusion pipelines a `guidance_scale <= 1` disables CFG (one UNet evaluation per step); a larger "
        "value would apply guidance a second time and double the cost.",
        "- The scheduler is an `LCMScheduler` with the teacher's noise schedule; "
        + (f"`num_inference_steps={n}` yields exactly the timesteps {timesteps}."
           if default_call_ok else f"pass `timesteps={timesteps}` (no `original_inference_steps` reproduces them).")
        + " Its `timestep_scaling` is set very large so that the boundary condition returns the model's x0 "
        "prediction unchanged (c_skip = 0, c_out = 1).",
        "- `safety_checker` is not included (`requires_safety_checker: false`).",
    ]
    if lora_file:
        lines += [
            "",
            "## As a LoRA on the base model",
            "",
            f"`{LORA_WEIGHT_NAME}` holds the student's LoRA adapter (the full pipeline above has it merged):",
            "",
            "```python",
            "from diffusers import DiffusionPipeline, LCMScheduler",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{base_model}")',
            f'pipe.scheduler = LCMScheduler.from_pretrained("{folder}", subfolder="scheduler")',
            f'pipe.load_lora_weights("{folder}")',
            call,
            "```",
        ]
    lines += [
        "",
        "## Provenance",
        "",
        f"- method: `{method}`; timesteps: `{timesteps}`; weights: {'EMA' if ema else 'raw (no EMA)'}"
        + ("; LoRA merged" if lora else "; fully fine-tuned UNet"),
    ]
    for k, v in (steps_info or {}).items():
        lines.append(f"- {k}: `{v}`")
    return "\n".join(lines) + "\n"


# --- export -------------------------------------------------------------------------------------------------------
def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` onto ``out_dir``, replacing an existing folder only now that the export succeeded."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".old_{out_dir.name}_{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_student(
    teacher,
    generator,
    out_dir: str | Path,
    method: str,
    steps_info: Mapping[str, Any] | None = None,
    ema: Any = True,
    *,
    dtype: torch.dtype | None = None,
    example_prompt: str = "a photograph of an astronaut riding a horse",
) -> Path:
    """Write the student as a diffusers pipeline folder at ``out_dir`` (atomically) and return its path.

    ``method``: the distillation method (model card, tags). ``steps_info``: optional training facts for the model
    card (e.g. the trainer's summary: steps, wall time); when it holds ``"timesteps"`` they must equal the
    generator's. ``ema``: True uses the EMA the trainer attached to the generator when there is one (else the raw
    weights), False the raw weights, or pass a :class:`~stepdistill.training.ema.GeneratorEMA`. ``dtype``: dtype of
    the saved weights (default: the teacher's). The teacher and the generator are not modified.
    """
    from stepdistill.training.ema import GeneratorEMA, get_ema

    out_dir = Path(out_dir).expanduser().resolve()
    steps_info = dict(steps_info or {})
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
    dtype = dtype or _module_dtype(pipeline.unet)

    ema_obj = ema if isinstance(ema, GeneratorEMA) else (get_ema(generator) if ema else None)
    use_ema = ema_obj is not None
    unet = generator.unet
    is_lora = bool(getattr(generator, "is_lora", False)) or _has_lora(unet)

    scheduler, default_call_ok = student_scheduler(pipeline.scheduler.config, timesteps)
    reference = getattr(teacher, "schedule", None)
    if reference is not None:
        ac = scheduler.alphas_cumprod.double()
        if ac.shape != reference.alphas_cumprod.shape or not torch.allclose(ac, reference.alphas_cumprod, atol=1e-6):
            raise ExportError("the exported LCMScheduler's alphas_cumprod differ from the teacher's noise schedule")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp_{out_dir.name}_{uuid.uuid4().hex[:8]}")
    try:
        with ema_obj.applied() if use_ema else contextlib.nullcontext(), torch.no_grad():
            if is_lora:
                student_unet = merged_unet(unet, dtype=dtype)
                lora_layers, lora_meta = _lora_layers(generator, unet)
                lora_layers = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in lora_layers.items()}
            else:
                base = unet.get_base_model() if hasattr(unet, "get_base_model") else unet
                student_unet = _cast(base, dtype)  # saved below, while the EMA weights are still swapped in
                lora_layers, lora_meta = None, None

            components: dict[str, Any] = {"unet": student_unet, "scheduler": scheduler}
            for name in ("vae", "text_encoder", "text_encoder_2"):
                module = getattr(pipeline, name, None)
                if module is not None:
                    components[name] = _cast(module, dtype)
            extra: dict[str, Any] = {}
            if "safety_checker" in pipeline.components:
                extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            if "image_encoder" in pipeline.components:
                extra["image_encoder"] = None
            pipe = type(pipeline).from_pipe(pipeline, **components, **extra)
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            if lora_layers is not None:
                kwargs = {"unet_lora_adapter_metadata": lora_meta} if lora_meta else {}
                type(pipeline).save_lora_weights(
                    str(tmp), unet_lora_layers=lora_layers, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **kwargs
                )

        info = {
            "method": method,
            "timesteps": timesteps,
            "steps": len(timesteps),
            "base_model": str(getattr(teacher, "source", "")),
            "family": family,
            "prediction_type": getattr(teacher, "prediction_type", pipeline.scheduler.config.get("prediction_type")),
            "lora": is_lora,
            "lora_file": LORA_WEIGHT_NAME if lora_layers is not None else None,
            "ema": use_ema,
            "guidance_scale": 1.0,
            "num_inference_steps_reproduces_timesteps": default_call_ok,
            "dtype": str(dtype).replace("torch.", ""),
            "steps_info": steps_info,
        }
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        (tmp / "README.md").write_text(
            _card(
                folder=str(out_dir),
                base_model=str(getattr(teacher, "source", "unknown")),
                method=method,
                timesteps=timesteps,
                default_call_ok=default_call_ok,
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
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
