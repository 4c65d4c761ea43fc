"""Conditioning and the guided UNet call, for every network that takes the teacher's prompts (the teacher, the
students, the fake score): :class:`PromptEmbeds` (conditional and unconditional embeddings, SDXL's added
conditions) and :func:`unet_forward` (classifier-free guidance in one batched pass)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


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

    ``cond`` / ``uncond``: (B, L, D) ``encoder_hidden_states``; ``cond_added`` / ``uncond_added`` (SDXL only):
    ``{"text_embeds": (B, P), "time_ids": (B, 6)}``.
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


# --- guided UNet call ------------------------------------------------------------------------------------------------
def network_dtype(module: torch.nn.Module) -> torch.dtype:
    """A diffusers model's ``dtype``, else its first parameter's."""
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(module.parameters()).dtype


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
        raise ValueError("cond and uncond embeddings disagree on added_cond_kwargs (SDXL needs both)")
    return {k: torch.cat([a[k], b[k]], dim=0) for k in a}


def unet_forward(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    embeds: PromptEmbeds,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Raw UNet output (in the schedule's prediction type) with classifier-free guidance
    ``out = out(∅) + w·(out(c) − out(∅))``; ``w == 1`` is a single conditional pass, otherwise uncond and cond run
    as one batched forward (uncond rows first). ``t`` may be an int or a (B,) long tensor. Inputs are cast to the
    UNet's dtype and the output back to ``x_t``'s dtype. Gradients flow to ``x_t`` (wrap in ``torch.no_grad()``
    when they are not needed)."""
    batch = x_t.shape[0]
    device = x_t.device
    dtype = network_dtype(unet)
    embeds = _match_batch(embeds, batch).to(device=device, dtype=dtype)
    t = _timesteps(t, batch, device)
    x = x_t.to(dtype)
    w = float(guidance_scale)
    if w == 1.0:
        out = unet(x, t, **embeds.unet_kwargs("cond"), return_dict=False)[0]
        return out.to(x_t.dtype)
    if embeds.uncond is None:
        raise ValueError(
            f"guidance_scale={w} needs unconditional embeddings; encode the prompts with with_uncond=True "
            "(or use guidance_scale=1.0)"
        )
    kwargs: dict[str, Any] = {"encoder_hidden_states": torch.cat([embeds.uncond, embeds.cond], dim=0)}
    added = _cat_added(embeds.uncond_added, embeds.cond_added)
    if added is not None:
        kwargs["added_cond_kwargs"] = added
    out = unet(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **kwargs, return_dict=False)[0]
    out_uncond, out_cond = out.chunk(2, dim=0)
    return (out_uncond + w * (out_cond - out_uncond)).to(x_t.dtype)
