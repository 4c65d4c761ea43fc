"""FSDP2 with two CPU processes (gloo): a toy-dmd2 run (generator + fake score, each sharded as its own FSDP module
with its own optimizer) checkpoints sharded at step 2, resumes to step 4 and equals an uninterrupted 4-step run.
How FSDP reaches the CPU at all is in stepdistill/training/fsdp.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import FAST, RECIPE, REPO

_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from helpers import FAST, RECIPE
from stepdistill.workflows.distill import distill

spec, out, steps, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
summary = distill(spec, RECIPE, out, overrides=[*FAST, f"train.max_steps={{steps}}"],
                  resume=None if resume == "none" else resume, export=False, log=lambda *a: None)
assert summary["num_processes"] == 2 and summary["steps"] == steps, summary
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, *args: str) -> None:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "training" / "accelerate" / "fsdp-cpu.yaml"),
           "--main_process_port", str(_free_port()), str(script), *args]
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "stepdistill enabled it (FSDP2 over gloo, 2 processes)" in proc.stderr, proc.stderr[-3000:]


def _sharded(path: Path, tmp: Path) -> dict:
    """A torch.distributed.checkpoint folder read back whole in this (single, unlaunched) process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / (path.parent.parent.parent.name + "_" + path.parent.name + "_" + path.name + ".pt")
    dcp_to_torch_save(str(path), str(target))
    return torch.load(target, map_location="cpu", weights_only=False)


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}{k}/")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}{i}/")
    else:
        yield prefix.rstrip("/"), obj


def _same(a, b, what: str) -> None:
    fa, fb = dict(_flat(a)), dict(_flat(b))
    assert fa.keys() == fb.keys(), what
    for k in fa:
        if torch.is_tensor(fa[k]):
            assert torch.equal(fa[k], fb[k]), f"{what}: {k} differs"
        else:
            assert fa[k] == fb[k], f"{what}: {k} differs ({fa[k]!r} vs {fb[k]!r})"


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_checkpoints_sharded_and_resumes_exactly(tmp_path):
    from tiny_models import make_tiny_teacher_spec

    spec = make_tiny_teacher_spec(tmp_path)
    script = tmp_path / "fsdp_run.py"
    script.write_text(_SCRIPT.format(tests=str(REPO / "tests")))
    _launch(script, str(spec), str(tmp_path / "full"), "4", "none")  # uninterrupted
    _launch(script, str(spec), str(tmp_path / "split"), "2", "none")  # stops (and checkpoints) at step 2
    _launch(script, str(spec), str(tmp_path / "split"), "4", "latest")  # a fresh launch resumes to step 4

    full, split = (tmp_path / name / "checkpoints" / "step_000004" for name in ("full", "split"))
    # sharded: one DCP folder per network and per optimizer (generator 0, fake score 1), one file per process
    for ckpt in (full, split):
        for folder in ("pytorch_model_fsdp_0", "pytorch_model_fsdp_1", "optimizer_0", "optimizer_1"):
            assert sorted(p.name for p in (ckpt / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert not (ckpt / "trainable_state.pt").exists()
    for folder in ("pytorch_model_fsdp_0", "pytorch_model_fsdp_1", "optimizer_0", "optimizer_1"):
        _same(_sharded(full / folder, tmp_path), _sharded(split / folder, tmp_path), folder)
    # the step counter and the generator's EMA (custom objects 0 and 1, whole tensors)
    for i in (0, 1):
        a = torch.load(full / f"custom_checkpoint_{i}.pkl", map_location="cpu", weights_only=False)
        b = torch.load(split / f"custom_checkpoint_{i}.pkl", map_location="cpu", weights_only=False)
        _same(a, b, f"custom_checkpoint_{i}")
    ema = torch.load(full / "custom_checkpoint_1.pkl", map_location="cpu", weights_only=False)
    gen = _sharded(full / "pytorch_model_fsdp_0", tmp_path)
    assert all(type(t) is torch.Tensor for t in ema["shadow_params"])  # gathered, not one process's shard
    assert sum(t.numel() for t in ema["shadow_params"]) == sum(
        t.numel() for k, t in dict(_flat(gen)).items() if torch.is_tensor(t))
