"""The toy evaluator's features as a differentiable image embedding (the diversity reward's E on the toy world):
the very features the toy diversity metric uses, so a toy diversity gain is partly by construction — read it next
to FID_toy and adherence."""

from __future__ import annotations

from pathlib import Path

import torch

from stepdistill.core.assets import toy_evaluator_path
from stepdistill.toy.evaluator import ToyEvaluator


class ToyEmbedder(torch.nn.Module):
    """E(x) = the toy evaluator's features of the decoded latent (images in [-1, 1], 32×32)."""

    def __init__(self, teacher, evaluator_path: str | Path | None = None) -> None:
        super().__init__()
        if evaluator_path is None:
            evaluator_path = toy_evaluator_path()
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained, never checkpointed
        self.model = ToyEvaluator.from_pretrained(str(evaluator_path), local_files_only=True).eval().requires_grad_(False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.teacher.decode(latents)
        return self.model.features(images.to(next(self.model.parameters()).dtype))
