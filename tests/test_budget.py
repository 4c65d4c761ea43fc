"""The training budget: FLOPs counted by the trainer (stepdistill.training.flops), checked against counts made by hand,
the run ending at the budget, the marks kept and a killed run resuming with the same count."""

from __future__ import annotations

import json

import pytest
import torch

from stepdistill.training import ConfigError, Trainer
from stepdistill.training.checkpoint import list_checkpoints
from stepdistill.training.flops import FlopMeter, format_flops

from test_trainer import D, PROMPTS, _build, _config


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    yield


def _hand_count_per_update(batch: int, ratio: int = 1) -> int:
    """The stand-in run's FLOPs per update, by hand. Its only matrix product is the generator's Linear(D + 2 -> D):
    2·B·(D + 2)·D FLOPs per forward (one multiply and one add per term). A generator update runs it forward and, for
    the backward, once more for the weight gradient (its input, noise and prompt rows, needs no gradient, so no input
    gradient is computed); each auxiliary update runs it forward once, without gradient."""
    product = 2 * batch * (D + 2) * D
    return 2 * product + ratio * product


def test_cpu_attention_counts_as_torch_counts_gpu_attention():
    """softmax(QKᵀ)V on (b, h, s, d): two products of 2·b·h·s·s·d FLOPs forward; the backward recomputes QKᵀ and
    forms the gradients of the scores, V, Q and K (five such products). torch's table misses the CPU kernel."""
    b, h, s, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    meter = FlopMeter()
    with meter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert meter.total == 2 * (2 * b * h * s * s * d)
    with meter:
        out.sum().backward()
    assert meter.total == 7 * (2 * b * h * s * s * d)
    off = FlopMeter(enabled=False)
    with off:
        torch.randn(4, 4) @ torch.randn(4, 4)
    assert off.total == 0
    assert format_flops(1.234e13) == "12.3 TFLOP" and format_flops(512) == "512 FLOP"


@pytest.mark.parametrize("ratio", [1, 2])
def test_trainer_counts_the_hand_counted_flops(tmp_path, ratio):
    teacher, generator, objective = _build(tmp_path, ratio=ratio)
    cfg = _config(max_steps=3, batch_size=4, count_flops=True)
    summary = Trainer(cfg, teacher, generator, objective, PROMPTS, tmp_path / "run").train()
    assert summary["training_flops"] == 3 * _hand_count_per_update(4, ratio)
    assert summary["aux_updates_per_generator_update"] == ratio  # what distill-cost reports as fake updates / step
    teacher, generator, objective = _build(tmp_path, ratio=ratio)
    plain = Trainer(_config(max_steps=3), teacher, generator, objective, PROMPTS, tmp_path / "plain").train()
    assert plain["training_flops"] is None  # counted only when asked


def test_budget_ends_the_run_and_keeps_its_marks(tmp_path):
    per_update = _hand_count_per_update(4)
    budget = 5 * per_update  # reached exactly at the end of update 5
    cfg = _config(max_steps=1000, batch_size=4, budget_flops=budget, budget_marks=[0.25, 0.5], checkpoint_every=1,
                  keep_checkpoints=1)
    teacher, generator, objective = _build(tmp_path)
    run = tmp_path / "run"
    summary = Trainer(cfg, teacher, generator, objective, PROMPTS, run, setup_flops=0).train()
    assert summary["steps"] == 5 and summary["training_flops"] == budget
    # 0.25 of the budget is 1.25 updates' worth: reached after update 2; 0.5 (2.5 updates) after update 3
    marks = json.loads((run / "logs" / "budget_marks.json").read_text())["marks"]
    assert [(m["fraction"], m["step"], m["flops"]) for m in marks] == [
        (0.25, 2, 2 * per_update), (0.5, 3, 3 * per_update), (1.0, 5, budget)]
    assert [m["checkpoint"] for m in marks] == ["step_000002", "step_000003", "step_000005"]
    # the marks survive pruning to one checkpoint; the periodic ones do not
    assert [p.name for _, p in list_checkpoints(run / "checkpoints")] == ["step_000002", "step_000003", "step_000005"]


def test_setup_flops_start_the_count_and_a_killed_run_resumes_with_it(tmp_path):
    per_update = _hand_count_per_update(4)
    setup = 12345
    budget = setup + 4 * per_update
    cfg = _config(max_steps=1000, batch_size=4, budget_flops=budget, budget_marks=[0.5], checkpoint_every=1)
    teacher, generator, objective = _build(tmp_path, crash_at_gen_call=3)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, teacher, generator, objective, PROMPTS, run, setup_flops=setup).train()
    # killed in update 3, after the 0.5 mark (setup + 2 updates >= budget / 2) was written
    teacher, generator, objective = _build(tmp_path)
    summary = Trainer(cfg, teacher, generator, objective, PROMPTS, run, setup_flops=setup).train(resume="latest")
    assert summary["start_step"] == 2 and summary["steps"] == 4
    assert summary["training_flops"] == budget and summary["training_flops_this_run"] == 2 * per_update
    fractions = [(m["fraction"], m["step"]) for m in summary["budget_marks"]]
    assert fractions == [(0.5, 2), (1.0, 4)]


@pytest.mark.parametrize("train, key", [
    ({"budget_flops": 0}, "train.budget_flops"),
    ({"budget_marks": [0.5]}, "train.budget_marks"),
    ({"budget_flops": 1e9, "budget_marks": [0.5, 0.25]}, "train.budget_marks[1]"),
    ({"budget_flops": 1e9, "budget_marks": [1.0]}, "train.budget_marks[0]"),
])
def test_budget_config_errors(train, key):
    with pytest.raises(ConfigError) as info:
        _config(**train)
    assert info.value.key == key


@pytest.mark.parametrize("minutes, kept", [(1e-9, ["step_000001", "step_000002", "step_000003", "step_000004"]),
                                           (1000.0, ["step_000004"])])
def test_checkpoint_minutes_keeps_a_checkpoint_once_that_much_time_passed(tmp_path, minutes, kept):
    # no checkpoints by update count: a tiny interval is due after every update, a long one never before the end
    cfg = _config(max_steps=4, batch_size=4, checkpoint_every=0, checkpoint_minutes=minutes, keep_checkpoints=10)
    teacher, generator, objective = _build(tmp_path)
    Trainer(cfg, teacher, generator, objective, PROMPTS, tmp_path / "run").train()
    assert [p.name for _, p in list_checkpoints(tmp_path / "run" / "checkpoints")] == kept


@pytest.mark.parametrize("value", [0, -1.0])
def test_checkpoint_minutes_must_be_positive(value):
    with pytest.raises(ConfigError) as info:
        _config(checkpoint_minutes=value)
    assert info.value.key == "train.checkpoint_minutes"
