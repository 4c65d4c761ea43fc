"""The student and the fake score as two LoRA adapters on the teacher's own network (one frozen base in memory):
the teacher is unchanged outside an adapter's forward, each view computes what an independent LoRA copy computes,
a graph through both views trains both adapters, gradient checkpointing recomputes with the right adapter, and a
DMD2 run and its export work on a flow teacher."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import QUICK, REPO, reset_accelerate_state
from tiny_models import make_tiny_sd3_pipeline

from stepdistill.export import export_student
from stepdistill.models.conditioning import unet_forward
from stepdistill.models.generators import add_lora
from stepdistill.models.shared_base import AdapterView, adapter_checkpointing
from stepdistill.models.teacher import Teacher
from stepdistill.workflows.distill import distill


@pytest.fixture()
def teacher(tmp_path):
    make_tiny_sd3_pipeline(tmp_path / "sd3")
    return Teacher.load(tmp_path / "sd3")


def _randomise(view: AdapterView, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in view.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _two_views(teacher, fake_rank: int = 4, fake_alpha: float | None = None) -> tuple[AdapterView, AdapterView]:
    """The student (rank 4) and the fake score as adapters on the teacher's base, with non-zero random weights."""
    student = AdapterView(teacher.unet, "student", 4)
    fake = AdapterView(teacher.unet, "fake_score", fake_rank, alpha=fake_alpha)
    _randomise(student, 2)
    _randomise(fake, 3)
    return student, fake


def _inputs(teacher):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *teacher.latent_shape, generator=g)
    t = teacher.schedule.model_timestep(torch.tensor([300, 700]))
    return x, t, teacher.encode_prompt(["a red circle", "a blue square"], with_uncond=False)


def test_views_compute_independent_lora_copies_and_leave_the_teacher_alone(teacher):
    x, t, embeds = _inputs(teacher)
    with torch.no_grad():
        before = unet_forward(teacher.unet, x, t, embeds)
    student, fake = _two_views(teacher, fake_rank=2, fake_alpha=4.0)
    assert {n for n, _ in teacher.unet.named_parameters() if "lora" in n} and not list(teacher.unet.parameters())[0].requires_grad
    with torch.no_grad():
        assert torch.equal(unet_forward(teacher.unet, x, t, embeds), before)  # adapters off outside a view
        for view, rank, alpha in ((student, 4, None), (fake, 2, 4.0)):
            copy = teacher.unet.__class__.from_config(teacher.unet.config)
            base = {k.replace("base_layer.", ""): v for k, v in teacher.unet.state_dict().items() if "lora" not in k}
            copy.load_state_dict(base, strict=True)
            add_lora(copy, rank, alpha)
            own = {n.replace(f".{view.adapter_name}.", ".default."): p for n, p in teacher.unet.named_parameters()
                   if f".{view.adapter_name}." in n}
            missing = copy.load_state_dict(own, strict=False)
            assert not missing.unexpected_keys and len(own) == sum("lora" in k for k in copy.state_dict())
            torch.testing.assert_close(unet_forward(view, x, t, embeds), unet_forward(copy, x, t, embeds))
            assert not torch.allclose(unet_forward(view, x, t, embeds), before)
        assert torch.equal(unet_forward(teacher.unet, x, t, embeds), before)


def test_one_graph_through_both_views_trains_both_and_a_frozen_view_stays_frozen(teacher):
    x, t, embeds = _inputs(teacher)
    student, fake = _two_views(teacher)
    y = unet_forward(student, x, t, embeds)
    loss = unet_forward(fake, y, t, embeds).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None for p in fake.parameters())
    assert all(p.grad is None for n, p in teacher.unet.named_parameters() if "lora" not in n)
    student.zero_grad(set_to_none=True)
    fake.zero_grad(set_to_none=True)
    fake.requires_grad_(False)  # as an objective freezes the fake score inside the generator loss
    y = unet_forward(student, x, t, embeds)
    unet_forward(fake, y, t, embeds).square().mean().backward()
    assert all(p.grad is not None for p in student.parameters()) and all(p.grad is None for p in fake.parameters())
    assert not any(p.requires_grad for p in fake.parameters()) and all(p.requires_grad for p in student.parameters())


def test_gradient_checkpointing_recomputes_with_the_adapter_of_the_forward(teacher):
    x, t, embeds = _inputs(teacher)
    student, fake = _two_views(teacher)

    def grads():
        y = unet_forward(student, x, t, embeds)
        loss = unet_forward(fake, y, t, embeds).square().mean()  # backward runs with no adapter active
        g = torch.autograd.grad(loss, list(student.parameters()) + list(fake.parameters()))
        return torch.cat([v.flatten() for v in g])

    plain = grads()
    teacher.unet.train()
    teacher.unet.enable_gradient_checkpointing(adapter_checkpointing(teacher.unet))
    torch.testing.assert_close(grads(), plain, rtol=1e-5, atol=1e-7)


def test_dmd2_with_a_shared_base_trains_and_exports(tmp_path):
    make_tiny_sd3_pipeline(tmp_path / "sd3")
    (tmp_path / "sd3.yaml").write_text(f"teacher: {tmp_path / 'sd3'}\ndtype: float32\n")
    reset_accelerate_state()
    try:
        summary = distill(tmp_path / "sd3.yaml", REPO / "training" / "toy-dmd2-4step.yaml", tmp_path / "run",
                          overrides=[*QUICK, "objective_config.gan_enabled=false", "generator.lora_rank=4",
                                     "generator.share_teacher_base=true", "objective_config.fake_lora_rank=4",
                                     "train.max_steps=2", "train.checkpoint_every=2", "train.gradient_checkpointing=true"],
                          export=True, log=lambda *a: None)
    finally:
        reset_accelerate_state()
    assert summary["steps"] == 2
    state = torch.load(next((tmp_path / "run").rglob("trainable_state.pt")), weights_only=True)
    # the checkpoint holds the two adapters and nothing of the frozen base
    nets = {k for k in state if k.startswith(("generator.", "objective."))}
    assert nets and all("lora_" in k for k in nets)
    assert any("__student__" in k for k in nets) and any("__fake_score__" in k for k in nets)
    info = json.loads((tmp_path / "run" / "student" / "stepdistill_export.json").read_text())
    assert info["lora"] and info["lora_file"] == "pytorch_lora_weights.safetensors"


def test_a_standalone_copy_computes_what_its_view_computes(teacher):
    """What export saves of a shared-base student: a copy of the base with that adapter only, active."""
    x, t, embeds = _inputs(teacher)
    with torch.no_grad():
        before = unet_forward(teacher.unet, x, t, embeds)
    student, fake = _two_views(teacher)
    copy = student.standalone()
    assert set(copy.peft_config) == {"student"}
    with torch.no_grad():
        torch.testing.assert_close(unet_forward(copy, x, t, embeds), unet_forward(student, x, t, embeds))
        # the shared base itself is left as it was: adapters off
        assert torch.equal(unet_forward(teacher.unet, x, t, embeds), before)


def test_export_of_a_shared_base_student_merges_its_adapter_only(teacher, tmp_path):
    """The exported transformer (the student's adapter merged into a copy of the base) computes what the student's
    view computes, and the teacher's base is left without any merged weights."""
    from diffusers import SD3Transformer2DModel

    from stepdistill.models.generators import Generator

    x, t, embeds = _inputs(teacher)
    with torch.no_grad():
        before = unet_forward(teacher.unet, x, t, embeds)
    gen = Generator.from_teacher(teacher, timesteps=[999], lora_rank=4, share_teacher_base=True)
    _randomise(gen.unet, 2)
    AdapterView(teacher.unet, "fake_score", 4)  # a second adapter on the same base, as a run has
    folder = export_student(teacher, gen, tmp_path / "student", method="dmd2", example_prompt="a red circle")
    exported = SD3Transformer2DModel.from_pretrained(folder / "transformer", local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(unet_forward(exported, x, t, embeds), unet_forward(gen.unet, x, t, embeds),
                                   rtol=1e-4, atol=1e-5)
        assert torch.equal(unet_forward(teacher.unet, x, t, embeds), before)
