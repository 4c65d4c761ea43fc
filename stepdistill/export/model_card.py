"""The model card (``README.md``) of an exported student folder: the loading call, the recommended call, what the
student embeds, the NASA custom pipeline for negative prompts, and the training facts."""

from __future__ import annotations

import json
from typing import Any, Mapping

from stepdistill.export.common import (
    GUIDANCE_DISTILLED_METHODS,
    LORA_WEIGHT_NAME,
)
from stepdistill.export.schedulers import SchedulerPlan

NASA_MODULE = "pipeline_nasa"


def nasa_loading_call(folder: str) -> str:
    """The plain-diffusers call that loads an exported SD student with the NASA pipeline class shipped in it (code in
    the folder, hence ``trust_remote_code=True``)."""
    return (f'DiffusionPipeline.from_pretrained("{folder}", custom_pipeline="{folder}/{NASA_MODULE}.py", '
            'trust_remote_code=True)')


def model_card(
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


def flow_model_card(
    folder: str,
    base_model: str,
    method: str,
    pipeline_class: str,
    sigmas: list[float],
    plan: SchedulerPlan,
    lora_file: bool,
    ema: bool,
    family: str,
    guidance_scale: float,
    image_size: tuple[int, int],
    absent: list[str],
    steps_info: Mapping[str, Any],
    example_prompt: str,
    base_path: str | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The model card of a flow-matching student (SD3 / FLUX pipeline folder): the plain diffusers call with the
    student's steps (``num_inference_steps`` or its σ list), guidance and, for FLUX, its resolution."""
    import yaml

    n = len(sigmas)
    sched_name = type(plan.scheduler).__name__
    rounded = [round(s, 6) for s in sigmas]
    steps_kw = f"num_inference_steps={n}" if plan.default_call_ok else f"sigmas={rounded}"
    size_kw = f", height={image_size[0]}, width={image_size[1]}" if family == "flux" else ""
    size_kw += "".join(f", {k}={v!r}" for k, v in sorted((call_kwargs or {}).items()))
    call = f'image = pipe("{example_prompt}", {steps_kw}, guidance_scale={guidance_scale}{size_kw}).images[0]'
    absent_kw = "".join(f", {name}=None" for name in absent)
    front = {
        "base_model": base_model, "library_name": "diffusers", "pipeline_tag": "text-to-image",
        "tags": ["stepdistill", "text-to-image", "flux" if family == "flux" else "stable-diffusion-3", "distillation",
                 method, "one-step" if n == 1 else "few-step"] + (["lora"] if lora_file else []),
        "method": method, "steps": n, "sigmas": rounded, "guidance_scale": guidance_scale, "scheduler": sched_name,
        "lora": lora_file, "ema": ema,
    }
    if steps_info:
        front["training"] = json.loads(json.dumps(dict(steps_info), default=str))
    guided = ("the embedded guidance the student was trained with (FLUX.1-dev's guidance embedding); there is no "
              "classifier-free guidance pass" if family == "flux" else
              "`guidance_scale=1.0` disables classifier-free guidance in the SD3 pipeline (one transformer evaluation "
              "per step): the student already embeds the teacher's guidance")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# {method} student of `{base_model}` ({n} step{'s' if n > 1 else ''})", "",
        f"A {'one' if n == 1 else str(n)}-step text-to-image generator distilled with **{method}** by stepdistill from "
        f"the flow-matching teacher `{base_model}`. It samples at σ = {rounded}: the transformer's velocity v̂ gives "
        "x̂₀ = x − σ·v̂" + (", re-noised with fresh noise to the next σ between steps." if n > 1 else " in one step."),
        "", "## Usage", "", "```python", f"from diffusers import {pipeline_class}", "",
        f'pipe = {pipeline_class}.from_pretrained("{folder}"{absent_kw})', call, 'image.save("sample.png")', "```", "",
        f"- `guidance_scale={guidance_scale}`: {guided}.",
        f"- The scheduler is `{sched_name}` without timestep shift"
        + (f"; `num_inference_steps={n}` gives exactly σ = {rounded} (its `shift_terminal` is the last σ)."
           if plan.default_call_ok and sched_name == "FlowMatchLCMScheduler" else
           (f": pass `sigmas={rounded}` (no `num_inference_steps` reproduces that list)."
            if not plan.default_call_ok else ": the teacher's own, at its default σ list.")),
    ]
    if n > 1:
        lines.append("- The fresh noise between steps comes from torch's global generator (the SD3 and FLUX pipelines "
                     "give the scheduler's step no `generator`): call `torch.manual_seed(...)` first to reproduce a "
                     "sample.")
    if absent:
        lines.append(f"- {', '.join(f'`{a}`' for a in absent)}: absent from the teacher, so passed as None.")
    for k, v in sorted((call_kwargs or {}).items()):
        lines.append(f"- `{k}={v!r}`: the teacher was trained and is called with it (its `stepdistill_pipeline.json`, "
                     "copied here); the student needs it too.")
    if lora_file:
        lines += [
            "", "## As a LoRA on the base model", "",
            f"`{LORA_WEIGHT_NAME}` holds the student's transformer LoRA (the pipeline above has it merged):", "",
            "```python", f"from diffusers import {pipeline_class}, {sched_name}", "",
            f'pipe = {pipeline_class}.from_pretrained("{base_path or "<folder of the base model>"}"{absent_kw})',
            f'pipe.scheduler = {sched_name}.from_pretrained("{folder}", subfolder="scheduler")',
            f'pipe.load_lora_weights("{folder}")', call, "```",
        ]
    lines += ["", "## Provenance", "", f"- method: `{method}`; σ list: `{rounded}`; weights: "
              f"{'EMA' if ema else 'raw (no EMA)'}"]
    for k, v in (steps_info or {}).items():
        lines.append(f"- {k}: `{v}`")
    return "\n".join(lines) + "\n"


def consistency_model_card(
    folder: str,
    base_model: str,
    method: str,
    pipeline_class: str,
    scheduler_class: str,
    steps: int,
    timesteps: list[int],
    guidance_scale: float,
    guidance_embedded: bool,
    gamma: float | None,
    lora_file: bool,
    ema: bool,
    steps_info: Mapping[str, Any],
    example_prompt: str,
    base_path: str | None = None,
) -> str:
    """The model card of a consistency student (LCM, LCM-LoRA, TCD): the plain diffusers call with its own
    ``LCMScheduler`` / ``TCDScheduler`` at any step count, its guidance (embedded, or none) and, for TCD, ``eta``."""
    import yaml

    eta_kw = f", eta={gamma}" if gamma is not None else ""
    call = (f'image = pipe("{example_prompt}", num_inference_steps={steps}, guidance_scale={guidance_scale}{eta_kw}, '
            "generator=torch.Generator().manual_seed(0)).images[0]")
    front = {
        "base_model": base_model, "library_name": "diffusers", "pipeline_tag": "text-to-image",
        "tags": ["stepdistill", "text-to-image", "distillation", "consistency", method, "few-step"]
        + (["lora"] if lora_file else []),
        "method": method, "steps": steps, "guidance_scale": guidance_scale, "scheduler": scheduler_class,
        "lora": lora_file, "ema": ema,
    }
    if gamma is not None:
        front["eta"] = gamma
    if steps_info:
        front["training"] = json.loads(json.dumps(dict(steps_info), default=str))
    guided = (f"`guidance_scale={guidance_scale}`: the UNet embeds w = guidance_scale − 1 (LCM's guidance embedding, "
              "`time_cond_proj_dim`); the pipeline then runs no classifier-free guidance, one UNet pass per step, "
              "and any guidance_scale the student was trained for can be passed"
              if guidance_embedded else
              f"`guidance_scale={guidance_scale}`: no classifier-free guidance (one UNet pass per step); the "
              "student learnt the teacher's guided ODE")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# {method} student of `{base_model}`", "",
        f"A consistency model distilled with **{method}** by stepdistill from `{base_model}`: it samples in any number "
        f"of steps with diffusers' `{scheduler_class}` ({steps} by default: timesteps {timesteps}).", "",
        "## Usage", "", "```python", "import torch", f"from diffusers import {pipeline_class}", "",
        f'pipe = {pipeline_class}.from_pretrained("{folder}")', call, 'image.save("sample.png")', "```", "",
        f"- {guided}.",
        f"- `{scheduler_class}` re-noises with fresh noise between steps, drawn from the call's `generator`.",
    ]
    if gamma is not None:
        lines.append(f"- `eta={gamma}` is TCD's γ (strategic stochastic sampling; 0 is deterministic, 1 re-noises "
                     "like LCM). The pipeline's own default is 0: pass it.")
    if lora_file:
        lines += [
            "", "## As a LoRA on the base model", "",
            f"`{LORA_WEIGHT_NAME}` holds the student's UNet LoRA (the pipeline above has it merged):", "",
            "```python", "import torch", f"from diffusers import {pipeline_class}, {scheduler_class}", "",
            f'pipe = {pipeline_class}.from_pretrained("{base_path or "<folder of the base model>"}")',
            f"pipe.scheduler = {scheduler_class}.from_config(pipe.scheduler.config)",
            f'pipe.load_lora_weights("{folder}")', call, "```",
        ]
    lines += ["", "## Provenance", "", f"- method: `{method}`; weights: {'EMA' if ema else 'raw (no EMA)'}"]
    for k, v in (steps_info or {}).items():
        lines.append(f"- {k}: `{v}`")
    return "\n".join(lines) + "\n"


GENERIC_EXAMPLE_PROMPT = "a photograph of an astronaut riding a horse"
