"""Trajectory Consistency Distillation (TCD; Zheng et al. 2024, arXiv:2402.19159). The official repository
(jabir-zheng/TCD) ships inference only; training follows the paper and rootonchair/consistency_models_distill
(``tcd/train_tcd_distill_sd_wds.py``), a fork of diffusers' LCM script, which this objective extends
(:class:`~stepdistill.objectives.lcm.LCM`): everything is LCM's except where the consistency function ends.

The trajectory consistency function maps x_t to a point s on the same trajectory instead of to 0, with the
first-order exponential-integrator (DDIM) parameterisation

    f(x_t, t, s) = α_s·x̂₀ + σ_s·ε̂,   ε̂ = (x_t − α_t·x̂₀)/σ_t

(the fork's ``get_predicted_original_sample_tcd``: ``σ_s/σ_t·x_t − α_s·(e^{−h} − 1)·x̂₀`` with h = λ_s − λ_t,
λ = ln(α/σ), the same map). Per sample the end point is drawn on the solver grid at or below t_n: a grid position
j ~ U{0 … n} (n: the position of t_{n+k}) and ``s = max(grid[j] − k, 0)``, so s ≤ t_n. The online output is
``c_skip(t_{n+k})·x_{t_{n+k}} + c_out(t_{n+k})·f_θ(x_{t_{n+k}}, t_{n+k}, s)`` and the target
``c_skip(t_n)·x_{t_n} + c_out(t_n)·f_{θ⁻}(x_{t_n}, t_n, s)``: the fork keeps LCM's boundary scalings around f (the
reference text describes TCD without them; the code is followed). Sampling: diffusers' ``TCDScheduler`` with
γ = ``generator.consistency.gamma`` (its ``eta``).
"""

from __future__ import annotations

import torch

from stepdistill.objectives.lcm import LCM


class TCD(LCM):
    name = "tcd"
    DEFAULTS = dict(LCM.DEFAULTS)

    def __init__(self, teacher, generator, config=None) -> None:
        super().__init__(teacher, generator, config)
        if generator.sampler != "tcd":
            raise ValueError("tcd's student samples with TCDScheduler: set generator.consistency.scheduler: tcd")

    def end_timesteps(self, index: torch.Tensor, t_n: torch.Tensor) -> torch.Tensor:
        """s per sample: grid position j ~ U{0 … index} (inclusive), ``s = max(grid[j] − k, 0)``."""
        end_index = (torch.rand(index.shape[0]) * (index + 1).double()).floor().long().clamp(max=index)
        return self.end_timesteps_at(end_index, index.shape[0]).to(t_n.device)

    def end_timesteps_at(self, end_index: torch.Tensor, n: int) -> torch.Tensor:
        grid = self.schedule.consistency_grid(int(self.config["num_ddim_timesteps"]))
        k = self.schedule.num_train_timesteps // int(self.config["num_ddim_timesteps"])
        j = torch.as_tensor(end_index, dtype=torch.long).reshape(-1).expand(n).cpu()
        return (grid[j] - k).clamp(min=0)

    def jump(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, end: torch.Tensor | None) -> torch.Tensor:
        """``α_s·x̂₀ + σ_s·ε̂`` with ε̂ from x_t and x̂₀ at t (the schedule's DDIM step to s)."""
        eps = self.schedule.x0_to_eps(x0, x_t, t.cpu())
        return self.schedule.ddim_step(x0, eps, end.cpu())
