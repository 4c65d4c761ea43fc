"""Teacher score matching (TSM): the first stage of MSD's *smaller* students (Song et al. 2024, arXiv:2410.23274, §3.3;
no code released).

A student narrower than the teacher cannot inherit its weights, so it is first trained to be a small copy of the
teacher's denoiser on its own prompts — regress the teacher's output on noisy inputs::

    x_t = a_t·x₀ + σ_t·ε,   t ~ U{0 … T−1},   L_TSM(θ) = E ‖ε_θ(x_t, t, c) − ε_teacher(x_t, t, c)‖²

(conditional outputs, no CFG; both ε via ``schedule.to_eps``, so a v-prediction teacher works too). x₀ is what the
caller supplies: real images of the student's prompts where there are any (the toy world), else the teacher's own
ODE samples. Then the student is an ordinary DMD2 generator (DM, then ADM) initialised from this UNet
(``generator.init_unet``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from stepdistill.core.outputs import staged_folder
from stepdistill.models.conditioning import unet_forward


def narrow_unet(teacher_unet: torch.nn.Module, overrides: Mapping[str, Any]) -> torch.nn.Module:
    """A freshly initialised UNet of the teacher's class with ``overrides`` applied to its config (e.g.
    ``{"block_out_channels": [64, 64, 128]}``), float32, trainable."""
    config = dict(teacher_unet.config)
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"student_unet: {unknown[0]!r} is not a key of the teacher UNet's config "
                         f"({type(teacher_unet).__name__}); known keys include block_out_channels, layers_per_block")
    config.update(overrides)
    try:
        unet = type(teacher_unet).from_config(config)
    except Exception as e:  # diffusers raises ValueError/AssertionError/RuntimeError for inconsistent configs
        raise ValueError(f"student_unet {dict(overrides)} does not make a valid {type(teacher_unet).__name__}: {e}. "
                         "block_out_channels must be divisible by norm_num_groups and by the attention heads") from None
    return unet.float().train().requires_grad_(True)


def tsm_loss(student_unet: torch.nn.Module, teacher, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             embeds) -> torch.Tensor:
    """L_TSM = mean ‖ε_θ(x_t, t, c) − sg(ε_teacher(x_t, t, c))‖², x_t = a_t·x₀ + σ_t·ε (see the module docstring)."""
    schedule = teacher.schedule
    x_t = schedule.add_noise(x0, noise, t)
    with torch.no_grad():
        target = teacher.predict_eps(x_t.to(teacher.dtype), t, embeds).float()
    pred = schedule.to_eps(unet_forward(student_unet, x_t, schedule.model_timestep(t), embeds.to(dtype=torch.float32)).float(),
                           x_t, t)
    return torch.mean((pred - target) ** 2)


def train_tsm(teacher, student_unet: torch.nn.Module, prompts, x0_source: Callable[[int, torch.Generator], Any],
              out_dir: str | Path, steps: int, batch_size: int, lr: float, seed: int = 0,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``steps`` AdamW updates of :func:`tsm_loss` and save the UNet to ``out_dir`` (diffusers folder, with
    ``tsm_summary.json``). ``x0_source(n, rng)`` returns ``(latents, prompts)``; the prompts are encoded by the teacher.
    The UNet is saved only at the end: an interrupted TSM stage is redone (it is minutes, not hours, at these sizes)."""
    from tqdm.auto import tqdm

    device = teacher.device
    student_unet.to(device)
    opt = torch.optim.AdamW(student_unet.parameters(), lr=lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.time()
    bar = tqdm(range(steps), desc="TSM", leave=False)
    for _ in bar:
        x0, batch_prompts = x0_source(batch_size, rng)
        embeds = teacher.encode_prompt(list(batch_prompts), with_uncond=False)
        noise = torch.randn(x0.shape, generator=rng).to(device)
        t = torch.randint(0, teacher.schedule.num_train_timesteps, (x0.shape[0],), generator=rng).to(device)
        loss = tsm_loss(student_unet, teacher, x0.to(device).float(), noise, t, embeds)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"TSM loss is {loss.item()} at step {len(losses)}: lower multi_student.tsm.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student_unet.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    tail = losses[-max(1, steps // 10):]
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "seconds": round(time.time() - t0, 1),
               "first_loss": losses[0] if losses else None, "final_loss_mean_last_10pct": sum(tail) / len(tail),
               "parameters": sum(p.numel() for p in student_unet.parameters())}
    with staged_folder(out_dir, "the TSM student UNet") as tmp:
        student_unet.save_pretrained(tmp, safe_serialization=True)
        (tmp / "tsm_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"[msd] TSM: {steps} updates in {summary['seconds']} s, loss {summary['first_loss']:.4f} -> "
        f"{summary['final_loss_mean_last_10pct']:.4f} ({summary['parameters']:,} parameters)")
    return summary
