"""Differentiable rewards on generated latents: the diversity reward of Cideron et al., "Diversity-Rewarded CFG
Distillation" (ICLR 2025, arXiv:2410.06084, §3.2)::

    r(x₁, x₂) = 1 − cos(E(x₁), E(x₂))        two generations of one prompt from different noise

E is an image embedding the run provides (:class:`stepdistill.models.image_embedders.CLIPImageEmbedder` for SD
teachers, the toy evaluator's features for the toy: ``stepdistill.toy.embedder``); the objective declares which one
its config names (``diversity_embedder``) and ``distill`` builds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diversity_reward(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """r = 1 − cos(f₁, f₂) per row (features (B, D) → (B,))."""
    return 1.0 - F.cosine_similarity(f1.float(), f2.float(), dim=-1)
