"""What every exporter shares: the export record's file name, the error type, LoRA merging and dtype casts, the
model card's ``base_model`` and the teacher's folder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import torch

from stepdistill.core.outputs import STUDENT_MARKER
from stepdistill.models.shared_base import AdapterView

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EXPORT_INFO_FILE = STUDENT_MARKER


#: methods whose student is a guidance-distilled denoiser sampled by DDIM (its card describes it so)
GUIDANCE_DISTILLED_METHODS = ("cfg_distill",)


class ExportError(RuntimeError):
    """The student cannot be exported faithfully."""


# --- UNet ---------------------------------------------------------------------------------------------------------
def student_network(generator) -> torch.nn.Module:
    """The network to export: the generator's own, or for a student that is an adapter on the teacher's shared base
    (:class:`~stepdistill.models.shared_base.AdapterView`) a copy of the base carrying that adapter only."""
    unet = generator.unet
    return unet.standalone() if isinstance(unet, AdapterView) else unet


def saved_network(generator, is_lora: bool, dtype: torch.dtype
                  ) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """What an exporter saves of the student's network, computed within the EMA swap: ``(network, lora layers, lora
    metadata)`` — the network with any LoRA merged in (cast to ``dtype``) and the adapter weights in diffusers' LoRA
    format (None for a fully fine-tuned student)."""
    network = student_network(generator)
    if is_lora:
        layers, meta = lora_layers(generator, network)
        layers = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in layers.items()}
        # a shared-base student's network is already a standalone copy: merge it without copying the base again
        return merged_unet(network, dtype=dtype, in_place=network is not generator.unet), layers, meta
    base = network.get_base_model() if hasattr(network, "get_base_model") else network
    return cast_module(base, dtype), None, None


def save_student_pipeline(folder: Path, pipeline: Any, denoiser: str, network: torch.nn.Module, scheduler: Any,
                          dtype: torch.dtype, lora_layers: dict[str, torch.Tensor] | None = None,
                          lora_meta: dict[str, Any] | None = None) -> None:
    """Save the teacher's ``pipeline`` (SD / SDXL: ``denoiser="unet"``; SD3 / FLUX: ``"transformer"``) with
    ``network`` and ``scheduler`` in place (its VAE and text encoders cast to ``dtype``; safety checker, feature
    extractor and image encoder left out) into ``folder``, and, for a LoRA student,
    ``pytorch_lora_weights.safetensors`` for ``load_lora_weights`` on the teacher pipeline."""
    components: dict[str, Any] = {denoiser: network, "scheduler": scheduler}
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipeline, name, None)
        if module is not None:
            components[name] = cast_module(module, dtype)
    extra: dict[str, Any] = {name: None for name in ("safety_checker", "feature_extractor", "image_encoder")
                             if name in pipeline.components}
    if "safety_checker" in pipeline.components:
        extra["requires_safety_checker"] = False
    pipe = type(pipeline).from_pipe(pipeline, **components, **extra)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    if lora_layers is not None:
        kwargs = {f"{denoiser}_lora_adapter_metadata": lora_meta} if lora_meta else {}
        type(pipeline).save_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME, safe_serialization=True,
                                         **{f"{denoiser}_lora_layers": lora_layers}, **kwargs)


def has_lora(unet: torch.nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def merged_unet(unet: torch.nn.Module, dtype: torch.dtype | None = None, in_place: bool = False) -> torch.nn.Module:
    """A plain copy of ``unet`` (same class and config) with every LoRA adapter merged into the base weights;
    ``unet`` itself is not modified unless ``in_place`` (for a throw-away copy: no second copy of the base is made).
    Works for diffusers' ``add_adapter`` LoRA and for a peft ``PeftModel``."""
    from accelerate import init_empty_weights
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = unet.get_base_model() if hasattr(unet, "get_base_model") else unet
    work = base if in_place else copy.deepcopy(base)
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
    return plain.to(dtype=dtype) if dtype is not None and dtype != module_dtype(plain) else plain


def lora_layers(generator, unet: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The adapter weights in diffusers' LoRA format plus the LoraConfig (so a non-default alpha survives)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if generator.is_lora:
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


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def cast_module(module: Any, dtype: torch.dtype) -> Any:
    """``module`` itself when it already has ``dtype``, else a cast copy (the teacher's modules are never cast)."""
    if not isinstance(module, torch.nn.Module) or module_dtype(module) == dtype:
        return module
    return copy.deepcopy(module).to(dtype=dtype)


def base_model_name(source: str) -> str:
    """The card's ``base_model``: a Hub-style id is kept; a local path becomes its folder name (never an absolute
    path of the machine that exported it)."""
    source = str(source)
    if not source or source == "toy":
        return "toy-teacher" if source == "toy" else "unknown"
    path = Path(source)
    if path.is_absolute() or path.exists() or source.startswith((".", "~")):
        return path.name or source
    return source


def teacher_folder(teacher) -> str | None:
    """The folder the teacher was loaded from, when it is a diffusers folder on this machine (the card's LoRA
    snippet loads it); None otherwise."""
    source = Path(str(getattr(teacher, "source", "")))
    return str(source.resolve()) if source.is_dir() and (source / "model_index.json").is_file() else None


def remote_code_loading_call(folder: str) -> str:
    """The plain-diffusers call that loads an exported folder shipping its own pipeline class."""
    return f'DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True)'
