# This file is copied into exported student folders (scheduler/scheduling_scaled_lcm.py) and loaded there by
# diffusers' custom-component mechanism (`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`), so it
# must import nothing but diffusers and torch.
"""LCMScheduler whose initial noise is scaled by σ_{t₀} = √(1 − ᾱ_{t₀}) at the first timestep t₀.

Few-step students trained with SiD-LSG's Stable Diffusion input convention (mingyuanzhou/SiD-LSG
``training/sid_sd_util.py::sid_sd_sampler``: the first UNet input is ``add_noise(0, z, t_init) = σ_{t_init}·z``) sample
as an LCMScheduler does — the UNet's x̂₀ is re-noised with fresh noise to the next timestep,
``x_{t'} = √ᾱ_{t'}·x̂₀ + √(1 − ᾱ_{t'})·ε`` — except that the pipeline's initial latents ``z·init_noise_sigma`` must be
``σ_{t₀}·z`` instead of ``z``. ``init_noise_sigma`` is that factor, read at the first timestep of the current schedule.
"""

from __future__ import annotations

import torch
from diffusers import LCMScheduler


class ScaledNoiseLCMScheduler(LCMScheduler):
    """``LCMScheduler`` with ``init_noise_sigma = √(1 − ᾱ_{timesteps[0]})`` (see the module docstring)."""

    @property
    def init_noise_sigma(self) -> float:
        timesteps = getattr(self, "timesteps", None)
        if timesteps is None or len(timesteps) == 0 or getattr(self, "num_inference_steps", None) is None:
            t0 = self.config.num_train_timesteps - 1
        else:
            t0 = int(timesteps[0])
        return float(torch.sqrt(1.0 - self.alphas_cumprod[t0].double()))

    @init_noise_sigma.setter
    def init_noise_sigma(self, value: float) -> None:  # LCMScheduler.__init__ assigns 1.0; the property decides
        pass
