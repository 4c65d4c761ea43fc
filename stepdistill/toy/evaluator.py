"""The toy evaluator: a small CNN trained on the toy world that predicts every attribute of an image.

It is the toy world's stand-in for Inception/CLIP: its penultimate features give FID_toy, its discrete heads give
prompt adherence (accuracy of the predicted attributes against the prompt's) and its continuous head (x, y,
radius) gives the coverage of the continuous attributes, where mode collapse shows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from stepdistill.toy.world import CONTINUOUS_ATTRIBUTES, DISCRETE_ATTRIBUTES


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
    )


class ToyEvaluator(ModelMixin, ConfigMixin):
    """Images in [-1, 1], (N, 3, 32, 32) -> features (N, feature_dim), logits per discrete attribute, and the
    continuous attributes (x, y, radius as fractions of the image side)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), feature_dim: int = 128, resolution: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(channels):
            layers.append(_block(cin, c))
            if i < len(channels) - 1:
                layers.append(nn.AvgPool2d(2))
            cin = c
        self.trunk = nn.Sequential(*layers)
        side = resolution // 2 ** (len(channels) - 1)
        self.to_features = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(v)) for name, v in DISCRETE_ATTRIBUTES.items()})
        self.regression = nn.Linear(feature_dim, len(CONTINUOUS_ATTRIBUTES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_features(self.trunk(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        out = {name: head(feats) for name, head in self.heads.items()}
        out["continuous"] = self.regression(feats)
        out["features"] = feats
        return out


def evaluator_loss(outputs: dict[str, torch.Tensor], discrete: dict[str, torch.Tensor], continuous: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropies over the discrete attributes plus 10x the MSE of the continuous ones."""
    loss = sum(F.cross_entropy(outputs[name], discrete[name]) for name in DISCRETE_ATTRIBUTES)
    return loss + 10.0 * F.mse_loss(outputs["continuous"], continuous)
