"""Differentiable image embeddings of generated latents, frozen: CLIP's projected image embedding from a local
folder. They take the teacher's scaled latents and decode them with the teacher's VAE."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F


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
