"""The frozen teacher: loading (diffusers folder, single-file checkpoint or the toy), prompt encoding and guided
denoising, behind one interface for SD1.x/2.x (epsilon or v-prediction), SDXL, and the flow-matching transformers
SD3/SD3.5 and FLUX.1 (flow prediction v = ε − x₀ on a rectified-flow schedule).

Classifier-free guidance (Ho & Salimans 2022), applied to the raw network output of any prediction type:
``out = out(x_t, t, ∅) + w·(out(x_t, t, c) − out(x_t, t, ∅))``. Because the conversions to x̂₀ / ε̂ are affine in
the network output at fixed ``(x_t, t)``, guiding the raw output equals guiding x̂₀ or ε̂.

Nothing here touches the network: every load uses ``local_files_only=True``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Sequence

import torch

from stepdistill.core.assets import TOY_FLOW_TEACHER, TOY_TEACHER, read_call_kwargs
from stepdistill.core.schedule import NoiseSchedule
from stepdistill.models.conditioning import PromptEmbeds, network_dtype, unet_forward

__all__ = [
    "PromptEmbeds",
    "SUPPORTED_PIPELINES",
    "Teacher",
    "TeacherLoadError",
    "TOY_TEACHER_DIR",
    "unet_forward",
]

#: diffusers pipeline class name (as written in model_index.json) -> teacher family.
SUPPORTED_PIPELINES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",  # SD1.x and SD2.x (epsilon or v-prediction)
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",  # SD3 / SD3.5 (flow matching)
    "FluxPipeline": "flux",  # FLUX.1-dev (embedded guidance) and FLUX.1-schnell
}
FAMILY_NAMES = {"sd": "SD1.x/2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "flux": "FLUX.1"}
#: Teacher families whose denoising network is a flow-matching transformer (``pipeline.transformer``).
FLOW_FAMILIES = ("sd3", "flux")
#: FLUX.1-dev's default embedded guidance (``FluxPipeline.__call__``'s ``guidance_scale``).
FLUX_DEFAULT_GUIDANCE = 3.5
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: Where ``Teacher.load("toy")`` looks: ``<repo>/assets/toy-teacher``.
TOY_TEACHER_DIR = TOY_TEACHER
_SUPPORTED_TEXT = ", ".join(f"{k} ({FAMILY_NAMES[v]})" for k, v in SUPPORTED_PIPELINES.items())


class TeacherLoadError(ValueError):
    """A teacher checkpoint is missing or malformed; the message names the path and what was expected."""


# --- loading helpers -------------------------------------------------------------------------------------------------
def _check_safetensors(path: Path) -> None:
    """Raise TeacherLoadError unless ``path`` is a complete safetensors file (header parses, data fits exactly)."""
    expected = "a complete .safetensors checkpoint (8-byte header length, JSON header, tensor data)"
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"the file has only {size} bytes")
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                raise ValueError(f"the header claims {header_len} bytes but the file has only {size}")
            header = json.loads(f.read(header_len).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        data_end = 8 + header_len + (max(ends) if ends else 0)
        if data_end != size:
            raise ValueError(f"the tensors need {data_end} bytes but the file has {size} (truncated or corrupt)")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise TeacherLoadError(
            f"cannot load teacher from {path}: not a valid safetensors file ({e}). Expected {expected}; "
            "re-download or re-export the checkpoint."
        ) from e


def _read_model_index(folder: Path, role: str = "teacher") -> tuple[str, str]:
    """(pipeline class name, family) from ``folder/model_index.json``, or a TeacherLoadError."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise TeacherLoadError(
            f"cannot load {role} from {folder}: the folder has no model_index.json. Expected a diffusers pipeline "
            f"folder (as written by `pipeline.save_pretrained(...)`) of one of: {_SUPPORTED_TEXT}."
        )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        class_name = data["_class_name"]
    except (ValueError, KeyError, TypeError) as e:
        raise TeacherLoadError(
            f"cannot load {role} from {folder}: {index} is not a valid diffusers model_index.json with a "
            f"'_class_name' entry ({type(e).__name__}: {e})."
        ) from e
    family = SUPPORTED_PIPELINES.get(class_name)
    if family is None:
        raise TeacherLoadError(
            f"cannot load {role} from {folder}: model_index.json names pipeline class {class_name!r}, which is not "
            f"a supported teacher. Supported pipeline classes: {_SUPPORTED_TEXT}."
        )
    return class_name, family


def _dtype_kwarg() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns); use whichever this version expects."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _pipeline_kwargs(family: str, dtype: torch.dtype) -> dict[str, Any]:
    kwargs: dict[str, Any] = {_dtype_kwarg(): dtype, "local_files_only": True}
    if family == "sd":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        kwargs.update(add_watermarker=False)
    return kwargs


def absent_components(folder: Path) -> dict[str, None]:
    """``{name: None}`` for every component that ``folder/model_index.json`` records as absent (``[null, null]``),
    e.g. an SD3 pipeline saved without T5: diffusers loads such a folder only when they are passed as None
    (``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``)."""
    data = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return {k: None for k, v in data.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None}


def call_kwargs(folder: Path) -> dict[str, Any]:
    """``call_kwargs`` of ``folder/stepdistill_pipeline.json``: arguments every call of the folder's pipeline takes
    (the toy flow teacher's ``max_sequence_length``); {} when the folder has none."""
    try:
        return read_call_kwargs(folder)
    except ValueError as e:
        raise TeacherLoadError(f"cannot load teacher from {folder}: {e}") from e


def _resolve_source(source: str | Path) -> Path:
    shortcuts = {"toy": (TOY_TEACHER_DIR, "train-teacher"), "toy-flow": (TOY_FLOW_TEACHER, "train-flow-teacher")}
    if isinstance(source, str) and source in shortcuts:
        folder, command = shortcuts[source]
        if not (folder / "model_index.json").is_file():
            raise TeacherLoadError(
                f"cannot load the {source} teacher: {folder} does not exist or has no model_index.json. "
                f"Create it with `stepdistill toy {command}` (it trains and writes that folder), or pass the "
                f"path of a diffusers folder / .safetensors file instead of {source!r}."
            )
        return folder
    path = Path(source).expanduser()
    if not path.exists():
        hint = ""
        if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/", "~")):
            hint = (
                " It looks like a Hub model id: stepdistill never downloads; download it elsewhere and pass the "
                "local folder."
            )
        raise TeacherLoadError(
            f"cannot load teacher from {path}: the path does not exist. Expected a local diffusers pipeline folder "
            f"(with model_index.json), a single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}) or 'toy'.{hint}"
        )
    return path


# --- the teacher -----------------------------------------------------------------------------------------------------
class Teacher:
    """A frozen diffusion teacher (weights ``requires_grad=False``, modules in eval mode).

    Attributes: ``pipeline`` (the diffusers pipeline); ``unet``, the denoising network (the UNet of SD/SDXL, the
    transformer of SD3/FLUX, called through :func:`unet_forward`); ``vae``, ``text_encoder``, ``tokenizer`` (and
    ``text_encoder_2`` / ``tokenizer_2`` for SDXL, SD3 and FLUX, else None); ``schedule`` (its
    :class:`NoiseSchedule`: DDPM, or rectified flow for SD3/FLUX), ``prediction_type``, ``family``
    ("sd" | "sdxl" | "sd3" | "flux"), ``source``, ``latent_shape`` (C, H, W) and ``image_size`` (H, W) at the
    default resolution, and for FLUX ``embedded_guidance`` (FLUX.1-dev's distilled guidance fed to every transformer
    call; None for a transformer without a guidance embedding, such as FLUX.1-schnell).
    """

    def __init__(self, pipeline: Any, source: str = "<in-memory pipeline>", resolution: int | None = None,
                 embedded_guidance: float | None = None) -> None:
        from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

        classes = ((StableDiffusionXLPipeline, "sdxl"), (StableDiffusionPipeline, "sd"),
                   (StableDiffusion3Pipeline, "sd3"), (FluxPipeline, "flux"))
        family = next((name for cls, name in classes if isinstance(pipeline, cls)), None)
        if family is None:
            raise TeacherLoadError(
                f"cannot use {type(pipeline).__name__} from {source} as a teacher; supported pipeline classes: "
                f"{_SUPPORTED_TEXT}."
            )
        network = getattr(pipeline, "transformer" if family in FLOW_FAMILIES else "unet", None)
        if pipeline.text_encoder is None or network is None or pipeline.vae is None:
            raise TeacherLoadError(
                f"cannot use the pipeline from {source} as a teacher: it lacks a text_encoder, "
                f"{'transformer' if family in FLOW_FAMILIES else 'unet'} or vae "
                "(an SDXL refiner-style pipeline is not a text-to-image teacher)."
            )
        self.pipeline = pipeline
        self.family = family
        self.source = str(source)
        self.unet = network
        self.vae = pipeline.vae
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
        self.tokenizer_2 = getattr(pipeline, "tokenizer_2", None)
        self.schedule = NoiseSchedule.from_scheduler(pipeline.scheduler)
        self.prediction_type = self.schedule.prediction_type
        self.embedded_guidance = self._embedded_guidance(embedded_guidance)
        #: Arguments every pipeline call takes (a folder's ``stepdistill_pipeline.json``; set by :meth:`load`): the
        #: SD3 ``max_sequence_length`` (zero T5 tokens) also applies to :meth:`encode_prompt`.
        self.call_kwargs: dict[str, Any] = {}

        scale = int(getattr(pipeline, "vae_scale_factor", 2 ** (len(self.vae.config.block_out_channels) - 1)))
        channels, (h, w) = self._latent_geometry(scale, resolution)
        self.latent_shape: tuple[int, int, int] = (channels, h, w)
        self.image_size: tuple[int, int] = (h * scale, w * scale)

        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        self._freeze()

    def _embedded_guidance(self, value: float | None) -> float | None:
        embeds = self.family == "flux" and bool(self.unet.config.guidance_embeds)
        if value is not None and not embeds:
            raise TeacherLoadError(
                f"embedded_guidance={value} was given, but the {FAMILY_NAMES[self.family]} teacher from {self.source} "
                "has no guidance embedding (only FLUX.1-dev-style transformers with guidance_embeds do)."
            )
        if not embeds:
            return None
        return FLUX_DEFAULT_GUIDANCE if value is None else float(value)

    def _latent_geometry(self, vae_scale: int, resolution: int | None) -> tuple[int, tuple[int, int]]:
        """(latent channels, (H, W)) at the default resolution, or at ``resolution`` pixels (any size for SD3/FLUX,
        which take any multiple of their patch; a UNet teacher only its own)."""
        config = self.unet.config
        if self.family not in FLOW_FAMILIES:
            size = config.sample_size
            h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
            if resolution is not None and (int(resolution), int(resolution)) != (h * vae_scale, w * vae_scale):
                raise TeacherLoadError(
                    f"resolution {resolution} differs from the {FAMILY_NAMES[self.family]} teacher's own "
                    f"{h * vae_scale}x{w * vae_scale} (its UNet's sample_size); only SD3/FLUX teachers take another "
                    "resolution. Remove `resolution` or set it to the teacher's.")
            return int(config.in_channels), (h, w)
        if self.family == "sd3":
            default = int(config.sample_size) * vae_scale
            multiple, channels = vae_scale * int(config.patch_size), int(config.in_channels)
        else:  # FLUX packs 2×2 latent patches; its pipeline's default size is 128 latents (1024 px at 8×)
            default = int(getattr(self.pipeline, "default_sample_size", 128)) * vae_scale
            multiple, channels = vae_scale * 2, int(config.in_channels) // 4
        res = default if resolution is None else int(resolution)
        if res < multiple or res % multiple:
            raise TeacherLoadError(f"resolution {res} is not a positive multiple of {multiple} (the VAE factor times "
                                   f"the patch size) for the {FAMILY_NAMES[self.family]} teacher from {self.source}")
        return channels, (res // vae_scale, res // vae_scale)

    def _freeze(self) -> None:
        for module in self.pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
                module.eval()

    def __repr__(self) -> str:
        return (
            f"Teacher(family={self.family!r}, prediction_type={self.prediction_type!r}, "
            f"latent_shape={self.latent_shape}, source={self.source!r})"
        )

    @property
    def is_flow(self) -> bool:
        """True for the flow-matching teachers (SD3, FLUX)."""
        return self.family in FLOW_FAMILIES

    # --- loading ----------------------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        source: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        config: str | Path | None = None,
        resolution: int | None = None,
        embedded_guidance: float | None = None,
    ) -> "Teacher":
        """Load a frozen teacher from a local diffusers pipeline folder, a single-file checkpoint
        (``.safetensors`` / ``.ckpt``, original SD key layout; needs ``config=`` a local diffusers folder of the same
        architecture, since no original config can be fetched), ``"toy"`` (``assets/toy-teacher``) or ``"toy-flow"``
        (``assets/toy-flow-teacher``, the SD3-style toy flow teacher).
        ``config`` is only used for single files. ``resolution`` (pixels; SD3/FLUX only) and ``embedded_guidance``
        (FLUX.1-dev only, default 3.5) are described on the class. Never touches the network; bad input raises one
        :class:`TeacherLoadError` naming the path."""
        path = _resolve_source(source)
        if path.is_dir():
            class_name, family = _read_model_index(path)
            pipeline = cls._from_pretrained(path, class_name, family, dtype)
        elif path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            pipeline = cls._from_single_file(path, config, dtype)
        else:
            raise TeacherLoadError(
                f"cannot load teacher from {path}: a file with suffix {path.suffix!r}. Expected a diffusers pipeline "
                f"folder (with model_index.json) or a single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})."
            )
        pipeline = pipeline.to(device)
        teacher = cls(pipeline, source=str(path), resolution=resolution, embedded_guidance=embedded_guidance)
        if path.is_dir():
            teacher.call_kwargs = call_kwargs(path)
        return teacher

    @staticmethod
    def _from_pretrained(folder: Path, class_name: str, family: str, dtype: torch.dtype) -> Any:
        import diffusers

        pipeline_cls = getattr(diffusers, class_name)
        try:
            return pipeline_cls.from_pretrained(str(folder), **{**absent_components(folder),
                                                                **_pipeline_kwargs(family, dtype)})
        except Exception as e:  # noqa: BLE001 - re-raised as one clear error naming the path
            raise TeacherLoadError(
                f"cannot load teacher from {folder}: diffusers could not load it as {class_name} "
                f"({type(e).__name__}: {e}). Expected a complete diffusers folder (model_index.json plus the "
                "unet or transformer, vae, text encoder, tokenizer and scheduler subfolders with their weights)."
            ) from e

    @staticmethod
    def _from_single_file(file: Path, config: str | Path | None, dtype: torch.dtype) -> Any:
        import diffusers

        if file.suffix.lower() == ".safetensors":
            _check_safetensors(file)
        if config is None:
            raise TeacherLoadError(
                f"cannot load teacher from {file}: a single-file checkpoint needs the diffusers config of its "
                "architecture, and stepdistill never downloads it. Pass config=<a local diffusers folder of the same "
                "model family> (model_index.json plus the component configs and tokenizers, e.g. the model's "
                "diffusers repository copied locally), e.g. Teacher.load(file, config='path/to/sd15-diffusers')."
            )
        config_dir = Path(config).expanduser()
        if not config_dir.is_dir():
            raise TeacherLoadError(
                f"cannot load teacher from {file}: config={config_dir} is not a folder. Expected a local diffusers "
                "pipeline folder (with model_index.json) describing the checkpoint's architecture."
            )
        class_name, family = _read_model_index(config_dir, role=f"the config for {file}")
        pipeline_cls = getattr(diffusers, class_name)
        try:
            return pipeline_cls.from_single_file(str(file), config=str(config_dir), **_pipeline_kwargs(family, dtype))
        except Exception as e:  # noqa: BLE001 - re-raised as one clear error naming the path
            raise TeacherLoadError(
                f"cannot load teacher from {file}: diffusers could not load it as a single-file {class_name} with "
                f"config {config_dir} ({type(e).__name__}: {e}). Expected an original-layout Stable Diffusion "
                "checkpoint whose architecture matches the config folder."
            ) from e

    # --- device / dtype -----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return network_dtype(self.unet)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Teacher":
        """Move (and optionally cast) the whole pipeline; returns self."""
        self.pipeline.to(device=device, dtype=dtype)
        return self

    # --- prompts ------------------------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompts: Sequence[str] | str,
        negative_prompts: Sequence[str] | str | None = None,
        with_uncond: bool = True,
    ) -> PromptEmbeds:
        """Encode prompts with the pipeline's own ``encode_prompt`` (no gradients).

        The uncond part uses ``negative_prompts``; when None it is the pipeline's empty-prompt conditioning: the
        embedding of "" for SD, SD3 (as ``StableDiffusion3Pipeline`` does) and FLUX (the negative of its true CFG),
        and for SDXL the same unless the pipeline's ``force_zeros_for_empty_prompt`` is set
        (SDXL base), in which case it is zeros, exactly as the pipeline (and :meth:`sample`) uses. SDXL adds
        ``text_embeds`` (pooled, from text_encoder_2) and ``time_ids`` = (original_size, crop (0, 0), target_size)
        at the default resolution. SD3 adds ``pooled_projections`` (both CLIP encoders' pooled outputs); FLUX adds
        ``pooled_projections`` (CLIP's pooled output) and, with a guidance embedding, ``guidance`` =
        :attr:`embedded_guidance` for every row."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompt needs at least one prompt")
        negatives = self._negatives(negative_prompts, len(prompts))
        pipe = self.pipeline
        device = self.device
        with torch.no_grad():
            if self.family == "sd":
                cond, uncond = pipe.encode_prompt(
                    prompts, device, 1, with_uncond, negative_prompt=negatives
                )
                return PromptEmbeds(cond=cond, uncond=uncond if with_uncond else None)
            if self.family == "sd3":
                cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                    prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                    do_classifier_free_guidance=with_uncond, negative_prompt=negatives, **self._sequence_length(),
                )
                embeds = PromptEmbeds(cond=cond, cond_added={"pooled_projections": pooled})
                if with_uncond:
                    embeds.uncond, embeds.uncond_added = uncond, {"pooled_projections": uncond_pooled}
                return embeds
            if self.family == "flux":
                cond, cond_added = self._flux_embeds(prompts)
                embeds = PromptEmbeds(cond=cond, cond_added=cond_added)
                if with_uncond:
                    embeds.uncond, embeds.uncond_added = self._flux_embeds(negatives or [""] * len(prompts))
                return embeds
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                prompt=prompts,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=with_uncond,
                negative_prompt=negatives,
            )
            time_ids = self._time_ids(pooled, cond.dtype).to(device).repeat(len(prompts), 1)
            embeds = PromptEmbeds(cond=cond, cond_added={"text_embeds": pooled, "time_ids": time_ids})
            if with_uncond:
                embeds.uncond = uncond
                embeds.uncond_added = {"text_embeds": uncond_pooled, "time_ids": time_ids.clone()}
            return embeds

    def _sequence_length(self) -> dict[str, Any]:
        """The folder's recorded ``max_sequence_length`` (T5 tokens), which prompt encoding must use as its sampling
        calls do; {} for the pipeline's default."""
        return {k: v for k, v in self.call_kwargs.items() if k == "max_sequence_length"}

    def _flux_embeds(self, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """FLUX's T5 sequence and CLIP pooled output (``FluxPipeline.encode_prompt``) plus the embedded guidance."""
        hidden, pooled, _text_ids = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1, **self._sequence_length())
        added = {"pooled_projections": pooled}
        if self.embedded_guidance is not None:
            added["guidance"] = torch.full((len(prompts),), self.embedded_guidance, device=self.device)
        return hidden, added

    @staticmethod
    def _negatives(negative: Sequence[str] | str | None, n: int) -> list[str] | None:
        if negative is None:
            return None
        negatives = [negative] * n if isinstance(negative, str) else list(negative)
        if len(negatives) != n:
            raise ValueError(f"got {len(negatives)} negative prompts for {n} prompts; pass one per prompt (or one str)")
        return negatives

    def _time_ids(self, pooled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SDXL micro-conditioning (1, 6): original_size + crops_coords_top_left (0, 0) + target_size."""
        size = tuple(self.image_size)
        if self.text_encoder_2 is None:
            projection_dim = int(pooled.shape[-1])
        else:
            projection_dim = int(self.text_encoder_2.config.projection_dim)
        get = getattr(self.pipeline, "_get_add_time_ids", None)
        if get is None:
            return torch.tensor([list(size + (0, 0) + size)], dtype=dtype)
        return get(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection_dim)

    # --- denoising ----------------------------------------------------------------------------------------------------
    def predict(
        self, x_t: torch.Tensor, t: int | torch.Tensor, embeds: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Raw guided teacher output ``out(∅) + w·(out(c) − out(∅))`` in ``self.prediction_type``."""
        return unet_forward(self.unet, x_t, self.schedule.model_timestep(t), embeds, guidance_scale)

    def predict_x0(
        self, x_t: torch.Tensor, t: int | torch.Tensor, embeds: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """x̂₀ of the guided output via ``schedule.to_x0`` (ε: (x_t − σ_t·ε̂)/a_t; v: a_t·x_t − σ_t·v̂)."""
        return self.schedule.to_x0(self.predict(x_t, t, embeds, guidance_scale), x_t, t)

    def predict_eps(
        self, x_t: torch.Tensor, t: int | torch.Tensor, embeds: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """ε̂ of the guided output via ``schedule.to_eps`` (v: a_t·v̂ + σ_t·x_t)."""
        return self.schedule.to_eps(self.predict(x_t, t, embeds, guidance_scale), x_t, t)

    # --- VAE ----------------------------------------------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(mean, std) with ``z_vae = latents·std/scaling_factor + mean``; std = 1 unless the VAE config has
        latents_mean/latents_std (as the SDXL pipeline handles), mean = shift_factor (or 0)."""
        cfg = self.vae.config
        mean_list = getattr(cfg, "latents_mean", None)
        std_list = getattr(cfg, "latents_std", None)
        if mean_list is not None and std_list is not None:
            shape = (1, len(mean_list), 1, 1)
            mean = torch.tensor(mean_list, device=like.device, dtype=like.dtype).view(shape)
            std = torch.tensor(std_list, device=like.device, dtype=like.dtype).view(shape)
            return mean, std
        shift = getattr(cfg, "shift_factor", None)
        return (0.0 if shift is None else float(shift)), 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]: ``vae.decode(latents/scaling_factor + shift_factor)``, clamped.
        Differentiable (wrap in ``torch.no_grad()`` when not needed). A float16 VAE whose config asks for
        ``force_upcast`` (SDXL) decodes in float32, as the pipeline does."""
        vae = self.vae
        mean, std = self._latent_stats(latents)
        z = latents * std / vae.config.scaling_factor + mean
        upcast = network_dtype(vae) == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        if upcast:
            vae.to(torch.float32)
        try:
            vae_dtype = network_dtype(vae)
            image = vae.decode(z.to(device=self.device, dtype=vae_dtype), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        return image.clamp(-1, 1).to(device=latents.device, dtype=latents.dtype)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents ``(posterior_mean − shift_factor)·scaling_factor`` (no sampling)."""
        vae = self.vae
        posterior = vae.encode(images.to(device=self.device, dtype=network_dtype(vae))).latent_dist
        z = posterior.mean.to(images.dtype)
        mean, std = self._latent_stats(z)
        return ((z - mean) * vae.config.scaling_factor / std).to(images.device)

    # --- sampling -----------------------------------------------------------------------------------------------------
    def sample(
        self,
        prompts: Sequence[str] | str,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None = None,
        negative_prompt: Sequence[str] | str | None = None,
    ) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] from the diffusers pipeline itself (its scheduler, one batched call).
        ``guidance_scale <= 1`` disables CFG, as in diffusers. For FLUX, ``guidance_scale`` is the true CFG scale
        (``true_cfg_scale`` against "" or the negative prompts, as :meth:`predict` guides) and the pipeline's
        ``guidance_scale`` gets :attr:`embedded_guidance`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("sample needs at least one prompt")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        negatives = self._negatives(negative_prompt, len(prompts))
        kwargs: dict[str, Any] = dict(prompt=prompts, negative_prompt=negatives,
                                      num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale))
        kwargs.update(self.call_kwargs)
        if self.family == "sd3":
            kwargs.update(height=self.image_size[0], width=self.image_size[1])
        elif self.family == "flux":
            # guidance_scale is true CFG against "" (as in predict); the embedded guidance is the teacher's own.
            kwargs.update(height=self.image_size[0], width=self.image_size[1], true_cfg_scale=float(guidance_scale),
                          guidance_scale=self.embedded_guidance if self.embedded_guidance is not None else 0.0)
            if guidance_scale > 1 and negatives is None:
                kwargs["negative_prompt"] = [""] * len(prompts)
        with torch.no_grad():
            out = self.pipeline(**kwargs, generator=generator, output_type="pt", return_dict=True)
        images = out.images
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(images)
        return (images * 2 - 1).clamp(-1, 1)
