"""SiD — Score identity Distillation (Zhou, Zheng, Wang, Yin, Huang; ICML 2024, arXiv:2404.04057), with the guidance
of SiD-LSG (Zhou, Wang, Zheng, Huang; ICLR 2025, arXiv:2406.01561), the few-step uniform mixture of arXiv:2505.12674
(Zhou, Gu, Wang 2025) and SiDA's diffusion GAN (Zhou, Zheng, Gu, Wang, Huang; ICLR 2025, arXiv:2410.14919).
Follows the official code: mingyuanzhou/SiD-LSG ``training/sid_training_loop.py`` + ``training/sid_sd_util.py`` (SD),
mingyuanzhou/SiD branch ``sida`` (GAN), apple/ml-sid-dit ``training/sid_dit_training_loop.py`` (few-step mixture).

Generator update (``generator_loss``); x = G_θ(z, c) (one step: the UNet at t_init = 625 on σ_{t_init}·z, see
``Generator.scaled_input_noise``); t ~ randint(min_t, max_t) (official ``torch.randint(20, 980)``); ε ~ N(0, I);
x_t = a_t·x + σ_t·ε — **with autograd through x**; then, with autograd on (teacher and fake score frozen as
parameters, not run under no_grad — the official ``requires_grad_(False)`` + ``eval()``):
  y_real = x̂₀ of the teacher at CFG κ₄, y_fake = x̂₀ of the fake score at CFG κ₂ (and κ₃, see below);
  w = mean_{C,H,W}|x − y_real| (detached, clipped at ≥ 1e−5);
  L = Σ_elements (y_real − y_fake^{κ₂})·((y_real − x) − α·(y_real − y_fake^{κ₃})) / w · loss_scaling / B.
With α = 1 (the SD scripts) this is ``(y_real − y_fake)·(y_fake − x)/w`` as coded there. ∂L/∂θ therefore holds the
input-Jacobian terms of *both* networks as well as the direct term — the generator step keeps three networks'
activations. Samples with a NaN in x, y_real or y_fake are dropped from the loss (as the official code).
Fake-score update (``auxiliary_loss``): x = sg(G_θ(z, c)) of fresh noise; t ~ randint(min_t, max_t); the fake score's
CFG combination at κ₁ is regressed onto the denoising target: Σ (ψ^{κ₁}(x_t) − ε)² · loss_scaling / B
(v-prediction teachers: the v target weighted by snr/(snr + 1), as ``compute_snr`` there). Whenever κ₁ or κ₂ ≠ 1
each prompt of the fake-score batch is replaced by the empty prompt with probability ``prompt_dropout`` (0.1)
*before the generator samples*, as the official loop rewrites ``contexts`` before ``sid_sd_sampler`` and
``sid_sd_denoise`` read them (``sid_training_loop.py`` 392–421): the fake score learns the pairs (G(z, ""), ""), so
its unconditional branch models the generator's unconditional samples. The generator update never drops prompts.

Guidance modes (``guidance_mode``): ``lsg`` — the four scales as given (the released SD1.5 models use
κ₁ = κ₂ = κ₃ = κ₄ ∈ {1.5, 2, 3, 4.5}; the official code has one key for κ₂ = κ₃, here they are separate: κ₂ scales the
fake score in the score difference (y_real − y_fake), κ₃ the one in the second factor); ``zero_cfg`` (2505.12674) — the
teacher without CFG (κ₄ must be 1) and the fake score without text: it is trained and evaluated on the empty prompt
(κ₁ = κ₂ = κ₃ = 1 required); ``anti_cfg`` — the fake score in the generator loss at the negative scale
``anti_cfg_scale`` (κ₂ = κ₃ = that scale; the value is unpublished in code: a config key).

Few-step (``generator.timesteps`` with K > 1, the paper's t_i = ⌊t_init·(1 − i/K)⌋, ``NoiseSchedule.sid_timesteps``):
the uniform mixture — each training iteration draws one k ~ U{1..K} (here 0-based, from the update number, so every
process and a resumed run draw the same k), runs steps before k without gradient (fresh noise between steps), and the
step-k output feeds *both* the fake-score update and the generator update of that iteration.

Diffusion GAN (``gan_enabled``, SiDA): the discriminator is the fake score's encoder — logits = the mid-block output
averaged over channels (a spatial map, no extra parameters). In the fake-score update real latents and the generator's
x are noised at the same t with the same ε; D loss = ½·[BCE(D(real_t), 1) + BCE(D(fake_t), 0)] per sample (mean over
the map) × C·H·W (the ml-sid-dit scaling, matching the summed SiD losses), weighted ``gan_disc_weight`` and added to
the fake-score loss; the fake score's gradients are clipped by value at ``fake_grad_clip_value`` (1 with the GAN on,
SiDA). In the generator update, after ``gan_warmup_steps`` updates: L = ½·L_SiD + ½·λ·L_GAN with
L_GAN = Σ_b mean_b′ BCE(D(x_t), 1)_b′·C·H·W / w_b / B at the SiD loss's own x_t (λ = ``gan_weight``, 0.01 as SiDA's
``lsg_gan``): SiDA's ``bce_loss(...)/weight_factor``, the batch-mean BCE divided by every sample's w
(``gan_weighting: batch_mean``); ``per_sample`` divides each sample's own BCE by its w (apple/ml-sid-dit's form).
SiDA also freezes G for its first 100k images; not reproduced. Every difference from the official code, with its
reason and cost: docs/methods/sid.md.

Flow-matching teachers (SD3, FLUX; apple/ml-sid-dit ``training/sid_dit_training_loop.py``, ``sid_dit_sd3_util.py``):
the same losses on x̂₀ = x_t − σ·v̂ (``NoiseSchedule.to_x0``), the fake score regressed onto the flow target ε − x
(``NoiseSchedule.target``, no weight). Two keys give ml-sid-dit's choices: ``sigma_sampling: logit_normal`` draws
σ = sigmoid(N(``logit_mean``, ``logit_std``²)) (ln 2 and 1.6 there, unshifted) for both losses, placed on the nearest
level of the teacher's σ table (ml-sid-dit uses the continuous σ; the table's spacing is 1/1000 unshifted), and
``weighting`` replaces the division by w = mean|x − y_real| (``sid_legacy``) by a factor of σ (``1_minus_sigma``,
ml-sid-dit's default, and the other schemes of :data:`SIGMA_WEIGHTINGS`), which also weighs SiDA's generator GAN term.

Optional ODE-pair warm-up (``ode_warmup_steps``, default 0 = the paper; ``objectives.regression.ODEPairWarmup``): the
first N generator updates regress G onto the teacher's ODE outputs and skip the fake-score updates, as the toy DMD
recipes do — not part of SiD, offered so that SiD and DMD can be compared from the same warmed-up generator.

Config keys: see ``DEFAULTS``; min_t/max_t are integer timesteps (t ∈ [min_t, max_t), as ``randint``).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from stepdistill.objectives.base import (
    Batch,
    Objective,
    ObjectiveConfigError,
    Requirements,
    check_bool,
    check_int,
    check_number,
    trainable_parameters,
)
from stepdistill.objectives.common import drop_rows, frozen, make_fake_score
from stepdistill.objectives.disback import DisBackOption
from stepdistill.objectives.gan import bottleneck_features, capture_bottleneck
from stepdistill.objectives.regression import ODEPairWarmup

GUIDANCE_MODES = ("lsg", "zero_cfg", "anti_cfg")
GAN_WEIGHTINGS = ("batch_mean", "per_sample")


def sid_generator_loss(x: torch.Tensor, y_real: torch.Tensor, y_fake2: torch.Tensor, y_fake3: torch.Tensor,
                       alpha: float, sigma_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element SiD generator loss ``(y_real − y_fake₂)·((y_real − x) − α·(y_real − y_fake₃)) / w`` and the
    per-sample weight ``w = clip(mean_{C,H,W}|x − y_real|, 1e−5)`` (detached). Nothing is detached but ``w``.
    With ``sigma_weight`` (per sample, detached: :func:`sigma_weighting`) the loss is multiplied by it instead of
    divided by w, as apple/ml-sid-dit's ``weighting_scheme`` other than ``sid_legacy``; ``w`` is still returned."""
    with torch.no_grad():
        w = (x.float() - y_real.float()).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True).clamp(min=1e-5)
    loss = (y_real - y_fake2) * ((y_real - x) - alpha * (y_real - y_fake3))
    if sigma_weight is None:
        return loss / w, w
    return loss * sigma_weight.reshape(-1, *([1] * (x.ndim - 1))).to(loss), w


#: apple/ml-sid-dit's ``weighting_scheme`` of the generator loss on flow teachers (σ: the schedule's σ_t; every
#: denominator clipped at 1e−5); ``sid_legacy`` is 1/mean|x − y_real| (the SD code's division by w).
SIGMA_WEIGHTINGS = {
    "1_minus_sigma": lambda s: 1 - s,
    "1_minus_sigma_squared": lambda s: (1 - s) ** 2,
    "1_over_sigma": lambda s: 1 / s.clamp(min=1e-5),
    "1_over_sigma2": lambda s: 1 / (s ** 2).clamp(min=1e-5),
    "snr_sqrt": lambda s: (1 - s) / s.clamp(min=1e-5),
    "snr": lambda s: ((1 - s) / s.clamp(min=1e-5)) ** 2,
}
WEIGHTINGS = ("sid_legacy", *SIGMA_WEIGHTINGS)
SIGMA_SAMPLINGS = ("uniform", "logit_normal")


def sigma_weighting(scheme: str, sigma: torch.Tensor) -> torch.Tensor | None:
    """The per-sample factor of ``weighting`` ``scheme`` at noise levels ``sigma`` (None for ``sid_legacy``)."""
    if scheme == "sid_legacy":
        return None
    return SIGMA_WEIGHTINGS[scheme](sigma.double()).float()


def discriminator_logits(bottleneck: torch.Tensor) -> torch.Tensor:
    """SiDA's logits: the encoder's bottleneck averaged over channels, a (B, 1, h, w) map (float32)."""
    return bottleneck.float().mean(dim=1, keepdim=True)


def per_sample_bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    """BCE-with-logits against a constant label, averaged over each sample's map: shape (B,)."""
    loss = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")
    return loss.flatten(1).mean(dim=1)


class SiD(DisBackOption, ODEPairWarmup, Objective):
    name = "sid"
    DEFAULTS = {
        "alpha": 1.0,
        "min_t": 20,
        "max_t": 980,
        "guidance_mode": "lsg",
        "kappa1": 1.5,
        "kappa2": 1.5,
        "kappa3": 1.5,
        "kappa4": 1.5,
        "anti_cfg_scale": -1.0,
        "prompt_dropout": 0.1,
        "loss_scaling": 1.0,
        "fake_loss_scaling": 1.0,
        "aux_updates_per_generator_update": 1,
        "fake_lora_rank": None,
        "fake_lora_alpha": None,
        "gan_enabled": False,
        "gan_weight": 0.01,
        "gan_disc_weight": 1.0,
        "gan_warmup_steps": 0,
        "gan_weighting": "batch_mean",
        "fake_grad_clip_value": None,
        "sigma_sampling": "uniform",
        "logit_mean": 0.6931471805599453,
        "logit_std": 1.6,
        "weighting": "sid_legacy",
        **ODEPairWarmup.REGRESSION_DEFAULTS,
        **DisBackOption.DISBACK_DEFAULTS,
    }

    def __init__(self, teacher, generator, config=None) -> None:
        super().__init__(teacher, generator, config)
        cfg = self.config
        self.fake_unet = make_fake_score(teacher, cfg["fake_lora_rank"], cfg["fake_lora_alpha"],
                                         share_base=self.shares_teacher_base)
        self.mixture_step = 0

    @classmethod
    def validate_config(cls, cfg, num_train_timesteps: int = 1000) -> None:
        super().validate_config(cfg, num_train_timesteps)
        name = cls.name
        cls.validate_regression_config(cfg)
        cls.validate_disback_config(cfg)
        check_number(name, "alpha", cfg["alpha"])
        T = num_train_timesteps
        check_int(name, "min_t", cfg["min_t"], low=0, high=T - 1)
        check_int(name, "max_t", cfg["max_t"], low=1, high=T)
        if cfg["min_t"] >= cfg["max_t"]:
            raise ObjectiveConfigError(name, "min_t", f"({cfg['min_t']}) must be below 'max_t' ({cfg['max_t']}): t is "
                                       "drawn from randint(min_t, max_t)")
        if cfg["guidance_mode"] not in GUIDANCE_MODES:
            raise ObjectiveConfigError(name, "guidance_mode", f"must be one of {', '.join(GUIDANCE_MODES)}, "
                                       f"got {cfg['guidance_mode']!r}")
        for key in ("kappa1", "kappa2", "kappa3", "kappa4", "anti_cfg_scale"):
            check_number(name, key, cfg[key])
        if cfg["guidance_mode"] == "zero_cfg":
            bad = [k for k in ("kappa1", "kappa2", "kappa3", "kappa4") if cfg[k] != 1.0]
            if bad:
                raise ObjectiveConfigError(name, bad[0], f"must be 1 in guidance_mode 'zero_cfg' (the teacher without CFG, "
                                           f"the fake score without text): set {', '.join(bad)} to 1 "
                                           f"(got {', '.join(str(cfg[k]) for k in bad)})")
        if cfg["guidance_mode"] == "anti_cfg" and not cfg["anti_cfg_scale"] < 0:
            raise ObjectiveConfigError(name, "anti_cfg_scale", f"must be negative in guidance_mode 'anti_cfg', "
                                       f"got {cfg['anti_cfg_scale']}")
        check_number(name, "prompt_dropout", cfg["prompt_dropout"], 0.0, 1.0)
        check_number(name, "loss_scaling", cfg["loss_scaling"], low=0.0)
        check_number(name, "fake_loss_scaling", cfg["fake_loss_scaling"], low=0.0)
        check_bool(name, "gan_enabled", cfg["gan_enabled"])
        check_number(name, "gan_weight", cfg["gan_weight"], low=0.0)
        check_number(name, "gan_disc_weight", cfg["gan_disc_weight"], low=0.0)
        check_int(name, "gan_warmup_steps", cfg["gan_warmup_steps"], low=0)
        if cfg["gan_weighting"] not in GAN_WEIGHTINGS:
            raise ObjectiveConfigError(name, "gan_weighting", f"must be one of {', '.join(GAN_WEIGHTINGS)}, got "
                                       f"{cfg['gan_weighting']!r}")
        if cfg["fake_grad_clip_value"] is not None:
            check_number(name, "fake_grad_clip_value", cfg["fake_grad_clip_value"], low=0.0)
        if cfg["sigma_sampling"] not in SIGMA_SAMPLINGS:
            raise ObjectiveConfigError(name, "sigma_sampling", f"must be one of {', '.join(SIGMA_SAMPLINGS)}, got "
                                       f"{cfg['sigma_sampling']!r}")
        check_number(name, "logit_mean", cfg["logit_mean"])
        check_number(name, "logit_std", cfg["logit_std"], low=1e-6)
        if cfg["weighting"] not in WEIGHTINGS:
            raise ObjectiveConfigError(name, "weighting", f"must be one of {', '.join(WEIGHTINGS)}, got "
                                       f"{cfg['weighting']!r}")

    # --- declarations read by the trainer / distill -------------------------------------------------------------------
    @classmethod
    def requirements(cls, cfg) -> Requirements:
        """The generator loss differentiates y_real = x̂₀ of the teacher UNet through its input x_t; SiDA's GAN term
        needs real images."""
        return dataclasses.replace(super().requirements(cfg), teacher_in_gradient=("unet",),
                                   real_images=bool(cfg["gan_enabled"]))

    def auxiliary_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"fake_score": trainable_parameters(self.fake_unet)}

    def grad_clip_values(self) -> dict[str, float]:
        """Clip-by-value per auxiliary group: the fake score at 1 with the GAN on (SiDA), unless configured."""
        value = self.config["fake_grad_clip_value"]
        if value is None and self.config["gan_enabled"]:
            value = 1.0
        return {} if value is None else {"fake_score": float(value)}

    def set_train_step(self, step: int) -> None:
        """Also draws this iteration's mixture step k (0-based) from the update number: the same k for the
        fake-score and generator updates, on every process and after a resume."""
        super().set_train_step(step)
        K = self.generator.num_steps
        g = torch.Generator().manual_seed(1_000_003 * int(step) + 12_345)
        self.mixture_step = int(torch.randint(0, K, (1,), generator=g)) if K > 1 else 0

    # --- guidance -------------------------------------------------------------------------------------------------
    def scales(self) -> dict[str, float]:
        """Effective (κ₁, κ₂, κ₃, κ₄) of the guidance mode."""
        return self.scales_of(self.config)

    @staticmethod
    def scales_of(cfg) -> dict[str, float]:
        """Effective (κ₁, κ₂, κ₃, κ₄) of the guidance mode of config ``cfg``."""
        k = {f"kappa{i}": float(cfg[f"kappa{i}"]) for i in range(1, 5)}
        if cfg["guidance_mode"] == "anti_cfg":
            k["kappa2"] = k["kappa3"] = float(cfg["anti_cfg_scale"])
        return k

    def fake_embeds(self, embeds):
        """What the fake score is conditioned on: the prompts, or the empty prompt in ``zero_cfg``."""
        if self.config["guidance_mode"] == "zero_cfg":
            return drop_rows(embeds, torch.ones(len(embeds), dtype=torch.bool))
        return embeds

    def uses_prompt_dropout(self) -> bool:
        k = self.scales()
        return self.config["guidance_mode"] != "zero_cfg" and (k["kappa1"] != 1.0 or k["kappa2"] != 1.0)

    # --- sampling -------------------------------------------------------------------------------------------------
    def generate(self, batch: Batch, grad: bool = True) -> torch.Tensor:
        """x of this iteration's mixture step k (one-step: G(z, c)); steps before k run without gradient."""
        gen = self.generator
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if gen.num_steps > 1:
                x_t, k = gen.backward_simulate(batch.noise, batch.embeds, k=self.mixture_step)
                return gen(batch.noise, batch.embeds, step_index=k, x_t=x_t)
            return gen(batch.noise, batch.embeds)

    def _t(self, timesteps, n: int, device) -> torch.Tensor:
        cfg = self.config
        if cfg["sigma_sampling"] == "logit_normal":  # ml-sid-dit: σ = sigmoid(N(mean, std²)), on the σ table
            return self._timesteps_or(timesteps, n, device, lambda: self.schedule.sample_timesteps_logit_normal(
                n, float(cfg["logit_mean"]), float(cfg["logit_std"]), device=device))
        return self._timesteps_or(timesteps, n, device,
                                  lambda: torch.randint(cfg["min_t"], cfg["max_t"], (n,)).to(device))

    def _x0(self, unet, x_t, t, embeds, scale: float) -> torch.Tensor:
        """x̂₀ of ``unet`` at CFG ``scale`` with autograd (float32, as the official ``sid_sd_denoise``)."""
        out = self.score_prediction(unet, x_t, t, embeds, scale).float()
        return self.schedule.to_x0(out, x_t.float(), t)

    # --- losses ---------------------------------------------------------------------------------------------------
    def pair_guidance(self) -> float:
        """CFG of the teacher ODE that makes the warm-up pairs: ``regression_guidance``, else κ₄."""
        g = self.config["regression_guidance"]
        return float(self.config["kappa4"] if g is None else g)

    @classmethod
    def phase_cost_ratio(cls, cfg) -> float:
        """UNet passes per update after the warm-up over one warm-up update (3): the generator step backpropagates
        through the teacher and the fake score (3 each, ×2 with CFG) besides the generator (3); each fake-score
        update is a generator forward (1) and a fake-score forward + backward (3, ×2 with κ₁ ≠ 1)."""
        k = cls.scales_of(cfg)
        teacher = 3 * (2 if k["kappa4"] != 1.0 else 1)
        fake = 3 * (2 if k["kappa2"] != 1.0 else 1) + (3 if k["kappa3"] != k["kappa2"] else 0)
        aux = int(cfg["aux_updates_per_generator_update"]) * (1 + 3 * (2 if k["kappa1"] != 1.0 else 1))
        return (3 + teacher + fake + aux) / 3

    def generator_loss(self, batch: Batch, *, timesteps=None, noise=None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        if self.in_ode_warmup():
            return self.ode_warmup_loss(batch)
        k = self.scales()
        x = self.generate(batch, grad=True).float()
        n = x.shape[0]
        t = self._t(timesteps, n, x.device)
        eps = torch.randn_like(x) if noise is None else noise.to(x)
        x_t = self.schedule.add_noise(x, eps, t)  # gradient flows through x
        fake_embeds = self.fake_embeds(batch.embeds)
        gan_on = cfg["gan_enabled"] and self.train_step >= cfg["gan_warmup_steps"]
        with frozen(self.fake_unet), self._bottleneck_capture(gan_on) as mids:
            y_fake2 = self._x0(self.fake_unet, x_t, t, fake_embeds, k["kappa2"])
            bottleneck = mids[-1] if mids else None
            y_fake3 = y_fake2 if k["kappa3"] == k["kappa2"] else self._x0(self.fake_unet, x_t, t, fake_embeds, k["kappa3"])
        y_real = self._x0(self.real_score_unet(), x_t, t, batch.embeds, k["kappa4"])

        keep = ~(torch.isnan(x) | torch.isnan(y_real) | torch.isnan(y_fake2) | torch.isnan(y_fake3)).flatten(1).any(1)
        factor = sigma_weighting(cfg["weighting"], self.schedule.sigma(t.cpu(), x.float())[keep])
        per_elem, w = sid_generator_loss(x[keep], y_real[keep], y_fake2[keep], y_fake3[keep], float(cfg["alpha"]),
                                         sigma_weight=factor)
        loss_sid = per_elem.sum() * cfg["loss_scaling"] / n
        loss = loss_sid
        logs = {"loss_sid": float(loss_sid.detach()), "sid_t_mean": float(t.float().mean()),
                "sid_weight_mean": float(w.mean()) if w.numel() else float("nan"),
                "nan_samples": float(n - int(keep.sum())), "mixture_step": float(self.mixture_step)}
        if gan_on:
            # the conditional rows' bottleneck of the y_fake₂ pass (CFG batches stack [uncond, cond])
            feats = bottleneck[-n:] if bottleneck.shape[0] != n else bottleneck
            bce = per_sample_bce(discriminator_logits(feats).clamp(-10, 10), 1.0)[keep]
            if cfg["gan_weighting"] == "batch_mean":  # SiDA: the batch's mean BCE (a scalar) over each sample's w
                bce = bce.mean().expand_as(bce)
            elems = x[0].numel()
            per_sample = bce * elems / w.reshape(-1) if factor is None else bce * elems * factor.reshape(-1)
            loss_gan = per_sample.sum() / n
            loss = 0.5 * loss_sid + 0.5 * cfg["gan_weight"] * loss_gan
            logs["loss_gen_gan"] = float(loss_gan.detach())
        logs.update(self.x0_stats(x))
        logs["loss_generator"] = float(loss.detach())
        return loss, logs

    def _bottleneck_capture(self, gan_on: bool) -> contextlib.AbstractContextManager[list[torch.Tensor]]:
        """The fake score's bottleneck outputs while the GAN is on (its discriminator reads them); nothing otherwise."""
        return capture_bottleneck(self.fake_unet) if gan_on else contextlib.nullcontext([])

    def auxiliary_loss(self, batch: Batch, *, timesteps=None, noise=None, drop=None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        k = self.scales()
        n = batch.noise.shape[0]
        if drop is None and self.uses_prompt_dropout():
            drop = torch.rand(n) < cfg["prompt_dropout"]
        if drop is not None:  # the dropped prompts condition the generator's sample and the fake score alike
            batch = dataclasses.replace(batch, embeds=drop_rows(batch.embeds, torch.as_tensor(drop, dtype=torch.bool)))
        x = self.generate(batch, grad=False).detach().float()
        t = self._t(timesteps, n, x.device)
        eps = torch.randn_like(x) if noise is None else noise.to(x)
        embeds = self.fake_embeds(batch.embeds)
        weight = None
        if self.schedule.prediction_type == "v_prediction":
            snr = self.schedule.snr(t.cpu()).to(x)
            weight = snr / (snr + 1)
        logs: dict[str, float] = {}
        with self._bottleneck_capture(cfg["gan_enabled"]) as mids:
            loss_fake = self.denoising_loss(self.fake_unet, x, embeds, t, eps, weight=weight,
                                            guidance_scale=k["kappa1"], reduction="sum_per_sample")
        loss_fake = loss_fake * cfg["fake_loss_scaling"]
        loss = loss_fake
        logs["loss_fake"] = float(loss_fake.detach())
        if cfg["gan_enabled"]:
            if batch.real is None:
                raise ValueError("sid with gan_enabled needs Batch.real (encoded real images; set "
                                 "real_images in the pipeline spec)")
            fake_feats = mids[-1][-n:]
            real = batch.real.latents.to(x)
            real_t = self.schedule.add_noise(real, eps, t)  # the same σ and the same noise as the fake images
            real_embeds = batch.real.embeds if batch.real.embeds is not None else batch.embeds
            if cfg["guidance_mode"] == "zero_cfg":  # the empty prompt (the same for every row)
                real_embeds = self.fake_embeds(batch.embeds)
            logits_real = discriminator_logits(bottleneck_features(self.fake_unet, real_t, self.schedule.model_timestep(t),
                                                                     real_embeds))
            logits_fake = discriminator_logits(fake_feats)
            elems = x[0].numel()
            loss_disc = (0.5 * (per_sample_bce(logits_real, 1.0) + per_sample_bce(logits_fake, 0.0))).sum() * elems / n
            loss = loss + cfg["gan_disc_weight"] * loss_disc
            logs.update(loss_disc=float(loss_disc.detach()),
                        d_real_prob=float(torch.sigmoid(logits_real.detach()).mean()),
                        d_fake_prob=float(torch.sigmoid(logits_fake.detach()).mean()))
        logs["loss_auxiliary"] = float(loss.detach())
        return loss, logs
