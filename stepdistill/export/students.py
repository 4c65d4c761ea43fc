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
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from stepdistill.core.outputs import check_output_folder, staged_folder
from stepdistill.export.common import (
    EXPORT_INFO_FILE,
    GUIDANCE_DISTILLED_METHODS,
    LORA_WEIGHT_NAME,
    ExportError,
    base_model_name,
    cast_module,
    has_lora,
    merged_unet,
    module_dtype,
    teacher_folder,
)
from stepdistill.export.common import (
    lora_layers as adapter_layers,
)
from stepdistill.export.phased import export_phased_student
from stepdistill.export.shipped import shipped_file
from stepdistill.export.shipped.scheduling_scaled_lcm import ScaledNoiseLCMScheduler
from stepdistill.models.ema import GeneratorEMA, get_ema

logger = logging.getLogger(__name__)

TIMESTEP_SCALING = 10_000.0


# --- scheduler ----------------------------------------------------------------------------------------------------
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


# --- model card ---------------------------------------------------------------------------------------------------
NASA_MODULE = "pipeline_nasa"


def nasa_loading_call(folder: str) -> str:
    """The plain-diffusers call that loads an exported SD student with the NASA pipeline class shipped in it (code in
    the folder, hence ``trust_remote_code=True``)."""
    return (f'DiffusionPipeline.from_pretrained("{folder}", custom_pipeline="{folder}/{NASA_MODULE}.py", '
            'trust_remote_code=True)')


def _card(
    *,
    folder: str,
    base_model: str,
    method: str,
    timesteps: list[int],
    plan: SchedulerPlan,
    lora: bool,
    lora_file: bool,
    ema: bool,
    family: str,
    prediction_type: str,
    steps_info: Mapping[str, Any],
    example_prompt: str,
    scaled_input_noise: bool,
    base_path: str | None = None,
) -> str:
    """The model card. ``base_path``: where the teacher was loaded from on this machine (the LoRA snippet loads
    it); None for a teacher built in memory."""
    import yaml

    n = len(timesteps)
    sched_name = type(plan.scheduler).__name__
    steps_kw = f"num_inference_steps={n}" if plan.default_call_ok else f"timesteps={timesteps}"
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
        "scheduler": sched_name,
        "trust_remote_code": plan.trust_remote_code,
        "lora": lora,
        "ema": ema,
    }
    if steps_info:
        front["training"] = json.loads(json.dumps(dict(steps_info), default=str))
    load_kw = ", trust_remote_code=True" if plan.trust_remote_code else ""
    call = f'image = pipe("{example_prompt}", {steps_kw}, guidance_scale=1.0).images[0]'
    first_input = f"σ_{timesteps[0]}·z (scaled noise)" if scaled_input_noise else "pure noise z"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {method} student of `{base_model}` ({n} step{'s' if n > 1 else ''})",
        "",
        f"A {'one' if n == 1 else f'{n}'}-step text-to-image generator distilled with **{method}** by "
        f"stepdistill from `{base_model}` ({family}, {prediction_type} prediction). "
        + (f"It is a guidance-distilled denoiser: it predicts without classifier-free guidance what the teacher "
           f"predicts with it, and samples with the teacher's noise schedule by {sched_name} in {n} steps at one UNet "
           "pass per step (the teacher needs two), guidance_scale=1.0."
           if method in GUIDANCE_DISTILLED_METHODS else
           f"It samples at timesteps {timesteps}: the UNet maps {first_input} at t={timesteps[0]} to an image latent"
           + (" and, between steps, the prediction is re-noised with fresh noise to the next timestep." if n > 1
              else ".")),
        "",
        "## Usage",
        "",
        "On the CPU:",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{folder}"{load_kw})',
        call,
        'image.save("sample.png")',
        "```",
        "",
        "On a GPU:",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{folder}", torch_dtype=torch.float16{load_kw}).to("cuda")',
        call,
        "```",
        "",
        "- `guidance_scale=1.0`: the student already embeds the teacher's classifier-free guidance. In diffusers' "
        "Stable Diffusion pipelines a `guidance_scale <= 1` disables CFG (one UNet evaluation per step); a larger "
        "value would apply guidance a second time and double the cost.",
    ]
    truncation = (f"The scheduler carries the teacher's noise schedule truncated after t={timesteps[0]} "
                  f"(`num_train_timesteps: {timesteps[0] + 1}`, the teacher's betas up to that timestep, so every "
                  "ᾱ_t the student uses is the teacher's)")
    if sched_name == "EulerDiscreteScheduler":
        lines.append(
            f"- {truncation}: an `EulerDiscreteScheduler` with trailing spacing, so `num_inference_steps=1` runs the "
            f"UNet once at t={timesteps[0]} on σ·z (its initial noise is σ_max·z in its own variance-exploding "
            "space and its model input is divided by √(σ²+1)) and its single Euler step returns the UNet's x0 "
            f"prediction. `timesteps={timesteps}` gives the same call.")
    else:
        what = ("`ScaledNoiseLCMScheduler`, an `LCMScheduler` whose initial noise is scaled by "
                f"σ_{timesteps[0]} = √(1 − ᾱ_{timesteps[0]}) (SiD's input convention); its code ships in "
                "`scheduler/scheduling_scaled_lcm.py`, which is why loading needs `trust_remote_code=True`"
                if plan.trust_remote_code else "an `LCMScheduler`")
        lines.append(
            f"- {truncation}: {what}. "
            + (f"`num_inference_steps={n}` yields exactly the timesteps {timesteps}; `timesteps={timesteps}` gives the "
               "same call." if plan.default_call_ok else
               f"No `num_inference_steps` reproduces {timesteps}: pass `timesteps={timesteps}` (every timestep is on "
               "its schedule, so the call prints no warning).")
            + " Its `timestep_scaling` is set very large so that the boundary condition returns the model's x0 "
            "prediction unchanged (c_skip = 0, c_out = 1).")
    lines += [
        "- Loading and calling the pipeline as above print no warning from diffusers (checked by stepdistill's export "
        "test, in a process that never imports stepdistill). On a machine without torchvision, `import diffusers` "
        "itself makes transformers print two lines saying that `CLIPImageProcessor` and `SiglipImageProcessor` fall "
        "back to their PIL versions: they concern image processors this pipeline does not use; set "
        "`TRANSFORMERS_VERBOSITY=error` before the import to hide them.",
        "- `safety_checker` is not included (`requires_safety_checker: false`).",
    ]
    if family == "sd":
        lines += [
            "",
            "## Negative prompts without CFG (NASA)",
            "",
            f"`{NASA_MODULE}.py` (imports only diffusers and torch) applies SNOOPI's negative-away steer attention: in "
            "every text cross-attention layer the output is softmax(Q·K₊ᵀ/√d)·V₊ − α·softmax(Q·K₋ᵀ/√d)·V₋ "
            "(one UNet evaluation per step; α = 0.1 is the paper's SD1.5 value). diffusers loads it as a custom "
            "pipeline:",
            "",
            "```python",
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = {nasa_loading_call(folder)}',
            f'image = pipe("{example_prompt}", negative_prompt="...", nasa_alpha=0.1, {steps_kw}, '
            'guidance_scale=1.0).images[0]',
            "```",
        ]
    if lora_file:
        lines += [
            "",
            "## As a LoRA on the base model",
            "",
            f"`{LORA_WEIGHT_NAME}` holds the student's LoRA adapter (the full pipeline above has it merged). On the "
            f"base model `{base_model}`"
            + (f" (loaded from `{base_path}` when this student was exported; give your own copy's folder elsewhere):"
               if base_path else " (give your local copy's folder):"),
            "",
            "```python",
            f"from diffusers import DiffusionPipeline, {sched_name}",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{base_path or "<folder of the base model>"}")',
            (f'pipe.scheduler = {sched_name}.from_pretrained("{folder}", subfolder="scheduler")'
             if not plan.trust_remote_code else
             f'pipe.scheduler = DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True).scheduler'),
            f'pipe.load_lora_weights("{folder}")',
            call,
            "```",
        ]
    lines += [
        "",
        "## Provenance",
        "",
        f"- method: `{method}`; timesteps: `{timesteps}`; first input: {first_input}; weights: "
        f"{'EMA' if ema else 'raw (no EMA)'}" + ("; LoRA merged" if lora else "; fully fine-tuned UNet"),
    ]
    for k, v in (steps_info or {}).items():
        lines.append(f"- {k}: `{v}`")
    return "\n".join(lines) + "\n"


GENERIC_EXAMPLE_PROMPT = "a photograph of an astronaut riding a horse"


# --- export -------------------------------------------------------------------------------------------------------
def _ship_custom_scheduler(folder: Path, module: str, class_name: str) -> None:
    """Copy the custom scheduler's source into ``folder/scheduler/<module>.py`` and point model_index.json at it,
    so that diffusers' custom-component loading (``trust_remote_code=True``) finds it without stepdistill."""
    source = shipped_file(module)
    shutil.copyfile(source, folder / "scheduler" / f"{module}.py")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["scheduler"] = [module, class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
    if hasattr(generator, "phase_output"):  # one expert per step: a folder with its own pipeline class
        ema_obj = ema if isinstance(ema, GeneratorEMA) else (get_ema(generator) if ema else None)
        return export_phased_student(teacher, generator, out_dir, method, steps_info, ema_obj,
                                     dtype or module_dtype(teacher.pipeline.unet), example_prompt)
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
    dtype = dtype or module_dtype(pipeline.unet)

    ema_obj = ema if isinstance(ema, GeneratorEMA) else (get_ema(generator) if ema else None)
    use_ema = ema_obj is not None
    unet = generator.unet
    is_lora = bool(getattr(generator, "is_lora", False)) or has_lora(unet)

    scaled = bool(getattr(generator, "scaled_input_noise", False))
    guidance_distilled = hasattr(generator, "rollout")  # TeacherSamplerGenerator: DDIM at guidance 1, N steps
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
            if is_lora:
                student_unet = merged_unet(unet, dtype=dtype)
                lora_layers, lora_meta = adapter_layers(generator, unet)
                lora_layers = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in lora_layers.items()}
            else:
                base = unet.get_base_model() if hasattr(unet, "get_base_model") else unet
                student_unet = cast_module(base, dtype)  # saved below, while the EMA weights are still swapped in
                lora_layers, lora_meta = None, None

            components: dict[str, Any] = {"unet": student_unet, "scheduler": scheduler}
            for name in ("vae", "text_encoder", "text_encoder_2"):
                module = getattr(pipeline, name, None)
                if module is not None:
                    components[name] = cast_module(module, dtype)
            extra: dict[str, Any] = {}
            if "safety_checker" in pipeline.components:
                extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            if "image_encoder" in pipeline.components:
                extra["image_encoder"] = None
            pipe = type(pipeline).from_pipe(pipeline, **components, **extra)
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            if plan.custom_module is not None:
                _ship_custom_scheduler(tmp, plan.custom_module, type(scheduler).__name__)
            if family == "sd":  # negative prompts without CFG (SNOOPI's NASA), loadable as a custom pipeline
                shutil.copyfile(shipped_file(NASA_MODULE), tmp / f"{NASA_MODULE}.py")
            if lora_layers is not None:
                kwargs = {"unet_lora_adapter_metadata": lora_meta} if lora_meta else {}
                type(pipeline).save_lora_weights(
                    str(tmp), unet_lora_layers=lora_layers, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **kwargs
                )

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
            _card(
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
