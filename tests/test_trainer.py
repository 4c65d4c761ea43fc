"""Trainer, run config and checkpoints, on a self-contained stand-in objective (no diffusers models involved)."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stepdistill.objectives.base import Objective
from stepdistill.training import (
    ConfigError,
    RunConfig,
    Trainer,
    TrainingDiverged,
    find_resume_checkpoint,
    latest_checkpoint,
    load_recipe,
)
from stepdistill.training.checkpoint import MARKER_FILE, CheckpointError

from helpers import REPO, reset_accelerate_state

LATENT = (2, 4, 4)
D = 2 * 4 * 4


# --- stand-ins for Teacher / PromptEmbeds / Generator / Objective ---------------------------------------------------
class _Embeds:
    """The part of PromptEmbeds the trainer and this objective use."""

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> None:
        self.cond, self.uncond = cond, uncond

    def to(self, device=None, dtype=None) -> "_Embeds":
        return _Embeds(self.cond.to(device=device, dtype=dtype),
                       None if self.uncond is None else self.uncond.to(device=device, dtype=dtype))

    def __len__(self) -> int:
        return len(self.cond)


class _TinyTeacher:
    latent_shape = LATENT

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def to(self, device=None, dtype=None):
        self.device = torch.device(device)
        return self

    def encode_prompt(self, prompts, negative_prompts=None, with_uncond=True) -> _Embeds:
        rows = [[len(p) / 20.0, (sum(map(ord, p)) % 97) / 97.0] for p in prompts]
        cond = torch.tensor(rows, device=self.device).unsqueeze(1)
        return _Embeds(cond, torch.zeros_like(cond) if with_uncond else None)


class _TinyGenerator(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(D + 2, D)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, noise, embeds, step_index: int = 0, x_t=None):
        x = torch.cat([noise.flatten(1), embeds.cond[:, 0]], dim=1)
        return self.net(x).view_as(noise)


class _QuadraticObjective(Objective):
    """Generator: pull x0 towards a fixed target (random per-sample weights from the global RNG, so resume exactness
    also tests the RNG state restore) plus a small pull towards the auxiliary ``center`` (used, detached).
    Auxiliary: move ``center`` to the mean generated sample (generator run without grad)."""

    name = "quadratic"

    def __init__(self, teacher, generator, ratio: int = 1, nan_at_gen_call: int | None = None,
                 crash_at_gen_call: int | None = None) -> None:
        torch.nn.Module.__init__(self)  # the tiny teacher has no noise schedule to validate a config against
        self.config = {}
        object.__setattr__(self, "teacher", teacher)  # plain attributes, as objectives/base.py does
        object.__setattr__(self, "generator", generator)
        self.aux_updates_per_generator_update = ratio
        self.center = torch.nn.Parameter(torch.zeros(D))
        self.register_buffer("target", torch.linspace(-1, 1, D))
        self.gen_calls = 0
        self.aux_calls = 0
        self.nan_at_gen_call = nan_at_gen_call
        self.crash_at_gen_call = crash_at_gen_call

    def auxiliary_parameters(self):
        return {"center": [self.center]}

    def generator_loss(self, batch):
        self.gen_calls += 1
        if self.crash_at_gen_call == self.gen_calls:
            raise KeyboardInterrupt("simulated crash")
        x0 = self.generator(batch.noise, batch.embeds).flatten(1)
        w = 1.0 + torch.rand(x0.shape[0], 1, device=x0.device)
        loss = (w * (x0 - self.target) ** 2).mean() + 0.1 * ((x0 - self.center.detach()) ** 2).mean()
        if self.nan_at_gen_call == self.gen_calls:
            loss = loss * float("nan")
        return loss, {"x0_mean": float(x0.detach().mean())}

    def auxiliary_loss(self, batch):
        self.aux_calls += 1
        with torch.no_grad():
            x0 = self.generator(batch.noise, batch.embeds).flatten(1)
        loss = ((self.center - x0.mean(0)) ** 2).mean()
        return loss, {"center_norm": float(self.center.detach().norm())}


def _build(tmp: Path, seed: int = 0, ratio: int = 1, **objective_kwargs):
    torch.manual_seed(seed)
    teacher = _TinyTeacher()
    generator = _TinyGenerator()
    objective = _QuadraticObjective(teacher, generator, ratio=ratio, **objective_kwargs)
    return teacher, generator, objective


def _config(**train) -> RunConfig:
    base = dict(batch_size=4, max_steps=6, grad_accum=1, grad_clip=1.0, checkpoint_every=0, log_every=1, seed=3)
    base.update(train)
    return RunConfig.from_dict({
        "objective": "quadratic",
        "optimizer": {"generator_lr": 0.05, "aux_lr": 0.1, "betas": [0.9, 0.99], "weight_decay": 0.0},
        "train": base,
        "prompts": {"source": "toy"},
    })


PROMPTS = ["a red circle", "a blue square on a green background", "a small triangle"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    yield


def _params(generator, objective) -> dict[str, torch.Tensor]:
    out = {f"g.{k}": v.detach().clone() for k, v in generator.state_dict().items()}
    out["center"] = objective.center.detach().clone()
    return out


# --- config --------------------------------------------------------------------------------------------------------
def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(
    "body, key",
    [
        ("objective: dmd2\ntrain: {batch_size: 0}\n", "train.batch_size"),
        ("objective: dmd2\ntrain: {max_steps: -5}\n", "train.max_steps"),
        ("objective: dmd2\ntrain: {bogus: 1}\n", "train.bogus"),
        ("objective: dmd2\nextra_section: {}\n", "extra_section"),
        ("objective: dmd2\ngenerator: {timesteps: [999, 1200]}\n", "generator.timesteps[1]"),
        ("objective: dmd2\ngenerator: {timesteps: [499, 999]}\n", "generator.timesteps[1]"),
        ("objective: dmd2\ngenerator: {lora_rank: four}\n", "generator.lora_rank"),
        ("objective: dmd2\noptimizer: {generator_lr: 0}\n", "optimizer.generator_lr"),
        ("objective: dmd2\noptimizer: {aux_lr: -1.0e-4}\n", "optimizer.aux_lr"),
        ("objective: dmd2\noptimizer: {betas: [0.9]}\n", "optimizer.betas"),
        ("objective: dmd2\ntrain: {mixed_precision: fp8}\n", "train.mixed_precision"),
        ("objective: dmd2\ntrain: {gradient_checkpointing: 1}\n", "train.gradient_checkpointing"),
        ("objective: dmd2\ntrain: {ema_decay: 1.5}\n", "train.ema_decay"),
        ("objective: dmd2\nprompts: {source: prompts.csv}\n", "prompts.source"),
        ("train: {max_steps: 3}\n", "objective"),
    ],
)
def test_config_errors_name_key_and_file(tmp_path, body, key):
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert info.value.key == key
    assert key in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_config_loads_with_overrides(tmp_path):
    path = _write(tmp_path, """
        objective: dmd2
        generator: {timesteps: [999, 749, 499, 249], lora_rank: 8}
        optimizer: {generator_lr: 1e-5, betas: [0.0, 0.99]}   # YAML 1.1 reads 1e-5 as a string; accepted for floats
        train: {batch_size: 2, ema_decay: 0.99}
        objective_config: {real_guidance_scale: 3.0}
        prompts: toy
    """)
    cfg = load_recipe(path, ["train.max_steps=7", "objective_config.fake_lora_rank=4", "generator.timesteps=[999]",
                             "train.grad_clip=null"])
    assert cfg.generator.timesteps == [999] and cfg.generator.lora_rank == 8
    assert cfg.optimizer.generator_lr == 1e-5 and cfg.optimizer.betas == (0.0, 0.99)
    assert cfg.train.max_steps == 7 and cfg.train.batch_size == 2 and cfg.train.grad_clip is None
    assert cfg.objective_config == {"real_guidance_scale": 3.0, "fake_lora_rank": 4}
    assert cfg.prompts.source == "toy"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg  # round trip
    with pytest.raises(ConfigError) as info:
        load_recipe(path, ["train.batch_size=0"])
    assert info.value.key == "train.batch_size" and "override" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_recipe(path, ["train.nope=1"])
    assert info.value.key == "train.nope"


def test_accelerate_config_files_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.name for p in (REPO / "training" / "accelerate").glob("*.yaml")}
    assert {"cpu.yaml", "single_gpu.yaml", "ddp.yaml", "fsdp.yaml", "deepspeed.yaml"} <= names
    for name in sorted(names):
        cfg = load_config_from_file(str(REPO / "training" / "accelerate" / name))
        assert cfg.num_processes >= 1, name


# --- training ------------------------------------------------------------------------------------------------------
def test_training_decreases_loss_logs_and_samples(tmp_path):
    from PIL import Image

    teacher, generator, objective = _build(tmp_path)
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(16, *LATENT, generator=g)
    embeds = teacher.encode_prompt(PROMPTS * 5 + ["x"])

    def eval_loss():
        with torch.no_grad():
            return float(((generator(noise, embeds).flatten(1) - objective.target) ** 2).mean())

    before = eval_loss()
    calls = []

    def sample_fn(gen, step):
        calls.append(step)
        return Image.new("RGB", (8, 8), (step, 0, 0))

    cfg = _config(max_steps=24, log_every=4, sample_every=12, ema_decay=0.9)
    summary = Trainer(cfg, teacher, generator, objective, PROMPTS, tmp_path / "run", sample_fn=sample_fn).train()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)
    assert summary["steps"] == 24 and summary["steps_this_run"] == 24
    assert summary["steps_per_s"] > 0 and summary["peak_memory_bytes"] > 0

    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16, 20, 24]
    for key in ("loss/generator", "loss/aux", "grad_norm/generator", "grad_norm/center", "gen/x0_mean", "aux/center_norm"):
        assert rows[-1][key] != "", key
    assert float(rows[-1]["loss/generator"]) < float(rows[0]["loss/generator"])
    assert list((tmp_path / "run" / "logs" / "tensorboard").rglob("events.out.tfevents*"))
    # the main process sampled with the raw and the EMA weights
    assert calls == [12, 12, 24, 24]
    assert (tmp_path / "run" / "samples" / "step_000012.png").is_file()
    assert (tmp_path / "run" / "samples" / "step_000024_ema.png").is_file()
    assert json.loads((tmp_path / "run" / "logs" / "summary.json").read_text())["steps"] == 24


def test_update_ratio_and_grad_accum(tmp_path):
    teacher, generator, objective = _build(tmp_path, ratio=3)
    trainer = Trainer(_config(max_steps=4, grad_accum=2), teacher, generator, objective, PROMPTS, tmp_path / "run")
    trainer.train()
    assert objective.aux_calls == 4 * 3 * 2  # steps × ratio × micro-batches
    assert objective.gen_calls == 4 * 2
    # one optimizer step per update, not per micro-batch
    assert int(trainer.gen_opt.state[objective.generator.net.weight]["step"]) == 4
    assert int(trainer.aux_opts["center"].state[objective.center]["step"]) == 12


def test_auxiliary_updates_skipped_while_objective_says_so(tmp_path):
    """An objective with ``auxiliary_active()`` False (DMD's ODE-pair warm-up) gets no auxiliary updates for those
    steps; the trainer tells it the step through ``set_train_step`` before each update."""
    teacher, generator, objective = _build(tmp_path, ratio=2)
    seen = []
    objective.set_train_step = lambda step: seen.append(step)
    objective.auxiliary_active = lambda: len(seen) > 0 and seen[-1] >= 3
    trainer = Trainer(_config(max_steps=5), teacher, generator, objective, PROMPTS, tmp_path / "run")
    trainer.train()
    assert seen == [0, 1, 2, 3, 4]
    assert objective.gen_calls == 5 and objective.aux_calls == 2 * 2  # aux only at steps 3 and 4


def test_objective_clip_by_value_reaches_its_group_only(tmp_path):
    """``grad_clip_values()`` (SiDA clips the fake score's gradients by value at 1) clips that auxiliary group's
    gradients element-wise before its optimizer steps, and leaves the generator's alone."""
    teacher, generator, objective = _build(tmp_path)
    objective.grad_clip_values = lambda: {"center": 1e-3}
    trainer = Trainer(_config(max_steps=2, grad_clip=None), teacher, generator, objective, PROMPTS, tmp_path / "run")
    seen = {}
    for name, opt in [("center", trainer.aux_opts["center"]), ("generator", trainer.gen_opt)]:
        inner = opt.optimizer
        original = inner.step

        def step(*args, _name=name, _inner=inner, _original=original, **kwargs):
            grads = [p.grad.abs().max() for g in _inner.param_groups for p in g["params"] if p.grad is not None]
            seen.setdefault(_name, []).append(float(max(grads)))
            return _original(*args, **kwargs)

        inner.step = step
    trainer.train()
    assert seen["center"] and max(seen["center"]) == pytest.approx(1e-3)  # float32 1e-3, reached (clipped)
    assert max(seen["generator"]) > 1e-3  # not clipped


def test_warmup_generator_lr_applies_only_during_the_warmup(tmp_path):
    teacher, generator, objective = _build(tmp_path)
    steps = []
    objective.set_train_step = lambda step: steps.append(step)
    objective.in_ode_warmup = lambda: steps[-1] < 2
    config = _config(max_steps=4)
    config.optimizer.warmup_generator_lr = 0.2
    Trainer(config, teacher, generator, objective, PROMPTS, tmp_path / "run").train()
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    assert [float(r["lr/generator"]) for r in rows] == [0.2, 0.2, 0.05, 0.05]
    with pytest.raises(ConfigError, match="warmup_generator_lr"):
        RunConfig.from_dict({"objective": "x", "optimizer": {"warmup_generator_lr": 0}})


def test_resume_is_exact_and_ignores_interrupted_writes(tmp_path):
    cfg = _config(max_steps=6, checkpoint_every=3, grad_accum=2, ema_decay=0.8, keep_checkpoints=5)

    # uninterrupted reference
    teacher, generator, objective = _build(tmp_path, ratio=2)
    ref_trainer = Trainer(cfg, teacher, generator, objective, PROMPTS, tmp_path / "ref")
    ref_trainer.train()
    ref = _params(generator, objective)
    ref_ema = [p.clone() for p in ref_trainer.ema.shadow_params]

    # a run that crashes in step 5 (its first generator micro-batch); its last checkpoint is step 3
    teacher, generator, objective = _build(tmp_path, ratio=2, crash_at_gen_call=2 * 4 + 1)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, teacher, generator, objective, PROMPTS, tmp_path / "run").train()
    ckpts = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(ckpts).name == "step_000003"
    # leftovers of an interrupted checkpoint write must be ignored
    (ckpts / ".tmp_step_000006").mkdir()
    (ckpts / ".tmp_step_000006" / "garbage.bin").write_bytes(b"\0" * 10)
    (ckpts / "step_000005").mkdir()  # no marker: incomplete

    # a fresh process would rebuild everything from scratch (different init seed on purpose) and resume
    reset_accelerate_state()
    teacher, generator, objective = _build(tmp_path, seed=99, ratio=2)
    trainer = Trainer(cfg, teacher, generator, objective, PROMPTS, tmp_path / "run")
    summary = trainer.train(resume="latest")
    assert summary["start_step"] == 3 and summary["steps"] == 6
    assert summary["resumed_from"].endswith("step_000003")
    got = _params(generator, objective)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0, msg=f"parameter {k} differs after resume")
    for a, b in zip(trainer.ema.shadow_params, ref_ema):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # the CSV keeps steps 1-3 of the first attempt and 4-6 of the resumed one, once each
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert not (ckpts / ".tmp_step_000006").exists()  # cleaned once a newer checkpoint was written
    assert latest_checkpoint(ckpts).name == "step_000006"


def test_nan_loss_stops_without_checkpointing_the_bad_state(tmp_path):
    cfg = _config(max_steps=6, checkpoint_every=2, ema_decay=0.9)
    teacher, generator, objective = _build(tmp_path, nan_at_gen_call=3)
    with pytest.raises(TrainingDiverged) as info:
        Trainer(cfg, teacher, generator, objective, PROMPTS, tmp_path / "run").train()
    err = info.value
    assert err.step == 3 and "generator loss" in str(err) and "step 3" in str(err)
    assert err.last_checkpoint and err.last_checkpoint.endswith("step_000002")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002"]
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    assert all(torch.isfinite(p).all() for p in generator.parameters())

    reset_accelerate_state()
    teacher, generator, objective = _build(tmp_path)
    trainer = Trainer(cfg, teacher, generator, objective, PROMPTS, tmp_path / "run")
    assert trainer.load_checkpoint(ckpts / "step_000002").name == "step_000002"
    assert trainer.state.step == 2 and trainer.ema.optimization_step == 2
    assert all(torch.isfinite(p).all() for p in generator.parameters())


def test_latest_checkpoint_skips_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step_000002", True), ("step_000004", True), ("step_000006", False)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / MARKER_FILE).write_text("{}")
    (root / ".tmp_step_000008").mkdir()
    assert latest_checkpoint(root).name == "step_000004"  # no pointer: highest complete
    (root / "latest").write_text("step_000002\n")
    assert latest_checkpoint(root).name == "step_000002"  # the pointer wins when it is complete
    (root / "latest").write_text("step_000006\n")
    assert latest_checkpoint(root).name == "step_000004"  # a pointer to an incomplete folder is not trusted


def test_find_resume_checkpoint_reads_latest_names_and_paths(tmp_path, monkeypatch):
    root = tmp_path / "run" / "checkpoints"
    for name in ("step_000002", "step_000004"):
        (root / name).mkdir(parents=True)
        (root / name / MARKER_FILE).write_text("{}")
    monkeypatch.chdir(tmp_path)  # a bare name is looked up in the run's checkpoints, not the working directory
    assert find_resume_checkpoint(root, "latest") == root / "step_000004"
    assert find_resume_checkpoint(root, "step_000002") == root / "step_000002"
    assert find_resume_checkpoint(root, tmp_path / "run") == root / "step_000004"  # a run folder: its newest
    assert find_resume_checkpoint(tmp_path / "empty", "latest") is None
    with pytest.raises(CheckpointError, match="step_000009"):
        find_resume_checkpoint(root, "step_000009")


def test_xformers_missing_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    teacher, generator, objective = _build(tmp_path)
    with pytest.raises(RuntimeError, match="xformers"):
        Trainer(_config(attention="xformers"), teacher, generator, objective, PROMPTS, tmp_path / "run")


# --- two processes -------------------------------------------------------------------------------------------------
_DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
from test_trainer import _build, _config, PROMPTS
from stepdistill.training import Trainer

out = sys.argv[1]
teacher, generator, objective = _build(None, ratio=2)
trainer = Trainer(_config(max_steps=3, checkpoint_every=3, grad_accum=2), teacher, generator, objective, PROMPTS, out)
summary = trainer.train()
acc = trainer.accelerator
flat = torch.cat([p.detach().flatten() for p in list(generator.parameters()) + [objective.center]])
with open(f"{{out}}/rank{{acc.process_index}}.json", "w") as f:
    json.dump({{"num_processes": acc.num_processes, "type": str(acc.distributed_type), "steps": summary["steps"],
               "params": flat.tolist(), "gen_calls": objective.gen_calls, "aux_calls": objective.aux_calls}}, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_with_accelerate_launch(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(REPO / "tests")))
    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    accelerate = Path(sys.executable).with_name("accelerate")
    # `accelerate launch --cpu` alone starts ONE process unless mpirun is used; the torchrun-based launcher plus
    # ACCELERATE_USE_CPU gives two gloo processes (distributed_type MULTI_CPU).
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(script), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["num_processes"] == 2 and "MULTI_CPU" in r["type"] and r["steps"] == 3 for r in ranks)
    assert ranks[0]["gen_calls"] == ranks[1]["gen_calls"] == 3 * 2 and ranks[0]["aux_calls"] == 3 * 2 * 2
    # gradients were all-reduced: both replicas hold the same weights
    assert torch.allclose(torch.tensor(ranks[0]["params"]), torch.tensor(ranks[1]["params"]), atol=1e-6, rtol=0)
    ckpt = out / "checkpoints" / "step_000003"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()


def test_halflife_ema_follows_the_edm_and_official_sid_formula():
    """NVlabs/edm training_loop.py (and SiD-LSG sid_training_loop.py 553-563), written out here step by step:
    h = min(halflife_kimg·1000, cur_nimg·rampup); β = 0.5^(batch/max(h, 1e-8)); ema = θ.lerp(ema, β); cur_nimg += batch."""
    from stepdistill.models.ema import HalflifeEMA

    param = torch.nn.Parameter(torch.zeros(3))
    ema = HalflifeEMA([param], halflife_kimg=0.2, rampup_ratio=0.05, images_per_update=8)
    expected, cur_nimg = torch.zeros(3), 0
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        with torch.no_grad():
            param.add_(torch.randn(3, generator=g))
        ema.step()
        h = min(0.2 * 1000, cur_nimg * 0.05)
        beta = 0.5 ** (8 / max(h, 1e-8))
        expected = param.detach().lerp(expected, beta)
        cur_nimg += 8
        torch.testing.assert_close(ema.shadow_params[0], expected)
    assert ema.decay == pytest.approx(0.5 ** (8 / min(200, 320 * 0.05)))
    # the state round-trips through a checkpoint
    again = HalflifeEMA([param], halflife_kimg=0.2, rampup_ratio=0.05, images_per_update=8)
    again.load_state_dict(ema.state_dict())
    assert again.optimization_step == 40 and torch.equal(again.shadow_params[0], ema.shadow_params[0])


def test_ema_forms_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="two forms of the EMA"):
        RunConfig.from_dict({"objective": "dmd2", "train": {"ema_decay": 0.99, "ema_halflife_kimg": 50}})
    with pytest.raises(ConfigError, match="ema_rampup_ratio"):
        RunConfig.from_dict({"objective": "dmd2", "train": {"ema_rampup_ratio": 0.05}})
