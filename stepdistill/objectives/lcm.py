"""Latent consistency distillation: LCM (Luo et al. 2023, arXiv:2310.04378) and LCM-LoRA (Luo et al. 2023,
arXiv:2311.05556), as diffusers' reference scripts train them (``examples/consistency_distillation/
train_lcm_distill_sd_wds.py`` and ``train_lcm_distill_lora_sd_wds.py``; luosiallen/latent-consistency-model ships the
same). The student is a :class:`~stepdistill.models.generators.ConsistencyGenerator`.

One update, per sample (``generator_loss``):

1. states: x₀ a real latent (``states: noised_real``; the toy world supplies them) or, data-free, a teacher sample
   (``states: teacher_samples``: the teacher's deterministic DDIM outputs, made once before training as DMD's
   regression pairs with ``regression_pairs`` / ``regression_steps`` / ``regression_guidance``);
2. solver grid ``(1 … N)·k − 1``, k = ⌊T/N⌋ (N = ``num_ddim_timesteps`` = 50: 19, 39, …, 999); ``t_{n+k}`` drawn
   uniformly from it and ``t_n = max(t_{n+k} − k, 0)``; ``x_{t_{n+k}} = α·x₀ + σ·ε``;
3. w ~ U[``w_min``, ``w_max``] (LCM's form: ``ε̂ᶜ + w·(ε̂ᶜ − ε̂ᵘ)``, i.e. diffusers' guidance_scale − 1), embedded
   into the student when it has a guidance embedding (full LCM), else used by the teacher only (LCM-LoRA);
4. online: ``f_θ = c_skip(t_{n+k})·x_{t_{n+k}} + c_out(t_{n+k})·x̂₀^θ`` with
   ``c_skip(t) = σ_d²/((s·t)² + σ_d²)``, ``c_out(t) = s·t/√((s·t)² + σ_d²)`` (s = ``timestep_scaling`` = 10,
   σ_d = ``sigma_data`` = 0.5, t the integer DDPM step);
5. teacher, no grad: x̂₀ʷ = x̂₀ᶜ + w·(x̂₀ᶜ − x̂₀ᵘ), ε̂ʷ likewise ("" as the unconditional prompt), one DDIM step
   ``x_{t_n} = α_{t_n}·x̂₀ʷ + σ_{t_n}·ε̂ʷ``;
6. target, no grad: ``c_skip(t_n)·x_{t_n} + c_out(t_n)·x̂₀^{θ⁻}(x_{t_n}, t_n)`` with θ⁻ the EMA of θ
   (``target: ema``, θ⁻ ← 0.95·θ⁻ + 0.05·θ after every optimiser step, no warm-up) or θ itself (``target: online``,
   LCM-LoRA);
7. loss: mean squared error (``l2``) or pseudo-Huber ``mean(√((f_θ − f⁻)² + c²) − c)`` with c = ``huber_c``.

TCD changes step 4-6's end point (:mod:`stepdistill.objectives.tcd`); the jump each applies to x̂₀ is
:meth:`LCM.jump`. No auxiliary network is trained: the target network is moved by :meth:`after_generator_update`.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from stepdistill.models.conditioning import PromptEmbeds
from stepdistill.models.ema import ema_update_
from stepdistill.objectives.base import (
    Batch,
    Objective,
    ObjectiveConfigError,
    Requirements,
    check_int,
    check_number,
)

STATES = ("noised_real", "teacher_samples")
TARGETS = ("ema", "online")
LOSSES = ("l2", "huber")


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's boundary-condition scalings at integer timesteps ``t`` (float64):
    ``c_skip = σ_d² / ((s·t)² + σ_d²)`` and ``c_out = s·t / √((s·t)² + σ_d²)`` — c_skip(0) = 1, c_out(0) = 0, so
    f(x, 0) = x (diffusers ``scalings_for_boundary_conditions`` and ``LCMScheduler``)."""
    scaled = torch.as_tensor(t, dtype=torch.float64) * float(timestep_scaling)
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_distance(a: torch.Tensor, b: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.001) -> torch.Tensor:
    """``mean((a − b)²)`` (``l2``) or the pseudo-Huber ``mean(√((a − b)² + c²) − c)`` (``huber``), in float32."""
    diff = a.float() - b.float()
    if loss_type == "l2":
        return diff.pow(2).mean()
    if loss_type == "huber":
        return (torch.sqrt(diff.pow(2) + huber_c**2) - huber_c).mean()
    raise ValueError(f"loss_type must be one of {', '.join(LOSSES)}, got {loss_type!r}")


class FrozenNetworkState:
    """A frozen network's weights as an accelerate checkpoint object (the trainer's checkpoints keep only trainable
    weights, :class:`~stepdistill.training.checkpoint.TrainableStateHooks`): the target network, moved by EMA, not by
    gradient."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.network.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.network.load_state_dict(state, strict=True)


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=torch.float64)


class LCM(Objective):
    name = "lcm"
    DEFAULTS = {
        "w_min": 5.0,  # LCM-form guidance range (diffusers' SD script; its SDXL script uses 3-15)
        "w_max": 15.0,
        "num_ddim_timesteps": 50,  # N: the skipping-step solver grid, k = T // N
        "timestep_scaling": 10.0,  # s of the boundary scalings
        "sigma_data": 0.5,
        "loss_type": "l2",  # or huber
        "huber_c": 0.001,
        "target": "ema",  # ema (full LCM) or online (LCM-LoRA: the student itself under no_grad)
        "target_ema_decay": 0.95,
        "states": "noised_real",  # or teacher_samples (data-free)
        "regression_pairs": None,  # teacher_samples: how many (null: 4 x the batch size)
        "regression_steps": 25,  # teacher_samples: DDIM steps of the teacher
        "regression_guidance": None,  # teacher_samples: CFG of the teacher (null: the middle of [w_min, w_max] + 1)
        "aux_updates_per_generator_update": 1,  # unused: no auxiliary network
    }

    def __init__(self, teacher, generator, config=None) -> None:
        super().__init__(teacher, generator, config)
        if generator.kind != "consistency":
            raise ValueError(f"{self.name} trains a consistency student: set the recipe's generator.consistency "
                             "section (e.g. {steps: 4, scheduler: lcm})")
        if self.config["target"] == "ema" and generator.is_lora:
            raise ValueError(f"{self.name}: an EMA target network is for full students; a LoRA student uses "
                             "target: online (LCM-LoRA)")
        self.aux_updates_per_generator_update = 0
        if self.config["target"] == "ema":
            self.target_unet = copy.deepcopy(generator.unet).requires_grad_(False).eval()
        else:
            self.target_unet = None

    @classmethod
    def validate_config(cls, cfg, num_train_timesteps: int = 1000) -> None:
        super().validate_config(cfg, num_train_timesteps)
        check_number(cls.name, "w_min", cfg["w_min"], low=0.0)
        check_number(cls.name, "w_max", cfg["w_max"], low=0.0)
        if cfg["w_min"] > cfg["w_max"]:
            raise ObjectiveConfigError(cls.name, "w_min", f"({cfg['w_min']}) must not exceed 'w_max' ({cfg['w_max']})")
        check_int(cls.name, "num_ddim_timesteps", cfg["num_ddim_timesteps"], low=1, high=num_train_timesteps)
        check_number(cls.name, "timestep_scaling", cfg["timestep_scaling"], low=0.0)
        check_number(cls.name, "sigma_data", cfg["sigma_data"], low=1e-8)
        check_number(cls.name, "huber_c", cfg["huber_c"], low=0.0)
        check_number(cls.name, "target_ema_decay", cfg["target_ema_decay"], low=0.0, high=1.0)
        for key, allowed in (("loss_type", LOSSES), ("target", TARGETS), ("states", STATES)):
            if cfg[key] not in allowed:
                raise ObjectiveConfigError(cls.name, key, f"must be one of {', '.join(allowed)}, got {cfg[key]!r}")
        check_int(cls.name, "regression_pairs", cfg["regression_pairs"], low=1, optional=True)
        check_int(cls.name, "regression_steps", cfg["regression_steps"], low=1)
        if cfg["regression_guidance"] is not None:
            check_number(cls.name, "regression_guidance", cfg["regression_guidance"], low=1.0)

    @classmethod
    def requirements(cls, cfg) -> Requirements:
        """A consistency student; real latents (``noised_real``) or the teacher's samples (``teacher_samples``, made
        as DMD's regression pairs)."""
        return dataclasses.replace(super().requirements(cfg), student="consistency",
                                   real_images=cfg["states"] == "noised_real",
                                   regression_pairs=cfg["states"] == "teacher_samples")

    def pair_guidance(self) -> float:
        """CFG of the teacher samples of ``states: teacher_samples`` (diffusers' form): ``regression_guidance``, else
        1 + the middle of [w_min, w_max]."""
        g = self.config["regression_guidance"]
        return float(1.0 + 0.5 * (self.config["w_min"] + self.config["w_max"]) if g is None else g)

    def auxiliary_active(self) -> bool:
        return False

    def auxiliary_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        return {}

    def auxiliary_loss(self, batch: Batch, **overrides):
        raise RuntimeError(f"{self.name} has no auxiliary network")

    # --- the target network ----------------------------------------------------------------------------------------
    def target_network(self) -> torch.nn.Module:
        """θ⁻: the EMA copy (``target: ema``) or the student's own network (``target: online``)."""
        return self.target_unet if self.target_unet is not None else self.generator.unet

    def checkpoint_objects(self) -> list[FrozenNetworkState]:
        """The EMA target network's weights (a resumed run continues from the same θ⁻)."""
        return [FrozenNetworkState(self.target_unet)] if self.target_unet is not None else []

    def after_generator_update(self) -> None:
        """θ⁻ ← d·θ⁻ + (1 − d)·θ with d = ``target_ema_decay`` (``target: ema`` only)."""
        if self.target_unet is not None:
            ema_update_(self.target_unet.parameters(), self.generator.unet.parameters(),
                        float(self.config["target_ema_decay"]))

    # --- the loss --------------------------------------------------------------------------------------------------
    def clean_states(self, batch: Batch) -> tuple[torch.Tensor, PromptEmbeds]:
        """x₀ and its conditioning (with the batch's unconditional rows for the teacher's CFG)."""
        if self.config["states"] == "teacher_samples":
            if batch.pairs is None:
                raise ValueError(f"{self.name} with states: teacher_samples needs Batch.pairs (the teacher's samples)")
            x0, cond = batch.pairs.latents, batch.pairs.embeds
        else:
            if batch.real is None:
                raise ValueError(f"{self.name} with states: noised_real needs Batch.real (real latents)")
            x0, cond = batch.real.latents, batch.real.embeds if batch.real.embeds is not None else batch.embeds
        embeds = PromptEmbeds(cond=cond.cond, uncond=batch.embeds.uncond, cond_added=cond.cond_added,
                              uncond_added=batch.embeds.uncond_added)
        return x0.to(batch.noise), embeds

    def solver_timesteps(self, n: int, device, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, t_{n+k}, t_n): a uniform draw of the grid position (or ``index``), its timestep and the one k
        below it, clamped at 0."""
        grid = self.schedule.consistency_grid(int(self.config["num_ddim_timesteps"]))
        k = self.schedule.num_train_timesteps // int(self.config["num_ddim_timesteps"])
        if index is None:
            index = torch.randint(0, grid.numel(), (n,))
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).expand(n).cpu()
        start = grid[index]
        return index, start.to(device), (start - k).clamp(min=0).to(device)

    def jump(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, end: torch.Tensor | None) -> torch.Tensor:
        """Where the consistency function maps x_t given its x̂₀: x̂₀ itself for LCM (``end`` unused)."""
        return x0

    def end_timesteps(self, index: torch.Tensor, t_n: torch.Tensor) -> torch.Tensor | None:
        """The end point of the consistency map per sample: none for LCM (it maps to 0)."""
        return None

    def consistency_output(self, net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds,
                           w: torch.Tensor, end: torch.Tensor | None) -> torch.Tensor:
        """``c_skip(t)·x_t + c_out(t)·jump(x_t, x̂₀^net, t, end)`` in float64 (autograd follows the caller)."""
        cond = PromptEmbeds(cond=embeds.cond, cond_added=embeds.cond_added)
        if net is self.generator.unet:  # through the generator's forward: the trainer counts student evaluations
            x0 = self.generator(x_t, cond, x_t=x_t, t=t, w=w).double()
        else:
            x0 = self.generator.predict_x0(x_t, t, cond, w=w, net=net).double()
        c_skip, c_out = boundary_scalings(t.cpu(), self.config["timestep_scaling"], self.config["sigma_data"])
        jumped = self.jump(x_t.double(), x0, t, end)
        return _column(c_skip, x_t) * x_t.double() + _column(c_out, x_t) * jumped

    def teacher_solver_step(self, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, embeds: PromptEmbeds,
                            w: torch.Tensor) -> torch.Tensor:
        """One DDIM step of the teacher's guided ODE from t to t_prev (no grad): x̂₀ʷ and ε̂ʷ in LCM's CFG form
        ``p_c + w·(p_c − p_u)``, then ``α_{t_prev}·x̂₀ʷ + σ_{t_prev}·ε̂ʷ`` (on a flow teacher, the Euler step of its
        velocity: the schedule's ``ddim_step``). With w = 0 everywhere the unconditional pass is skipped."""
        with torch.no_grad():
            x = x_t.double()
            cond = self.teacher_prediction(x_t, t, PromptEmbeds(cond=embeds.cond, cond_added=embeds.cond_added), 1.0)
            x0_c, eps_c = self.schedule.to_x0(cond.double(), x, t), self.schedule.to_eps(cond.double(), x, t)
            if bool((w == 0).all()):  # no guidance (e.g. FLUX.1-dev, which embeds its own): one teacher pass
                return self.schedule.ddim_step(x0_c, eps_c, t_prev.cpu()).to(x_t.dtype)
            if embeds.uncond is None:
                raise ValueError(f"{self.name} needs the unconditional embeddings for the teacher's guidance w > 0")
            uncond = self.teacher_prediction(x_t, t, PromptEmbeds(cond=embeds.uncond, cond_added=embeds.uncond_added),
                                             1.0).double()
            x0_u, eps_u = self.schedule.to_x0(uncond, x, t), self.schedule.to_eps(uncond, x, t)
            wc = _column(w, x_t)
            x0_w = x0_c + wc * (x0_c - x0_u)
            eps_w = eps_c + wc * (eps_c - eps_u)
            return self.schedule.ddim_step(x0_w, eps_w, t_prev.cpu()).to(x_t.dtype)

    def generator_loss(self, batch: Batch, *, timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       w: torch.Tensor | None = None, end_index: torch.Tensor | None = None,
                       **overrides) -> tuple[torch.Tensor, dict[str, float]]:
        """The consistency loss of the module docstring. Test hooks: ``timesteps`` (grid positions), ``noise``, ``w``
        and (TCD) ``end_index`` replace the draws."""
        x0, embeds = self.clean_states(batch)
        n, device = x0.shape[0], x0.device
        index, t_start, t_n = self.solver_timesteps(n, device, timesteps)
        eps = torch.randn_like(x0) if noise is None else noise.to(x0)
        x_start = self.schedule.add_noise(x0, eps, t_start.cpu())
        lo, hi = float(self.config["w_min"]), float(self.config["w_max"])
        w = (hi - lo) * torch.rand(n) + lo if w is None else torch.as_tensor(w, dtype=torch.float32).reshape(-1).expand(n)
        end = self.end_timesteps(index, t_n) if end_index is None else self.end_timesteps_at(end_index, n)
        online = self.consistency_output(self.generator.unet, x_start, t_start, embeds, w, end)
        x_prev = self.teacher_solver_step(x_start, t_start, t_n, embeds, w)
        with torch.no_grad():
            target = self.consistency_output(self.target_network(), x_prev, t_n, embeds, w, end)
        loss = consistency_distance(online, target, self.config["loss_type"], float(self.config["huber_c"]))
        logs = {"consistency_loss": float(loss.detach()), "t_mean": float(t_start.float().mean()),
                "w_mean": float(w.mean())}
        return loss, logs

    def end_timesteps_at(self, end_index: torch.Tensor, n: int) -> torch.Tensor | None:
        """The end points for given grid positions (TCD); LCM has none."""
        return None
