"""Differentiable rewards on generated latents: the diversity reward of Cideron et al., "Diversity-Rewarded CFG
Distillation" (ICLR 2025, arXiv:2410.06084, §3.2)::

    r(x₁, x₂) = 1 − cos(E(x₁), E(x₂))        two generations of one prompt from different noise

E is an image embedding: the toy evaluator's features (``"toy"``; the very features the toy diversity metric uses, so a
toy diversity gain is partly by construction — read it next to FID_toy and adherence), or CLIP image features through
transformers' ``CLIPVisionModelWithProjection`` from a *local* folder (SD teachers). Embedders take the teacher's
scaled latents and decode them with the teacher's VAE, all differentiable; their weights are frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def diversity_reward(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """r = 1 − cos(f₁, f₂) per row (features (B, D) → (B,))."""
    return 1.0 - F.cosine_similarity(f1.float(), f2.float(), dim=-1)


class ToyEmbedder(torch.nn.Module):
    """E(x) = the toy evaluator's features of the decoded latent (images in [-1, 1], 32×32)."""

    def __init__(self, teacher, evaluator_path: str | Path | None = None) -> None:
        super().__init__()
        from stepdistill.toy.evaluator import ToyEvaluator

        if evaluator_path is None:
            from stepdistill.toy.assets import toy_evaluator_path

            evaluator_path = toy_evaluator_path()
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained, never checkpointed
        self.model = ToyEvaluator.from_pretrained(str(evaluator_path), local_files_only=True).eval().requires_grad_(False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.teacher.decode(latents)
        return self.model.features(images.to(next(self.model.parameters()).dtype))


class CLIPImageEmbedder(torch.nn.Module):
    """E(x) = CLIP's projected image embedding of the decoded latent, resized to the model's input side and normalised
    with its processor's mean/std (differentiable resize instead of the PIL processor)."""

    def __init__(self, teacher, path: str | Path) -> None:
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"diversity_embedder: {folder / 'config.json'} not found; give a local folder of a "
                                    "CLIP model (e.g. openai/clip-vit-large-patch14 saved with save_pretrained)")
        object.__setattr__(self, "teacher", teacher)
        self.model = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
        self.model.eval().requires_grad_(False)
        prep = folder / "preprocessor_config.json"
        mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # CLIP's defaults
        if prep.is_file():
            import json

            cfg = json.loads(prep.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.side = int(self.model.config.image_size)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        images = (self.teacher.decode(latents).float() + 1) / 2
        images = F.interpolate(images, size=(self.side, self.side), mode="bicubic", align_corners=False)
        pixels = ((images - self.mean.to(images)) / self.std.to(images)).to(self.model.dtype)
        return self.model(pixel_values=pixels).image_embeds


def load_embedder(spec: str, teacher) -> torch.nn.Module:
    """``"toy"`` → :class:`ToyEmbedder`; otherwise a local CLIP folder → :class:`CLIPImageEmbedder`."""
    embedder = ToyEmbedder(teacher) if spec == "toy" else CLIPImageEmbedder(teacher, spec)
    return embedder.to(teacher.device)
