"""Conditioning and the guided network call, for every network that takes the teacher's prompts (the teacher, the
students, the fake score): :class:`PromptEmbeds` (conditional and unconditional embeddings, SDXL's added
conditions, SD3's and FLUX's pooled projections and FLUX's embedded guidance) and :func:`unet_forward`
(classifier-free guidance in one batched pass, for a UNet, an SD3 transformer or a FLUX transformer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel

from stepdistill.models.shared_base import AdapterView


# --- prompt embeddings ---------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor | None, index: Any) -> torch.Tensor | None:
    return None if t is None else t[index]


def _rows_dict(d: dict[str, torch.Tensor] | None, index: Any) -> dict[str, torch.Tensor] | None:
    return None if d is None else {k: v[index] for k, v in d.items()}


def _move(t: torch.Tensor, device: Any, dtype: torch.dtype | None) -> torch.Tensor:
    # Only floating tensors change dtype (token ids or integer time ids would be corrupted otherwise).
    return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch: the prompts' UNet inputs and, for CFG, those of the negative prompts.

    ``cond`` / ``uncond``: (B, L, D) ``encoder_hidden_states``; ``cond_added`` / ``uncond_added``: SDXL's
    ``{"text_embeds": (B, P), "time_ids": (B, 6)}``, SD3's ``{"pooled_projections": (B, P)}``, FLUX's
    ``{"pooled_projections": (B, P), "guidance": (B,)}`` (the embedded guidance of FLUX.1-dev); None for SD1.x/2.x.
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    cond_added: dict[str, torch.Tensor] | None = None
    uncond_added: dict[str, torch.Tensor] | None = None

    def unet_kwargs(self, which: str = "cond") -> dict[str, Any]:
        """``{"encoder_hidden_states": ..., ["added_cond_kwargs": ...]}`` of ``which`` ("cond" or "uncond")."""
        if which == "cond":
            hidden, added = self.cond, self.cond_added
        elif which == "uncond":
            if self.uncond is None:
                raise ValueError("these PromptEmbeds have no uncond part; encode them with with_uncond=True")
            hidden, added = self.uncond, self.uncond_added
        else:
            raise ValueError(f"which must be 'cond' or 'uncond', got {which!r}")
        kwargs: dict[str, Any] = {"encoder_hidden_states": hidden}
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return kwargs

    def select(self, index: int | slice | Sequence[int] | torch.Tensor) -> "PromptEmbeds":
        """The rows ``index`` (an int keeps the batch dimension, like ``[i:i+1]``), a slice, indices or bool mask."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        elif isinstance(index, (list, tuple)):
            index = torch.as_tensor(index)
        if isinstance(index, torch.Tensor):
            index = index.to(self.cond.device)
        return PromptEmbeds(
            cond=self.cond[index],
            uncond=_rows(self.uncond, index),
            cond_added=_rows_dict(self.cond_added, index),
            uncond_added=_rows_dict(self.uncond_added, index),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PromptEmbeds":
        """Move every tensor to ``device``; floating tensors are also cast to ``dtype``."""
        def move_dict(d: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if d is None else {k: _move(v, device, dtype) for k, v in d.items()}

        return PromptEmbeds(
            cond=_move(self.cond, device, dtype),
            uncond=None if self.uncond is None else _move(self.uncond, device, dtype),
            cond_added=move_dict(self.cond_added),
            uncond_added=move_dict(self.uncond_added),
        )

    def __len__(self) -> int:
        return int(self.cond.shape[0])


# --- the network call of each architecture ------------------------------------------------------------------------
def network_dtype(module: torch.nn.Module) -> torch.dtype:
    """A diffusers model's ``dtype``, else its first parameter's."""
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(module.parameters()).dtype


def _call_unet(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor,
               added: dict[str, torch.Tensor] | None, timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
    kwargs: dict[str, Any] = {"encoder_hidden_states": hidden}
    if added is not None:
        kwargs["added_cond_kwargs"] = added
    if timestep_cond is not None:
        kwargs["timestep_cond"] = timestep_cond
    return net(x, t, **kwargs, return_dict=False)[0]


def _call_sd3(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor,
              added: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """``transformer(hidden_states, timestep=1000σ, encoder_hidden_states, pooled_projections)`` as
    ``StableDiffusion3Pipeline.__call__`` makes it."""
    if added is None or "pooled_projections" not in added:
        raise ValueError("an SD3 transformer needs pooled projections: encode the prompts with the SD3 teacher")
    return net(hidden_states=x, timestep=t, encoder_hidden_states=hidden,
               pooled_projections=added["pooled_projections"], return_dict=False)[0]


def _call_flux(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor,
               added: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """``FluxPipeline.__call__``'s transformer call on (B, C, H, W) latents: packed into 2×2 patches (B, HW/4, 4C) with
    image ids on the half-resolution grid and zero text ids, ``timestep = 1000σ / 1000`` (the transformer multiplies
    timestep and guidance by 1000 itself), the embedded guidance when the transformer has a guidance embedding;
    the output is unpacked back to (B, C, H, W). Packing and ids are diffusers' own (``FluxPipeline._pack_latents``,
    ``_unpack_latents``, ``_prepare_latent_image_ids``)."""
    if added is None or "pooled_projections" not in added:
        raise ValueError("a FLUX transformer needs pooled projections: encode the prompts with the FLUX teacher")
    b, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(hidden.shape[1], 3, device=x.device, dtype=x.dtype)
    guidance = None
    if architecture(net).config.guidance_embeds:
        if "guidance" not in added:
            raise ValueError("this FLUX transformer embeds guidance: the prompt embeddings carry no 'guidance' value")
        guidance = added["guidance"].float()  # float32, as FluxPipeline passes it
    out = net(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=added["pooled_projections"],
              encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    # _unpack_latents takes the pixel size and the VAE factor; (2h, 2w) with factor 2 is the same latent grid.
    return FluxPipeline._unpack_latents(out, 2 * h, 2 * w, 2)


NetworkCall = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, "dict[str, torch.Tensor] | None"],
                       torch.Tensor]
#: Transformer classes whose call differs from the UNet's; every other network is called as a UNet.
TRANSFORMER_CALLS: dict[type, NetworkCall] = {SD3Transformer2DModel: _call_sd3, FluxTransformer2DModel: _call_flux}


def architecture(net: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model that decides how ``net`` is called: ``net`` itself, or the shared base of an
    :class:`~stepdistill.models.shared_base.AdapterView` (which is called in its place, with its adapter active)."""
    return net.base if isinstance(net, AdapterView) else net


def is_transformer(net: torch.nn.Module) -> bool:
    """True for the flow-matching transformers (SD3, FLUX) that :func:`unet_forward` calls in their own way."""
    return isinstance(architecture(net), tuple(TRANSFORMER_CALLS))


def _network_call(net: torch.nn.Module) -> NetworkCall:
    for cls, call in TRANSFORMER_CALLS.items():
        if isinstance(architecture(net), cls):
            return call
    return _call_unet


# --- LCM's guidance embedding -------------------------------------------------------------------------------------
def guidance_scale_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sinusoidal embedding of guidance scales ``w`` (B,) that an LCM student's UNet takes as ``timestep_cond``
    (Luo et al. 2023, "Latent Consistency Models", sec. 4.2; VDM's Fourier features of the scaled scale): with
    ``h = dim // 2`` and frequencies ``f_j = exp(−j·ln(10⁴)/(h − 1))``, ``j = 0 … h−1``,
    ``emb(w) = [sin(1000·w·f_j)]_j ‖ [cos(1000·w·f_j)]_j``, zero-padded by one column when ``dim`` is odd.
    ``w`` is in LCM's form, ``ε̂ᶜ + w·(ε̂ᶜ − ε̂ᵘ)``: diffusers' pipelines embed ``guidance_scale − 1``."""
    if dim < 2:
        raise ValueError(f"the guidance embedding needs at least 2 dimensions, got {dim}")
    w = torch.as_tensor(w).reshape(-1).to(torch.float32) * 1000.0
    half = dim // 2
    freqs = torch.exp(-torch.arange(half, dtype=torch.float32) * (torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = w[:, None] * freqs.to(w.device)[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


# --- guided call -------------------------------------------------------------------------------------------------------
def _timesteps(t: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """t as a (B,) tensor on ``device`` (ints become long)."""
    t = torch.as_tensor(t, device=device)
    if not t.is_floating_point():
        t = t.long()
    if t.ndim == 0:
        return t.expand(batch)
    t = t.reshape(-1)
    if t.shape[0] == 1:
        return t.expand(batch)
    if t.shape[0] != batch:
        raise ValueError(f"t has {t.shape[0]} timesteps but x_t has batch size {batch}; pass an int or a (B,) tensor")
    return t


def _match_batch(embeds: PromptEmbeds, batch: int) -> PromptEmbeds:
    n = len(embeds)
    if n == batch:
        return embeds
    if n == 1:
        return embeds.select(torch.zeros(batch, dtype=torch.long))
    raise ValueError(f"PromptEmbeds hold {n} prompts but x_t has batch size {batch}; they must match (or be 1)")


def _cat_added(
    a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor] | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("cond and uncond embeddings disagree on their added conditions (SDXL, SD3 and FLUX need both)")
    return {k: torch.cat([a[k], b[k]], dim=0) for k in a}


def unet_forward(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    embeds: PromptEmbeds,
    guidance_scale: float = 1.0,
    timestep_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw network output (in the schedule's prediction type) with classifier-free guidance
    ``out = out(∅) + w·(out(c) − out(∅))``; ``w == 1`` is a single conditional pass, otherwise uncond and cond run
    as one batched forward (uncond rows first). ``t`` is the value the network is called with,
    ``schedule.model_timestep(index)``: the index itself for a UNet (an int or a (B,) long tensor), ``1000·σ`` (float)
    for an SD3 or FLUX transformer. Inputs are cast to the network's dtype and the output back to ``x_t``'s dtype.
    ``timestep_cond``: (B, D) rows added to a UNet's timestep embedding through its ``cond_proj``
    (``time_cond_proj_dim``; LCM's guidance embedding, :func:`guidance_scale_embedding`); only with ``w == 1``.
    Gradients flow to ``x_t`` (wrap in ``torch.no_grad()`` when they are not needed)."""
    batch = x_t.shape[0]
    device = x_t.device
    dtype = network_dtype(unet)
    call = _network_call(unet)
    embeds = _match_batch(embeds, batch).to(device=device, dtype=dtype)
    t = _timesteps(t, batch, device)
    if call is not _call_unet and not t.is_floating_point():
        raise ValueError(f"{type(unet).__name__} is called with the schedule's model timestep 1000·σ (a float), "
                         "not a table index: pass schedule.model_timestep(t)")
    x = x_t.to(dtype)
    w = float(guidance_scale)
    if timestep_cond is not None:
        if call is not _call_unet or w != 1.0:
            raise ValueError("timestep_cond (a guidance embedding) is a UNet input and replaces classifier-free "
                             "guidance: call a UNet with guidance_scale=1")
        if timestep_cond.shape[0] != batch:
            raise ValueError(f"timestep_cond has {timestep_cond.shape[0]} rows but x_t has batch size {batch}")
        return _call_unet(unet, x, t, embeds.cond, embeds.cond_added,
                          timestep_cond.to(device=device, dtype=dtype)).to(x_t.dtype)
    if w == 1.0:
        return call(unet, x, t, embeds.cond, embeds.cond_added).to(x_t.dtype)
    if embeds.uncond is None:
        raise ValueError(
            f"guidance_scale={w} needs unconditional embeddings; encode the prompts with with_uncond=True "
            "(or use guidance_scale=1.0)"
        )
    hidden = torch.cat([embeds.uncond, embeds.cond], dim=0)
    added = _cat_added(embeds.uncond_added, embeds.cond_added)
    out = call(unet, torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), hidden, added)
    out_uncond, out_cond = out.chunk(2, dim=0)
    return (out_uncond + w * (out_cond - out_uncond)).to(x_t.dtype)
