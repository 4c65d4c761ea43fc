"""Small helpers several test files share (fixtures are in conftest.py, model builders in tiny_models.py, the
plain-diffusers subprocess in plain_diffusers.py): the CLI in a subprocess as a user runs it and its one-line errors,
the recipe and overrides that keep a distill run on the tiny teacher short, accelerate's process-wide state, and the
trainable states a run folder holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "training" / "toy-dmd2.yaml"
# a short toy-dmd2 run: checkpoints every 2 updates, one fake-score update per generator update, no GAN, no warm-up
FAST = ["train.batch_size=2", "train.sample_every=0", "train.checkpoint_every=2", "train.keep_checkpoints=5",
        "objective_config.aux_updates_per_generator_update=1", "objective_config.gan_enabled=false",
        "objective_config.ode_warmup_steps=0"]
# any recipe, shortened: batch 2, no sample grids, a metrics row per update, one fake-score update per generator update
QUICK = ["train.batch_size=2", "train.sample_every=0", "train.log_every=1", "objective_config.aux_updates_per_generator_update=1"]
# few and short teacher ODE pairs for the recipes that warm up on them, and a one-update warm-up
PAIRS = ["objective_config.regression_pairs=4", "objective_config.regression_steps=2", "objective_config.ode_warmup_steps=1"]


# every recipe family, each with whatever it builds at random (LoRA, GAN head, ...): recipe, overrides
RECIPE_FAMILIES = {
    "dmd": ("toy-dmd.yaml", PAIRS),
    "dmd2-gan": ("toy-dmd2.yaml", PAIRS),
    "dmd2-4step-gan": ("toy-dmd2-4step.yaml", []),
    "vsd-lora-fake-score": ("toy-vsd.yaml", []),
    "pgsb": ("toy-pgsb.yaml", []),
    "sid": ("toy-sid.yaml", []),
    "sid-4step": ("toy-sid-4step.yaml", []),
    "sida-gan": ("toy-sid.yaml", ["objective_config.gan_enabled=true"]),
    "phased-dmd": ("toy-phased-dmd.yaml", ["objective_config.updates_per_phase=1"]),
    "cfg-distill": ("toy-cfg-distill.yaml", []),
    "lora-cfg-distill": ("toy-lora-cfg-distill.yaml", []),
    "disback": ("toy-dmd2.yaml", ["objective_config.gan_enabled=false", "objective_config.ode_warmup_steps=0",
                                  "objective_config.disback=true", "objective_config.disback_nodes=2",
                                  "objective_config.disback_record_updates=2", "objective_config.disback_interval=1"]),
    "msd": ("toy-msd.yaml", PAIRS),
    "lcm": ("toy-lcm.yaml", []),
    "lcm-lora": ("toy-lcm-lora.yaml", []),
    "tcd": ("toy-tcd.yaml", []),
    "lcm-data-free": ("toy-lcm.yaml", ["objective_config.states=teacher_samples", "objective_config.regression_pairs=4",
                                       "objective_config.regression_steps=2"]),
}


def use_random_real_latents(monkeypatch) -> None:
    """A stand-in for the toy world's real images in GAN recipes on tiny teachers (whose VAEs take 16 px images; the
    world draws 32 px ones): seeded random latents of the teacher's latent shape."""
    import torch

    import stepdistill.workflows.single_run as run_module

    def fake_real_latents(teacher, seed=0, prompts=None):
        def source(n, generator):
            chosen = prompts.sample(n, generator) if prompts is not None else ["a red circle"] * n
            return torch.randn((n, *teacher.latent_shape), generator=generator), chosen
        return source

    monkeypatch.setattr(run_module, "toy_real_latents", fake_real_latents)


def cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m stepdistill.cli ARGS`` in a subprocess (offline, without STEPDISTILL_DEBUG), from the repository."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("STEPDISTILL_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "stepdistill.cli", *args], capture_output=True, text=True,
                          cwd=str(cwd or REPO), env=env, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exactly one non-empty line on stderr, holding every needle; returns that line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, as a fresh process would start (each Trainer builds an Accelerator)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def trainable_states(run: Path) -> dict[str, dict]:
    """Every ``trainable_state.pt`` under a run folder, loaded, by its path relative to the run."""
    import torch

    found = {}
    for state in sorted(run.rglob("trainable_state.pt")):
        found[str(state.relative_to(run))] = torch.load(state, map_location="cpu", weights_only=True)
    return found
