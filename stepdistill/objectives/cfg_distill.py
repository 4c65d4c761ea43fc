"""CFG distillation: a student *without* classifier-free guidance learns the teacher's *guided* prediction, so sampling
needs one UNet pass per step instead of two (Cideron et al., "Diversity-Rewarded CFG Distillation", ICLR 2025,
arXiv:2410.06084, §3.1; no code released. LoRA-Enhanced Distillation, Golnari 2023, arXiv:2312.06899, is the same loss
with a LoRA student that shares the teacher's frozen base: ``generator.share_teacher_base``).

Generator update (``generator_loss``), on states x_t at the student's sampling timesteps t ∈ {t_0 > … > t_{N−1}} (the
N-step DDIM schedule of :class:`~stepdistill.models.generators.TeacherSamplerGenerator`)::

    L(θ) = E ‖ out_θ(x_t, t, c) − sg( out(x_t, t, ∅) + w·(out(x_t, t, c) − out(x_t, t, ∅)) ) ‖²

(raw model outputs, ε or v, mean over elements; the teacher's combination is ``unet_forward`` at CFG ``w``).
Where x_t comes from (``states``):
- ``on_policy`` (the paper): a step k ~ U{0 … N−1} is drawn per batch and x_t is the state of the student's *own*
  sampler before step k, run from z without gradient (guidance 1) — the states the student will meet at inference;
- ``noised_real``: x_t = a_t·x₀ + σ_t·ε with x₀ real images (the toy world's; ``Batch.real``) and t drawn
  per batch from the N sampling timesteps — cheaper (no roll-out), off-policy.
The paper's student is initialised from the teacher and its sampler is the teacher's; the paper's t is the sampling
position (autoregressive tokens); here the N DDIM timesteps. No auxiliary network.

Diversity reward (``diversity_weight`` β > 0, §3.2): m = ``diversity_prompts`` prompts of the batch are generated twice,
from the noise of rows i and m + i, by the student's full sampler; L_total = L − β·mean_i r(x_i, x'_i) with
r = 1 − cos(E(x), E(x')) (:mod:`stepdistill.objectives.rewards`; E = ``diversity_embedder``: "toy" or a local CLIP folder). The
paper's estimator is REINFORCE over discrete tokens; here the sample is a deterministic, differentiable push-forward,
so the estimator is *pathwise*: ∇θ r back-propagated through the decoder, the embedding and the last
``diversity_grad_steps`` K sampler steps (DRaFT-K; earlier steps without gradient) — no variance from a score-function
term, at the cost of K student passes of activations.
"""

from __future__ import annotations

import dataclasses

import torch

from stepdistill.models.conditioning import unet_forward
from stepdistill.objectives.base import (
    Batch,
    Objective,
    ObjectiveConfigError,
    Requirements,
    check_int,
    check_number,
)
from stepdistill.objectives.rewards import diversity_reward


class CFGDistill(Objective):
    name = "cfg_distill"
    DEFAULTS = {
        "guidance_scale": 3.0,  # the teacher's CFG scale w that the student absorbs
        "states": "on_policy",  # or noised_real (see the module docstring)
        "aux_updates_per_generator_update": 1,  # unused: no auxiliary network (kept for the shared validation)
        "diversity_weight": 0.0,  # β; 0 = plain CFG distillation
        "diversity_embedder": "toy",  # "toy" (evaluator features) or a local CLIP folder
        "diversity_prompts": 8,  # m prompts, two generations each (needs train.batch_size >= 2m)
        "diversity_grad_steps": 1,  # K: pathwise gradient through the last K sampler steps
    }

    def __init__(self, teacher, generator, config=None) -> None:
        super().__init__(teacher, generator, config)
        if generator.kind != "teacher_sampler":
            raise ValueError("cfg_distill needs a guidance-distilled student sampled by the teacher's scheduler: set "
                             "generator.teacher_sampler_steps (e.g. 25) in the recipe")
        self.aux_updates_per_generator_update = 0
        object.__setattr__(self, "embedder", None)  # loaded at the first diversity step; frozen, never checkpointed

    @classmethod
    def validate_config(cls, cfg, num_train_timesteps: int = 1000) -> None:
        super().validate_config(cfg, num_train_timesteps)
        check_number(cls.name, "guidance_scale", cfg["guidance_scale"], low=1.0)
        if cfg["states"] not in ("on_policy", "noised_real"):
            raise ObjectiveConfigError(cls.name, "states", f"must be on_policy or noised_real, got {cfg['states']!r}")
        check_number(cls.name, "diversity_weight", cfg["diversity_weight"], low=0.0)
        check_int(cls.name, "diversity_prompts", cfg["diversity_prompts"], low=1)
        check_int(cls.name, "diversity_grad_steps", cfg["diversity_grad_steps"], low=1)
        if not isinstance(cfg["diversity_embedder"], str) or not cfg["diversity_embedder"]:
            raise ObjectiveConfigError(cls.name, "diversity_embedder", "must be 'toy' or a local CLIP folder path")

    @classmethod
    def requirements(cls, cfg) -> Requirements:
        """A guidance-distilled student sampled by the teacher's scheduler; real images for ``states: noised_real``;
        the diversity reward's image embedding, whose loss decodes the student's samples with the teacher's VAE. (A
        LoRA student on the teacher's shared UNet trains through that UNet's frozen weights, not its input; the base
        stays in the preset's dtype, as diffusers' LoRA scripts keep it.)"""
        diverse = cfg["diversity_weight"] > 0
        return dataclasses.replace(super().requirements(cfg), student="teacher_sampler",
                                   real_images=cfg["states"] == "noised_real",
                                   image_embedder=cfg["diversity_embedder"] if diverse else None,
                                   teacher_in_gradient=("vae",) if diverse else ())

    def auxiliary_active(self) -> bool:
        return False

    def auxiliary_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        return {}

    def auxiliary_loss(self, batch: Batch, **overrides):
        raise RuntimeError("cfg_distill has no auxiliary network")

    def states(self, batch: Batch, stop: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t) per row, as ``config['states']`` says; ``stop`` (step indices) and ``noise`` replace the draws."""
        gen = self.generator
        n, device = batch.noise.shape[0], batch.noise.device
        if stop is None:  # one step k per batch (as DMD2's backward simulation): the roll-out costs k passes, not max k
            stop = torch.randint(0, gen.num_steps, (1,)).expand(n).to(device)
        if self.config["states"] == "on_policy":
            return gen.rollout(batch.noise, batch.embeds, stop)
        if batch.real is None:
            raise ValueError("cfg_distill with states: noised_real needs Batch.real (real images)")
        x0 = batch.real.latents.to(batch.noise)
        t = torch.as_tensor(gen.timesteps, device=device)[stop.to(device)]
        eps = torch.randn_like(x0) if noise is None else noise
        return self.schedule.add_noise(x0, eps, t), t

    def generator_loss(self, batch: Batch, stop: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       **overrides) -> tuple[torch.Tensor, dict[str, float]]:
        x_t, t = self.states(batch, stop, noise)
        w = float(self.config["guidance_scale"])
        t_model = self.teacher.schedule.model_timestep(t)
        with self.generator.teacher_unet_mode(), torch.no_grad():
            target = unet_forward(self.teacher.unet, x_t, t_model, batch.embeds, guidance_scale=w).float()
        student = unet_forward(self.generator.unet, x_t, t_model, batch.embeds, guidance_scale=1.0).float()
        loss = torch.mean((student - target) ** 2)
        logs = {"cfg_mse": float(loss.detach()), "t_mean": float(t.float().mean())}
        beta = float(self.config["diversity_weight"])
        if beta > 0:
            reward = self.diversity(batch).mean()
            loss = loss - beta * reward
            logs["diversity_reward"] = float(reward.detach())
        return loss, logs

    def diversity(self, batch: Batch) -> torch.Tensor:
        """r_i = 1 − cos(E(x_i), E(x'_i)) for the first m prompts, x_i and x'_i from the noise of rows i and m + i,
        with the pathwise gradient of the module docstring."""
        n = batch.noise.shape[0]
        m = min(int(self.config["diversity_prompts"]), n // 2)
        if m < 1:
            raise ValueError("the diversity reward needs two generations per prompt: train.batch_size must be >= 2")
        k = min(int(self.config["diversity_grad_steps"]), self.generator.num_steps)
        rows = torch.arange(m, device=batch.noise.device)
        embeds = batch.embeds.select(torch.cat([rows, rows]))
        x = self.generator.sample_with_grad(batch.noise[: 2 * m], embeds, grad_steps=k)
        if self.embedder is None:
            if self.image_embedder_loader is None:
                raise ValueError(f"cfg_distill: the diversity reward needs the image embedder "
                                 f"{self.config['diversity_embedder']!r}; set objective.image_embedder_loader (distill "
                                 "does, from requirements(cfg).image_embedder)")
            object.__setattr__(self, "embedder", self.image_embedder_loader())
        feats = self.embedder(x)
        return diversity_reward(feats[:m], feats[m:])
