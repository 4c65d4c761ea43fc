"""What the trainer does around an objective at given updates, as the objective's :class:`UpdatePlan` asks.

- :func:`finalise_experts`: when a Phased DMD phase k starts, experts < k are final; with a generator EMA their
  weights become their EMA weights, so the back-simulation of later phases runs the experts the exported student
  ships (their EMA then stays constant, the raw weights equalling it). Without an EMA there is nothing to do.
"""

from __future__ import annotations

import torch

from stepdistill.models.ema import GeneratorEMA


def finalise_experts(generator, ema: GeneratorEMA | None, count: int) -> None:
    """Copy the EMA weights of experts ``0 … count−1`` of a phase-experts ``generator`` onto their raw weights."""
    if ema is None or count <= 0:
        return
    shadow = {id(p): s for p, s in zip(ema.parameters, ema.shadow_params)}
    with torch.no_grad():
        for k in range(count):
            for p in generator.expert_parameters(k):
                if id(p) in shadow:
                    p.copy_(shadow[id(p)])
