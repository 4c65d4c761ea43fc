# This file is copied into exported multi-student (MSD) folders (as pipeline_multi_student.py, named in
# model_index.json's _class_name) and loaded there by diffusers' own custom-pipeline mechanism
# (`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`), so it imports nothing but diffusers and torch.
"""A Stable Diffusion pipeline with K one-step students and a deterministic prompt router (MSD, Song et al. 2024,
arXiv:2410.23274), as trained by stepdistill's multi-student recipes.

Every prompt of a batch goes to one student (``unet`` for student 0, ``unet_k`` after): a ``keyword`` router takes
the first of its case-insensitive regular expressions that the prompt matches; a ``kmeans`` router the centroid
nearest to the mean over tokens of the prompt's text-encoder hidden states. The router is stored in
model_index.json (``router``). Each student maps pure noise z at ``student_timestep`` t to
x̂₀ = (z − σ_t·ε̂)/a_t (ε̂ from the scheduler's prediction type; a_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)): one UNet evaluation
per image, mixed batches in one call.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_output import (
    StableDiffusionPipelineOutput,
)
from diffusers.utils.torch_utils import randn_tensor

MAX_STUDENTS = 8


class MultiStudentPipeline(StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with students ``unet, unet_1 … unet_7`` (unused ones are None) and a router."""

    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"] + [
        f"unet_{k}" for k in range(1, MAX_STUDENTS)]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False, unet_1=None, unet_2=None, unet_3=None,
                 unet_4=None, unet_5=None, unet_6=None, unet_7=None, router: dict | None = None,
                 student_timestep: int = 999):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)
        self.register_modules(unet_1=unet_1, unet_2=unet_2, unet_3=unet_3, unet_4=unet_4, unet_5=unet_5,
                              unet_6=unet_6, unet_7=unet_7)
        self.register_to_config(router=dict(router or {}), student_timestep=int(student_timestep))

    @property
    def students(self) -> list[torch.nn.Module]:
        return [self.unet] + [getattr(self, f"unet_{k}") for k in range(1, MAX_STUDENTS)
                              if getattr(self, f"unet_{k}", None) is not None]

    def route(self, prompts: list[str], prompt_embeds: torch.Tensor) -> list[int]:
        """The student index of each prompt (``prompt_embeds``: its text-encoder hidden states, (B, L, D))."""
        spec = self.config.router
        if spec.get("kind") == "keyword":
            out = []
            for p in prompts:
                k = next((i for i, rx in enumerate(spec["patterns"]) if re.search(rx, p, re.IGNORECASE)),
                         spec.get("default"))
                if k is None:
                    raise ValueError(f"no student's pattern matches the prompt {p!r} (patterns {spec['patterns']})")
                out.append(int(k))
            return out
        if spec.get("kind") == "kmeans":
            x = prompt_embeds.double().mean(dim=1)
            centroids = torch.tensor(spec["centroids"], dtype=torch.float64, device=x.device)
            return torch.cdist(x, centroids).argmin(dim=1).tolist()
        raise ValueError(f"unknown router {spec.get('kind')!r} in model_index.json")

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int | None = 1, timesteps: list[int] | None = None,
                 guidance_scale: float = 1.0, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, height: int | None = None,
                 width: int | None = None, **unused: Any):
        t = int(self.config.student_timestep)
        if (num_inference_steps not in (None, 1)) or (timesteps is not None and [int(s) for s in timesteps] != [t]):
            raise ValueError(f"these students are one-step generators at timestep {t}; use num_inference_steps=1")
        if guidance_scale > 1.0:
            raise ValueError("the students embed the teacher's guidance: use guidance_scale=1.0")
        if unused:
            raise TypeError(f"unsupported arguments for {type(self).__name__}: {', '.join(sorted(unused))}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        device = self._execution_device
        embeds, _ = self.encode_prompt(prompts, device, 1, False)
        routes = self.route(prompts, embeds)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        shape = (len(prompts), self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        z = latents.to(device, embeds.dtype) if latents is not None else randn_tensor(
            shape, generator=generator, device=device, dtype=embeds.dtype)
        ac = self.scheduler.alphas_cumprod[t].double()
        a_t, s_t = ac.sqrt(), (1 - ac).sqrt()
        x0 = torch.empty_like(z, dtype=torch.float64)
        students = self.students
        for k in sorted(set(routes)):
            rows = torch.tensor([i for i, r in enumerate(routes) if r == k], device=device)
            net = students[k]
            out = net(z[rows].to(net.dtype), torch.full((len(rows),), t, device=device),
                      encoder_hidden_states=embeds[rows].to(net.dtype)).sample.double()
            x = z[rows].double()
            kind = self.scheduler.config.prediction_type
            eps = a_t * out + s_t * x if kind == "v_prediction" else ((x - a_t * out) / s_t if kind == "sample" else out)
            x0[rows] = (x - s_t * eps) / a_t
        latents = x0.to(embeds.dtype)
        if output_type == "latent":
            images = latents
        else:
            images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
