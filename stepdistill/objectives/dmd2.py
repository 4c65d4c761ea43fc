"""DMD2 — Improved Distribution Matching Distillation (Yin, Gharbi, Park, Zhang, Shechtman, Durand, Freeman 2024,
arXiv:2405.14867). Checked against the official code, tianweiy/DMD2 ``main/sd_guidance.py``,
``main/sd_unified_model.py`` and ``main/train_sd.py`` (and the SD1.5 recipes in ``experiments/sdv1.5``).

Generator update (``generator_loss``):
  x₀ = G_θ(z, c) (few-step students: backward simulation picks the step); t ~ U{⌊0.02T⌋ … ⌊0.98T⌋};
  x_t = a_t·sg(x₀) + σ_t·ε; x̂₀_real from the frozen teacher with CFG ``real_guidance_scale`` (SD1.5: 1.75; a
  scale ≤ 1 means no guidance, as the official ``guidance_scale > 1`` test),
  x̂₀_fake from the fake score without guidance, both converted in float64;
  p_real = x₀ − x̂₀_real, p_fake = x₀ − x̂₀_fake, grad = nan_to_num((p_real − p_fake)/mean_{C,H,W}|p_real|) (no grad);
  loss = dm_weight·½·MSE(x₀, sg(x₀ − grad)) [+ gan_weight·mean softplus(−D(x₀)) when the GAN is on].
  No regression loss (DMD2 removes it).
Auxiliary update (``auxiliary_loss``, run ``aux_updates_per_generator_update`` = 10 times per generator update in
the SD1.5 recipes — the paper's text says 5), after the generator update as in the official loop
(``aux_sample: reuse``, :class:`~stepdistill.objectives.common.GeneratorFirstSchedule`):
  fake score: ε-prediction MSE (``NoiseSchedule.target``) at t ~ U{0 … T−1} on sg(x₀) — the generator update's own
  sample for the first auxiliary update, a fresh generator sample for the others;
  GAN (optional): gan_disc_weight·(softplus(D(sg x₀)) + softplus(−D(x_real))), D = classifier head on the fake
  score's mid-block output (``stepdistill.objectives.gan``), inputs noised at t ~ U{0 … diffusion_gan_max_t − 1}.
  The fake score and the head share one optimizer in the official code; here they are two entries of
  ``auxiliary_parameters`` (``fake_score``, ``discriminator``) so the trainer can give them separate optimizers.

Config keys (defaults = the official SD1.5 recipe unless noted):
  real_guidance_scale 1.75; min_t_ratio 0.02; max_t_ratio 0.98; aux_updates_per_generator_update 10; dm_weight 1.0;
  fake_lora_rank null (full copy of the teacher UNet, as the official SD code) / fake_lora_alpha null (= rank);
  gan_enabled false (the from-scratch SD1.5 run; the GAN stage resumes from it with lr 5e-7);
  gan_weight 1e-3 (``gen_cls_loss_weight``); gan_disc_weight 1e-2 (``guidance_cls_loss_weight``);
  diffusion_gan true; diffusion_gan_max_t 1000 (``diffusion_gan_max_timestep`` of the SD1.5/SDXL recipes; the
  noise timestep is drawn from ``randint(0, max_t)``, i.e. max_t itself is excluded, as in the official code);
  ode_warmup_steps 0 (the SD1.5 recipe; DMD2's one-step SDXL generator is first warmed up by regression on teacher
  ODE pairs: the first N generator updates are then the latent MSE to the pairs alone, with no auxiliary updates),
  regression_pairs null (4 x the batch size), regression_steps 25 (DDIM steps of the teacher ODE for the pairs),
  regression_guidance null (its CFG; null: real_guidance_scale); aux_sample "reuse" (the official schedule above;
  "fresh": fake-score updates first, each on a fresh sample — one more generator forward per generator update).
Where this code differs from the official one, with reasons and costs: docs/methods/dmd2.md.
"""

from __future__ import annotations

import dataclasses

import torch

from stepdistill.objectives.base import (
    Batch,
    Objective,
    Requirements,
    check_bool,
    check_int,
    check_number,
    trainable_parameters,
)
from stepdistill.objectives.common import (
    DistributionMatching,
    GeneratorFirstSchedule,
    frozen,
    make_fake_score,
)
from stepdistill.objectives.disback import DisBackOption
from stepdistill.objectives.gan import (
    ClassifierHead,
    bottleneck_features,
    bottleneck_shape,
    discriminator_loss,
    generator_gan_loss,
)
from stepdistill.objectives.regression import ODEPairWarmup


class DMD2(DisBackOption, GeneratorFirstSchedule, ODEPairWarmup, DistributionMatching, Objective):
    name = "dmd2"
    DEFAULTS = {
        "real_guidance_scale": 1.75,
        "min_t_ratio": 0.02,
        "max_t_ratio": 0.98,
        "aux_updates_per_generator_update": 10,
        "dm_weight": 1.0,
        "fake_lora_rank": None,
        "fake_lora_alpha": None,
        "gan_enabled": False,
        "gan_weight": 1e-3,
        "gan_disc_weight": 1e-2,
        "diffusion_gan": True,
        "diffusion_gan_max_t": 1000,
        **ODEPairWarmup.REGRESSION_DEFAULTS,
        **DisBackOption.DISBACK_DEFAULTS,
        **GeneratorFirstSchedule.SCHEDULE_DEFAULTS,
    }

    def __init__(self, teacher, generator, config=None) -> None:
        super().__init__(teacher, generator, config)
        cfg = self.config
        self.fake_unet = make_fake_score(teacher, cfg["fake_lora_rank"], cfg["fake_lora_alpha"],
                                         share_base=self.shares_teacher_base)
        self.cls_head = None
        if cfg["gan_enabled"]:
            c, h, w = bottleneck_shape(self.fake_unet, tuple(teacher.latent_shape))
            self.cls_head = ClassifierHead(c, h, w)

    @classmethod
    def validate_config(cls, cfg, num_train_timesteps: int = 1000) -> None:
        super().validate_config(cfg, num_train_timesteps)
        cls.validate_regression_config(cfg)
        cls.validate_disback_config(cfg)
        cls.validate_schedule_config(cfg)
        check_number(cls.name, "real_guidance_scale", cfg["real_guidance_scale"])
        check_number(cls.name, "dm_weight", cfg["dm_weight"], low=0.0)
        check_bool(cls.name, "gan_enabled", cfg["gan_enabled"])
        check_bool(cls.name, "diffusion_gan", cfg["diffusion_gan"])
        check_number(cls.name, "gan_weight", cfg["gan_weight"], low=0.0)
        check_number(cls.name, "gan_disc_weight", cfg["gan_disc_weight"], low=0.0)
        check_int(cls.name, "diffusion_gan_max_t", cfg["diffusion_gan_max_t"], low=1, high=num_train_timesteps)

    @classmethod
    def requirements(cls, cfg) -> Requirements:
        """The GAN term needs real images."""
        return dataclasses.replace(super().requirements(cfg), real_images=bool(cfg["gan_enabled"]))

    def auxiliary_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        params = {"fake_score": trainable_parameters(self.fake_unet)}
        if self.cls_head is not None:
            params["discriminator"] = list(self.cls_head.parameters())
        return params

    # --- GAN ------------------------------------------------------------------------------------------------------
    def discriminator_logits(self, latents: torch.Tensor, embeds) -> torch.Tensor:
        """Realism logits (B,) of the classifier head on the fake score's bottleneck; with ``diffusion_gan`` the
        latents are first noised at t ~ U{0 … diffusion_gan_max_t − 1}, else evaluated at t = 0."""
        n = latents.shape[0]
        if self.config["diffusion_gan"]:
            t = torch.randint(0, self.config["diffusion_gan_max_t"], (n,), device=latents.device)
            latents = self.schedule.add_noise(latents, torch.randn_like(latents), t)
        else:
            t = torch.zeros(n, dtype=torch.long, device=latents.device)
        features = bottleneck_features(self.fake_unet, latents, self.schedule.model_timestep(t), embeds)
        return self.cls_head(features)

    # --- losses ---------------------------------------------------------------------------------------------------
    def generator_loss(self, batch: Batch, *, timesteps=None, noise=None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        if self.in_ode_warmup():
            return self.ode_warmup_loss(batch)
        x0, loss_dm, logs = self.generate_and_match(batch, timesteps, noise)
        self.keep_for_auxiliary(x0, batch)
        loss = cfg["dm_weight"] * loss_dm
        if self.cls_head is not None:
            # gradient reaches x0 (hence the generator) but not the fake score or the head
            with frozen(self.fake_unet, self.cls_head):
                logits_fake = self.discriminator_logits(x0, batch.embeds)
            loss_gan = generator_gan_loss(logits_fake)
            loss = loss + cfg["gan_weight"] * loss_gan
            logs["loss_gen_gan"] = float(loss_gan.detach())
            logs["d_fake_prob_gen"] = float(torch.sigmoid(logits_fake.detach()).mean())
        logs.update(self.x0_stats(x0))
        logs["loss_generator"] = float(loss.detach())
        return loss, logs

    def auxiliary_loss(self, batch: Batch, *, timesteps=None, noise=None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        x0, batch = self.auxiliary_sample(batch)
        n = x0.shape[0]
        t = self._timesteps_or(timesteps, n, x0.device, lambda: self.sample_timesteps(n, x0.device, 0.0, 1.0))
        eps = torch.randn_like(x0) if noise is None else noise
        loss_fake = self.denoising_loss(self.fake_unet, x0, batch.embeds, t, eps)
        loss = loss_fake
        logs = {"loss_fake": float(loss_fake.detach())}
        if self.cls_head is not None:
            if batch.real is None:
                raise ValueError("dmd2 with gan_enabled needs Batch.real (encoded real images)")
            real_embeds = batch.real.embeds if batch.real.embeds is not None else batch.embeds
            logits_fake = self.discriminator_logits(x0, batch.embeds)
            logits_real = self.discriminator_logits(batch.real.latents.to(x0), real_embeds)
            loss_disc = discriminator_loss(logits_fake, logits_real)
            loss = loss + cfg["gan_disc_weight"] * loss_disc
            logs["loss_disc"] = float(loss_disc.detach())
            logs["d_real_prob"] = float(torch.sigmoid(logits_real.detach()).mean())
            logs["d_fake_prob"] = float(torch.sigmoid(logits_fake.detach()).mean())
        logs["loss_auxiliary"] = float(loss.detach())
        return loss, logs
