"""The front door: a reused run folder never mixes two runs, every CLI error is one line, input is checked
before anything loads or is written, and the small conveniences a new user reaches for.

CLI checks run ``python -m stepdistill.cli`` in a subprocess and look at what a user sees: the exit code, the lines on
stderr, and what is (not) left on disk (``cli`` and ``one_error_line`` of tests/helpers.py). The teacher is the tiny
random SD pipeline of tests/tiny_models.py (the ``spec`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import FAST, RECIPE, cli, one_error_line
from tiny_models import make_tiny_sd_pipeline

from stepdistill.training.checkpoint import CheckpointError, list_checkpoints
from stepdistill.workflows.distill import distill
from stepdistill.training.runfolder import RunFolderError


# --- 1. a reused run folder never mixes two runs -----------------------------------------------------------------
def test_reused_folder_is_refused_then_overwritten_and_resume_checks_the_fingerprint(spec, tmp_path):
    out = tmp_path / "run"
    distill(spec, RECIPE, out, overrides=[*FAST, "train.max_steps=4"], export=False)
    assert [p.name for _, p in list_checkpoints(out / "checkpoints")] == ["step_000002", "step_000004"]

    changed = [*FAST, "train.max_steps=2", "optimizer.generator_lr=1.0e-4"]
    # the sequence under test: a new run with a changed config in the same folder ...
    with pytest.raises(RunFolderError, match="--resume latest.*--overwrite"):
        distill(spec, RECIPE, out, overrides=changed, export=False)
    # ... resumed with --resume latest would have continued the OLD run's checkpoint: refused, naming what changed
    with pytest.raises(RunFolderError, match="optimizer.generator_lr"):
        distill(spec, RECIPE, out, overrides=changed, resume="latest", export=False)
    # the old run is untouched by both refusals
    assert [p.name for _, p in list_checkpoints(out / "checkpoints")] == ["step_000002", "step_000004"]

    # --overwrite replaces it: no checkpoint, sample or metric row of the old run is left
    distill(spec, RECIPE, out, overrides=changed, overwrite=True, export=False)
    assert [p.name for _, p in list_checkpoints(out / "checkpoints")] == ["step_000002"]
    rows = (out / "logs" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2"]
    assert json.loads((out / "run.json").read_text())["overrides"] == changed

    # resuming the new run with its own config works (a longer max_steps is not a change of the run)
    summary = distill(spec, RECIPE, out, overrides=[*changed, "train.max_steps=4"], resume="latest", export=False)
    assert summary["start_step"] == 2 and summary["steps"] == 4
    # an explicit flag resumes despite a change, and says so
    notes = []
    distill(spec, RECIPE, out, overrides=[*changed, "train.max_steps=5", "train.seed=3"], resume="latest",
            export=False, allow_config_change=True, log=notes.append)
    assert any("train.seed" in n for n in notes)


def test_resume_latest_falls_back_to_the_newest_loadable_checkpoint(spec, tmp_path):
    out = tmp_path / "run"
    distill(spec, RECIPE, out, overrides=[*FAST, "train.max_steps=4"], export=False)
    state = out / "checkpoints" / "step_000004" / "trainable_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a truncated write
    with pytest.raises(CheckpointError, match="damaged"):  # a named damaged checkpoint is not replaced silently
        distill(spec, RECIPE, out, overrides=[*FAST, "train.max_steps=6"], resume="step_000004", export=False)
    notes = []
    summary = distill(spec, RECIPE, out, overrides=[*FAST, "train.max_steps=5"], resume="latest", export=False,
                      log=notes.append)
    assert summary["start_step"] == 2
    assert any("step_000004 is damaged" in n and "step_000002" in n for n in notes)


def test_objective_config_errors_come_before_any_model_or_file(spec, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError) as err:
        distill(spec, RECIPE, out, overrides=["objective_config.min_t_ratio=0.99"])
    text = str(err.value)
    assert "toy-dmd2.yaml" in text and "objective_config.min_t_ratio" in text
    assert "set by override 'objective_config.min_t_ratio=0.99'" in text
    assert not out.exists()
    with pytest.raises(ValueError, match="must be ≥ 1, got 0"):
        distill(spec, RECIPE, out, overrides=["objective_config.aux_updates_per_generator_update=0"])
    with pytest.raises(ValueError, match="generator.timesteps"):  # beyond the teacher's schedule
        distill(spec, RECIPE, out, overrides=["generator.timesteps=[1200]"])
    with pytest.raises(ValueError, match="prompts.source.*missing-prompts.txt not found"):
        distill(spec, RECIPE, out, overrides=["prompts.source=missing-prompts.txt", "objective_config.gan_enabled=false"])
    assert not out.exists()


# --- 2./3./5. the CLI ----------------------------------------------------------------------------------------------
def test_cli_error_paths_are_one_line_and_leave_nothing_behind(spec, tmp_path):
    # a student folder whose UNet weights are truncated
    broken = tmp_path / "broken"
    make_tiny_sd_pipeline(broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    one_error_line(cli("generate", "--pipeline", str(broken), "--prompt", "a red circle", "--out",
                       str(tmp_path / "g.png")), "stepdistill generate: error")
    assert not (tmp_path / "g.png").exists()
    # unchecked input
    one_error_line(cli("generate", "--pipeline", str(broken), "--prompt", "x", "--steps", "-3", "--out",
                       str(tmp_path / "g.png")), "--steps must be ≥ 1")
    # a missing checkpoint, named
    run = tmp_path / "run"
    distill(spec, RECIPE, run, overrides=[*FAST, "train.max_steps=2"], export=False)
    one_error_line(cli("export", "--run", str(run), "--checkpoint", "step_000600", "--out", str(tmp_path / "s")),
                   "step_000600", "not found")
    assert not (tmp_path / "s").exists()
    one_error_line(cli("distill", "--pipeline", str(spec), "--recipe", str(RECIPE), "--out", str(run),
                       "--set", *FAST, "train.max_steps=2", "--resume", "step_000600"), "step_000600")
    # the reused folder, from the command line
    one_error_line(cli("distill", "--pipeline", str(spec), "--recipe", str(RECIPE), "--out", str(run),
                       "--set", *FAST, "train.max_steps=3"), "--resume latest", "--overwrite")
    # an objective-config error: one line naming the recipe and the override, and no output folder
    fresh = tmp_path / "fresh"
    one_error_line(cli("distill", "--pipeline", str(spec), "--recipe", str(RECIPE), "--out", str(fresh),
                       "--set", "objective_config.min_t_ratio=0.99"), "toy-dmd2.yaml", "min_t_ratio=0.99")
    assert not fresh.exists()
    # eval on a corrupt teacher: one line and no half-made samples folder
    one_error_line(cli("eval", "--pipeline", str(broken), "--steps", "1", "--guidance", "1", "--prompts", "toy",
                       "--metrics", "toy", "--max-prompts", "2",
                       "--samples-per-prompt", "1", "--latency-batch", "0", "--out", str(tmp_path / "m.json")),
                   "stepdistill eval: error")
    assert not (tmp_path / "m_samples").exists() and not (tmp_path / "m.json").exists()


def test_usage_errors_are_one_line_too():
    one_error_line(cli("eval", "--pipeline", "toy"), "required", "--help")


def test_cli_conveniences(spec, tmp_path):
    out = tmp_path / "dry"
    proc = cli("distill", "--pipeline", str(spec), "--recipe", str(RECIPE), "--out", str(out), "--dry-run",
               "--set", "train.max_steps=7", "train.seed=5", "objective_config.gan_enabled=false")  # several pairs
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max_steps: 7" in proc.stdout and "seed: 5" in proc.stdout and "would start a fresh run" in proc.stdout
    assert not out.exists()
    proc = cli("recipes")
    assert proc.returncode == 0
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert "toy-dmd.yaml" in lines and " dmd " in lines["toy-dmd.yaml"] and "sid-lsg.yaml" in lines
    assert "toy world" in lines["toy-dmd.yaml"].lower() or "toy teacher" in lines["toy-dmd.yaml"].lower()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "stepdistill.cli", "gpu-scale", "--out", str(tmp_path / "gs")],
                          capture_output=True, text=True, env=env, timeout=120)
    one_error_line(proc, "no CUDA GPU")
    assert not (tmp_path / "gs").exists()


def test_resumed_run_says_so_and_grids_record_prompts_and_the_last_step(spec, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    overrides = [*FAST, "train.max_steps=3", "train.sample_every=2"]
    distill(spec, RECIPE, out, overrides=overrides, export=False)
    grids = sorted(p.name for p in (out / "samples").glob("step_*.png"))
    assert "step_000003.png" in grids and "step_000002.png" in grids  # the last step is sampled too
    prompts = (out / "samples" / "prompts.txt").read_text()
    assert Image.open(out / "samples" / "step_000003.png").text["prompts"].splitlines()[0] in prompts
    lines = []
    distill(spec, RECIPE, out, overrides=[*overrides, "train.max_steps=4"], resume="latest", export=False,
            log=lines.append)
    fingerprint = json.loads((out / "run.json").read_text())["fingerprint"]
    assert any(line.startswith("[distill] resumed from step_000003 (step 3") and fingerprint in line for line in lines)


def test_eta_covers_both_phases_of_a_warmup_recipe():
    from stepdistill.training.progress import PhaseETA

    eta = PhaseETA(start=0, total=740, warmup=600, cost_ratio=8.0)
    for step in range(11):
        eta.record(step, 0.3)  # the first is skipped (one-off costs), then ten warm-up updates of 0.3 s
    secs, estimated = eta.seconds_left(11)
    assert estimated and secs == pytest.approx(589 * 0.3 + 140 * 0.3 * 8.0)
    assert eta.text(11).startswith("≈")
    for step in range(600, 606):
        eta.record(step, 2.5)  # the distribution-matching phase, measured: no longer an estimate
    secs, estimated = eta.seconds_left(606)
    assert not estimated and secs == pytest.approx(134 * 2.5)
