# This file is copied into exported one-/few-step student folders (as pipeline_nasa.py) and loaded there by diffusers'
# own custom-pipeline mechanism (`DiffusionPipeline.from_pretrained(folder, custom_pipeline=f"{folder}/pipeline_nasa.py")`),
# so it imports nothing but diffusers and torch.
"""NASA — Negative-Away Steer Attention (SNOOPI, Nguyen et al. 2024, arXiv:2412.02687 v3, section 3.2): negative
prompts for one-step students without CFG. No official code was released; written from the paper's equations.

In every *text cross-attention* layer, with the layer's own projections W_q, W_k, W_v (and output projection)::

    Z₊ = softmax(Q·K₊ᵀ/√d)·V₊,   Z₋ = softmax(Q·K₋ᵀ/√d)·V₋,   Z = Z₊ − α·Z₋

where K₊, V₊ come from the prompt's embeddings c₊ and K₋, V₋ from the negative prompt's c₋; Z then goes through the
layer's output projection as usual. α = 0.1 for SD1.5 and 0.2 for SD2.1 in v3 of the paper. Self-attention layers are
untouched. One UNet evaluation per step (the negative branch costs one extra K/V projection and attention per
cross-attention layer, not a second UNet pass).

:class:`NASAAttnProcessor` is installed on every attention layer of a UNet (:func:`apply_nasa`); it reads the negative
embeddings from ``cross_attention_kwargs`` (``nasa_negative``, ``nasa_alpha``), which diffusers' UNet passes to each
processor, and computes plain scaled-dot-product attention where there is no negative or the layer is a
self-attention. :class:`NASAStableDiffusionPipeline` is ``StableDiffusionPipeline`` whose ``negative_prompt`` is applied
through NASA (not CFG) when ``guidance_scale <= 1``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

DEFAULT_ALPHA = 0.1  # SD1.5, paper v3


def nasa_combine(query: torch.Tensor, key_pos: torch.Tensor, value_pos: torch.Tensor, key_neg: torch.Tensor,
                 value_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """Z = softmax(Q·K₊ᵀ/√d)·V₊ − α·softmax(Q·K₋ᵀ/√d)·V₋ on (B, heads, L, d) tensors."""
    z_pos = F.scaled_dot_product_attention(query, key_pos, value_pos)
    if alpha == 0:
        return z_pos
    return z_pos - alpha * F.scaled_dot_product_attention(query, key_neg, value_neg)


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


class NASAAttnProcessor:
    """Scaled-dot-product attention (as diffusers' ``AttnProcessor2_0``) with NASA on text cross-attention layers when
    ``nasa_negative`` (the negative prompt's encoder hidden states, batch like the prompt's) is given."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 nasa_negative: torch.Tensor | None = None, nasa_alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("NASAAttnProcessor does not support attention masks (Stable Diffusion UNets "
                                      "do not use them)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = hidden_states if not is_cross else encoder_hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        def keys_values(ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k, v = _heads(attn.to_k(ctx), batch, attn.heads), _heads(attn.to_v(ctx), batch, attn.heads)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            return k, v

        query = _heads(attn.to_q(hidden_states), batch, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        key, value = keys_values(context)
        if is_cross and nasa_negative is not None and nasa_alpha != 0:
            negative = nasa_negative.to(context)
            if negative.shape[0] != batch:
                raise ValueError(f"nasa_negative has batch {negative.shape[0]}, the prompt embeddings {batch}")
            if attn.norm_cross:
                negative = attn.norm_encoder_hidden_states(negative)
            key_neg, value_neg = keys_values(negative)
            out = nasa_combine(query, key, value, key_neg, value_neg, float(nasa_alpha))
        else:
            out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def apply_nasa(unet: torch.nn.Module) -> torch.nn.Module:
    """Install :class:`NASAAttnProcessor` on every attention layer of ``unet`` (in place; returns it). Without
    ``nasa_negative`` in ``cross_attention_kwargs`` the UNet computes exactly what SDPA attention computes."""
    unet.set_attn_processor(NASAAttnProcessor())
    return unet


class NASAStableDiffusionPipeline(StableDiffusionPipeline):
    """``StableDiffusionPipeline`` for one-/few-step students: with ``guidance_scale <= 1`` a ``negative_prompt`` is
    applied by NASA with strength ``nasa_alpha`` (one UNet evaluation per step); with ``guidance_scale > 1`` it is
    ordinary CFG, as in the parent class."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False) -> None:
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)
        apply_nasa(self.unet)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *args: Any, negative_prompt: str | list[str] | None = None,
                 nasa_alpha: float = DEFAULT_ALPHA, guidance_scale: float = 1.0, num_images_per_prompt: int = 1,
                 negative_prompt_embeds: torch.Tensor | None = None, **kwargs: Any):
        if guidance_scale > 1.0 or (negative_prompt is None and negative_prompt_embeds is None):
            return super().__call__(prompt, *args, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                    num_images_per_prompt=num_images_per_prompt,
                                    negative_prompt_embeds=negative_prompt_embeds, **kwargs)
        if negative_prompt_embeds is None:
            if prompt is None:
                embeds = kwargs.get("prompt_embeds")
                n_prompts = embeds.shape[0] // num_images_per_prompt if embeds is not None else 1
            else:
                n_prompts = 1 if isinstance(prompt, str) else len(prompt)
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * n_prompts
            if len(negative_prompt) != n_prompts:
                raise ValueError(f"got {len(negative_prompt)} negative prompts for {n_prompts} prompts")
            negative_prompt_embeds, _ = self.encode_prompt(negative_prompt, self._execution_device,
                                                           num_images_per_prompt, False)
        cross = dict(kwargs.pop("cross_attention_kwargs", None) or {})
        cross.update(nasa_negative=negative_prompt_embeds, nasa_alpha=float(nasa_alpha))
        return super().__call__(prompt, *args, guidance_scale=guidance_scale,
                                num_images_per_prompt=num_images_per_prompt, cross_attention_kwargs=cross, **kwargs)
