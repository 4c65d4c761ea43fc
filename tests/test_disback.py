"""DisBack (Zhang et al., ICLR 2025): the recorded degradation path, the backtracking schedule, resume mid-path; through
``distill``, the path in the run folder, read again on resume, removed by ``--overwrite`` and checked before reuse.

Checks against independent facts: node files on disk (loaded here with safetensors), the teacher's own weights, the
denoising loss of each path end on samples of the initial student, and the schedule written out by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import QUICK, REPO
from safetensors.torch import load_file
from tiny_models import make_tiny_teacher_spec

from stepdistill.models.conditioning import unet_forward
from stepdistill.models.generators import Generator
from stepdistill.objectives import ObjectiveConfigError, build_objective
from stepdistill.objectives.disback import node_file, read_manifest, target_index
from stepdistill.training import stages


def test_target_schedule_walks_back_to_the_teacher():
    # N = 4 nodes, switches every 10 updates from update 600 (after an ODE warm-up)
    got = [target_index(s, 600, 4, 10) for s in (0, 599, 600, 609, 610, 619, 620, 630, 640, 10_000)]
    assert got == [4, 4, 3, 3, 2, 2, 1, 0, 0, 0]


def _objective(teacher, tmp_path, **cfg):
    torch.manual_seed(0)
    gen = Generator.from_teacher(teacher, timesteps=[999])
    with torch.no_grad():  # an initial student that differs from the teacher
        for p in gen.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = {"real_guidance_scale": 2.0, "aux_updates_per_generator_update": 1, "disback": True, "disback_nodes": 3,
              "disback_record_updates": 6, "disback_record_lr": 1e-3, "disback_interval": 2, **cfg}
    obj = build_objective("dmd2", teacher, gen, config)
    prompts = ["a red circle", "a blue square", "a small green triangle"]

    def sample_embeds(n, rng):
        idx = torch.randint(0, len(prompts), (n,), generator=rng).tolist()
        return teacher.encode_prompt([prompts[i] for i in idx], with_uncond=True)

    obj.attach_run(tmp_path, sample_embeds, batch_size=4, seed=5, record_path=stages.record_degradation_path)
    return gen, obj, sample_embeds


def _dsm_loss(teacher, gen, unet, seed=11) -> float:
    """Denoising loss of ``unet`` on fresh samples of the frozen initial student (the quantity stage 1 lowers)."""
    g = torch.Generator().manual_seed(seed)
    emb = teacher.encode_prompt(["a red circle", "a blue square"] * 4, with_uncond=False)
    with torch.no_grad():
        x0 = gen.sample(torch.randn(8, 4, 8, 8, generator=g), emb)
        t = torch.randint(0, 1000, (8,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        out = unet_forward(unet, teacher.schedule.add_noise(x0, eps, t), t, emb, 1.0)
        return float(((out - eps) ** 2).mean())


def _same_weights(net, state) -> bool:
    return all(torch.equal(v.float(), state[k].float()) for k, v in net.state_dict().items())


def test_path_is_recorded_once_and_its_ends_are_the_teacher_and_the_last_checkpoint(teacher, tmp_path):
    gen, obj, _ = _objective(teacher, tmp_path)
    teacher_before = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    obj.set_train_step(0)  # distillation starts: stage 1 records the path
    manifest = read_manifest(tmp_path / "disback")
    assert manifest["nodes"] == 3 and manifest["node_updates"] == [2, 4, 6]
    nodes = [load_file(str(node_file(tmp_path / "disback", j))) for j in (1, 2, 3)]
    # the fake score starts from ψ_N and the first target is ψ_{N-1}
    assert _same_weights(obj.fake_unet, nodes[2])
    assert obj.take_auxiliary_reset()
    assert _same_weights(obj.real_score_unet(), nodes[1])
    # ψ_N fits the initial student's samples better than the teacher does (the path leads away from the teacher)
    psi_n = obj.real_score_unet()
    psi_n.load_state_dict(nodes[2])
    assert _dsm_loss(teacher, gen, psi_n) < _dsm_loss(teacher, gen, teacher.unet)
    obj._disback_loaded = None  # (the scratch network was overwritten above)
    # switches: ψ₂ for updates 0-1, ψ₁ for 2-3, then the teacher itself (path[0])
    for step, j in ((1, 2), (2, 1), (3, 1), (4, 0), (9, 0)):
        obj.set_train_step(step)
        net = obj.real_score_unet()
        if j == 0:
            assert net is teacher.unet, step
        else:
            assert _same_weights(net, nodes[j - 1]), (step, j)
    # the teacher's weights were never touched, and the first node already differs from them
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.unet.state_dict().items())
    assert not torch.equal(nodes[0]["conv_in.weight"], teacher_before["conv_in.weight"].float())


def test_the_real_score_of_the_loss_is_the_current_node(teacher, tmp_path):
    gen, obj, _ = _objective(teacher, tmp_path)
    obj.set_train_step(0)
    emb = teacher.encode_prompt(["a red circle"] * 2, with_uncond=True)
    x_t = torch.randn(2, 4, 8, 8)
    t = torch.tensor([300, 700])
    node = load_file(str(node_file(tmp_path / "disback", 2)))
    ref_net = Generator.from_teacher(teacher, timesteps=[999]).unet
    ref_net.load_state_dict(node)
    with torch.no_grad():
        want = unet_forward(ref_net, x_t, t, emb, 2.0)
        teacher_out = unet_forward(teacher.unet, x_t, t, emb, 2.0)
    got = obj.teacher_prediction(x_t, t, emb, 2.0)
    torch.testing.assert_close(got, want)
    assert (got - teacher_out).abs().max() > 1e-4


def test_resume_mid_path_reads_the_recorded_path_and_picks_the_same_target(teacher, tmp_path, monkeypatch):
    _, first, _ = _objective(teacher, tmp_path)
    first.set_train_step(0)
    first.set_train_step(3)
    want = {k: v.clone() for k, v in first.real_score_unet().state_dict().items()}
    # a new process resumes at update 3: no recording, same target (ψ₁)
    monkeypatch.setattr(stages, "record_degradation_path", lambda *a, **k: pytest.fail("recorded again"))
    _, resumed, _ = _objective(teacher, tmp_path)
    resumed.set_train_step(3)
    assert _same_weights(resumed.real_score_unet(), want)
    assert _same_weights(resumed.real_score_unet(), load_file(str(node_file(tmp_path / "disback", 1))))
    # a path with a missing node is incomplete: it is recorded again
    node_file(tmp_path / "disback", 2).unlink()
    assert read_manifest(tmp_path / "disback") is None
    monkeypatch.undo()
    _, again, _ = _objective(teacher, tmp_path)
    again.set_train_step(0)
    assert read_manifest(tmp_path / "disback") is not None
    json.loads((tmp_path / "disback" / "path.json").read_text())


def test_disback_after_an_ode_warmup_starts_when_distillation_does(teacher, tmp_path):
    gen, obj, _ = _objective(teacher, tmp_path, ode_warmup_steps=3)
    obj.set_train_step(2)
    assert read_manifest(tmp_path / "disback") is None and obj.real_score_unet() is teacher.unet
    obj.set_train_step(3)
    assert read_manifest(tmp_path / "disback") is not None
    assert obj.real_score_unet() is not teacher.unet


def test_disback_config_errors(teacher, tmp_path):
    gen = Generator.from_teacher(teacher, timesteps=[999])
    with pytest.raises(ObjectiveConfigError, match="fake_lora_rank"):
        build_objective("dmd2", teacher, gen, {"disback": True, "fake_lora_rank": 4})
    with pytest.raises(ObjectiveConfigError, match="disback_record_updates"):
        build_objective("dmd", teacher, gen, {"disback": True, "disback_nodes": 5, "disback_record_updates": 2})
    obj = build_objective("sid", teacher, gen, {"disback": True})
    with pytest.raises(RuntimeError, match="attach_run"):
        obj.set_train_step(0)


def test_a_lost_path_mid_run_is_a_clear_error_not_a_new_recording(teacher, tmp_path):
    _, first, _ = _objective(teacher, tmp_path)
    first.set_train_step(0)
    node_file(tmp_path / "disback", 3).unlink()
    _, resumed, _ = _objective(teacher, tmp_path)
    with pytest.raises(RuntimeError, match="cannot be recorded again at update 5"):
        resumed.set_train_step(5)


# --- through distill: the path is in the run folder and belongs to its run --------------------------------------------
def test_disback_through_distill_records_its_path_in_the_run_folder_and_resumes(tmp_path):
    """``objective_config.disback=true`` on the DMD recipe: stage 1 runs when distribution matching starts (after the
    ODE warm-up), its path is in the run folder, and a resumed run reads it instead of recording again."""
    import json

    from stepdistill.workflows.distill import distill

    spec = make_tiny_teacher_spec(tmp_path)
    overrides = ["train.max_steps=3", "train.batch_size=2", "train.sample_every=0", "train.checkpoint_every=1",
                 "objective_config.aux_updates_per_generator_update=1", "objective_config.ode_warmup_steps=1",
                 "objective_config.regression_pairs=4", "objective_config.regression_steps=2",
                 "objective_config.disback=true", "objective_config.disback_nodes=2",
                 "objective_config.disback_record_updates=2", "objective_config.disback_interval=1"]
    distill(spec, REPO / "training" / "toy-dmd.yaml", tmp_path / "run", overrides=overrides, export=False)
    manifest = json.loads((tmp_path / "run" / "disback" / "path.json").read_text())
    assert manifest["complete"] and manifest["files"] == ["node_01.safetensors", "node_02.safetensors"]
    stamp = (tmp_path / "run" / "disback" / "node_02.safetensors").stat().st_mtime_ns
    summary = distill(spec, REPO / "training" / "toy-dmd.yaml", tmp_path / "run", resume="latest",
                      overrides=[o if not o.startswith("train.max_steps") else "train.max_steps=4" for o in overrides],
                      export=False, allow_config_change=True)
    assert summary["start_step"] == 3 and summary["steps"] == 4
    assert (tmp_path / "run" / "disback" / "node_02.safetensors").stat().st_mtime_ns == stamp  # not recorded again


def test_disback_path_is_removed_by_overwrite_and_checked_before_reuse(spec, tmp_path):
    import json

    from stepdistill.workflows.distill import distill

    run = tmp_path / "run"
    base = [*QUICK, "objective_config.gan_enabled=false", "objective_config.ode_warmup_steps=2",
            "objective_config.regression_pairs=4", "objective_config.regression_steps=2",
            "objective_config.disback=true", "objective_config.disback_nodes=2", "objective_config.disback_interval=1",
            "train.checkpoint_every=1", "train.keep_checkpoints=5", "train.max_steps=3"]
    recipe = REPO / "training" / "toy-dmd2.yaml"
    manifest = run / "disback" / "path.json"
    distill(spec, recipe, run, overrides=[*base, "objective_config.disback_record_updates=2"], export=False)
    assert json.loads(manifest.read_text())["record_updates"] == 2
    # a new run with other recording settings: --overwrite removes the old path, the new one is recorded
    distill(spec, recipe, run, overrides=[*base, "objective_config.disback_record_updates=4"], export=False,
            overwrite=True)
    assert json.loads(manifest.read_text())["record_updates"] == 4
    # resumed before the path was recorded, with other recording settings: recorded again, and said so
    lines = []
    distill(spec, recipe, run, overrides=[*base, "objective_config.disback_record_updates=4",
                                          "objective_config.disback_record_lr=1e-3"],
            resume="step_000001", allow_config_change=True, export=False, log=lines.append)
    assert json.loads(manifest.read_text())["lr"] == pytest.approx(1e-3)
    assert any("recorded by other settings" in line and "lr" in line for line in lines), lines
    # resumed after it was recorded, with other recording settings: refused (the student trained against it)
    with pytest.raises(RuntimeError, match="recorded with other settings"):
        distill(spec, recipe, run, overrides=[*base, "objective_config.disback_record_updates=4",
                                              "objective_config.disback_record_lr=5e-4", "train.max_steps=4"],
                resume="latest", allow_config_change=True, export=False)
