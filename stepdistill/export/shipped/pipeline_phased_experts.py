# This file is copied into exported Phased DMD student folders (as pipeline_phased_experts.py, named in
# model_index.json's _class_name) and loaded there by diffusers' own custom-pipeline mechanism
# (`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`), so it imports nothing but diffusers and torch.
"""A Stable Diffusion pipeline whose steps run different UNets: one *expert* per SNR phase (Phased DMD, Fan et al.
2025, arXiv:2510.27684), as trained by stepdistill's ``phased_dmd`` objective.

Step k runs expert k (``unet`` for k = 0, ``unet_k`` after) at its timestep t_k (``expert_timesteps``, stored in
model_index.json) on x_{t_k}; the expert's ε̂ gives x̂₀ = (x_t − σ_t·ε̂)/a_t and the deterministic DDIM step
x_{t_{k+1}} = a_{t_{k+1}}·x̂₀ + σ_{t_{k+1}}·ε̂; the last step returns x̂₀. The first input is pure noise z at t₀
(a_t = √ᾱ_t, σ_t = √(1 − ᾱ_t) from the scheduler's ``alphas_cumprod``). Without CFG by default (guidance_scale 1:
one UNet evaluation per step); guidance_scale > 1 applies classifier-free guidance with each expert.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_output import (
    StableDiffusionPipelineOutput,
)
from diffusers.utils.torch_utils import randn_tensor

MAX_EXPERTS = 8


class PhasedExpertsPipeline(StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with experts ``unet, unet_1 … unet_7`` (unused ones are None)."""

    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"] + [
        f"unet_{k}" for k in range(1, MAX_EXPERTS)]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False, unet_1=None, unet_2=None, unet_3=None,
                 unet_4=None, unet_5=None, unet_6=None, unet_7=None, expert_timesteps: list[int] | None = None):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)
        self.register_modules(unet_1=unet_1, unet_2=unet_2, unet_3=unet_3, unet_4=unet_4, unet_5=unet_5,
                              unet_6=unet_6, unet_7=unet_7)
        self.register_to_config(expert_timesteps=list(expert_timesteps or []))

    @property
    def experts(self) -> list[torch.nn.Module]:
        n = len(self.config.expert_timesteps)
        return [self.unet] + [getattr(self, f"unet_{k}") for k in range(1, n)]

    def _coef(self, t: int | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if t is None:
            return torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        ac = self.scheduler.alphas_cumprod[int(t)].double()
        return ac.sqrt(), (1 - ac).sqrt()

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, num_inference_steps: int | None = None,
                 timesteps: list[int] | None = None, guidance_scale: float = 1.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, height: int | None = None,
                 width: int | None = None, **unused: Any):
        steps = [int(t) for t in self.config.expert_timesteps]
        if num_inference_steps is not None and num_inference_steps != len(steps):
            raise ValueError(f"this student has {len(steps)} phase experts and samples in exactly {len(steps)} steps "
                             f"(timesteps {steps}); got num_inference_steps={num_inference_steps}")
        if timesteps is not None and [int(t) for t in timesteps] != steps:
            raise ValueError(f"this student's experts run at timesteps {steps}; got timesteps={list(timesteps)}")
        if unused:
            raise TypeError(f"unsupported arguments for {type(self).__name__}: {', '.join(sorted(unused))}")
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        cond, uncond = self.encode_prompt(prompt, device, num_images_per_prompt, do_cfg, negative_prompt,
                                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        batch = cond.shape[0]
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=cond.dtype)
        x = latents.to(device=device, dtype=cond.dtype)
        embeds = torch.cat([uncond, cond]) if do_cfg else cond
        self.scheduler.timesteps = torch.tensor(steps, dtype=torch.long)
        x0 = x
        for k, (t, expert) in enumerate(self.progress_bar(list(zip(steps, self.experts)))):
            t_batch = torch.full((x.shape[0] * (2 if do_cfg else 1),), t, device=device, dtype=torch.long)
            x_in = torch.cat([x, x]) if do_cfg else x
            eps = expert(x_in.to(expert.dtype), t_batch, encoder_hidden_states=embeds.to(expert.dtype)).sample
            if do_cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            a_t, s_t = self._coef(t, x)
            x64, out64 = x.double(), eps.double()
            kind = self.scheduler.config.prediction_type
            if kind == "v_prediction":
                eps64 = a_t * out64 + s_t * x64
            elif kind == "sample":
                eps64 = (x64 - a_t * out64) / s_t
            else:
                eps64 = out64
            x0 = (x64 - s_t * eps64) / a_t
            t_next = steps[k + 1] if k + 1 < len(steps) else None
            a_n, s_n = self._coef(t_next, x)
            x = (a_n * x0 + s_n * eps64).to(cond.dtype)
        latents = x0.to(cond.dtype)
        if output_type == "latent":
            images = latents
        else:
            images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
