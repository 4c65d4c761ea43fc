"""What a new user meets trying every toy recipe: bad numbers, files that must survive, runs that must repeat and
resume, and checks that must come before anything is written (the checks of one method are in its own test file). CLI
checks run ``python -m stepdistill.cli`` in a subprocess (``cli`` and ``one_error_line`` of tests/helpers.py); the
teacher is the tiny random SD pipeline of tests/tiny_models.py (the ``spec`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import (FAST, PAIRS, QUICK, RECIPE, RECIPE_FAMILIES, REPO, cli, one_error_line, trainable_states,
                     use_random_real_latents)

from stepdistill.core.interrupts import StopRequest
from stepdistill.training.config import ConfigError, load_recipe
from stepdistill.core.yaml_io import parse_yaml_value


# --- non-finite numbers and YAML numbers ---------------------------------------------------------------------------
def test_recipe_floats_are_finite_and_scientific_notation_parses(tmp_path):
    with pytest.raises(ConfigError, match="optimizer.generator_lr: must be a finite number"):
        load_recipe(RECIPE, ["optimizer.generator_lr=.nan"])
    with pytest.raises(ConfigError, match="train.grad_clip: must be a finite number"):
        load_recipe(RECIPE, ["train.grad_clip=.inf"])
    # YAML 1.1 reads 1e-3 (no dot) as a string; recipes and overrides read it as the number it is
    assert parse_yaml_value("1e-3") == pytest.approx(1e-3) and parse_yaml_value("2E5") == 2e5
    config = load_recipe(RECIPE, ["objective_config.disback_record_lr=1e-3", "optimizer.generator_lr=1e-4"])
    assert config.objective_config["disback_record_lr"] == pytest.approx(1e-3)
    assert config.optimizer.generator_lr == pytest.approx(1e-4)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.read_text().replace("generator_lr: ", "generator_lr: 1e-3 #"))
    assert load_recipe(recipe).optimizer.generator_lr == pytest.approx(1e-3)


def test_bad_yaml_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("objective: dmd2\ntrain:\n  batch_size: [1, 2\n")
    with pytest.raises(ValueError) as err:
        load_recipe(recipe)
    text = str(err.value)
    assert str(recipe) in text and "<unicode string>" not in text and ":4:" in text


def test_cli_refuses_non_finite_numbers_and_prints_its_prefix_once(tmp_path):
    for value in ("nan", "inf"):
        one_error_line(cli("generate", "--pipeline", "toy", "--prompt", "a red circle", "--guidance", value, "--out",
                           str(tmp_path / "g.png")), "--guidance", "finite")
    assert not (tmp_path / "g.png").exists()
    line = one_error_line(cli("eval", "--pipeline", "toy", "--prompts", "toy", "--steps", "1", "--guidance", "1",
                              "--samples-per-prompt", "0", "--out", str(tmp_path / "e.json")), "samples_per_prompt")
    assert line.count("stepdistill eval") == 1, line
    line = one_error_line(cli("merge", "--a", "x", "--b", "y", "--out", str(tmp_path / "m")), "--alpha")
    assert line.count("stepdistill merge") == 1, line


def test_recipes_never_cut_a_word():
    proc = cli("recipes")
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.splitlines():
        name = line.split()[0]
        text = (REPO / "training" / name).read_text()
        header = " ".join(" ".join(ln.lstrip("#").strip() for ln in text.splitlines()[:8] if ln.startswith("#")).split())
        shown = line.split(None, 2)[2]
        if shown.endswith("…"):
            shown = shown[:-1]
            # what is shown is whole words of the header: the next character in the header is a space or punctuation
            assert header.startswith(shown), (shown, header[:200])
            assert header[len(shown)] in " ,;:(", (name, shown[-20:], header[len(shown):len(shown) + 10])
        else:
            assert header.startswith(shown)


# --- export never deletes what it did not write -------------------------------------------------------------------
def test_export_refuses_its_own_run_and_foreign_folders(spec, tmp_path):
    from stepdistill.core.outputs import OutputFolderError
    from stepdistill.training.checkpoint import list_checkpoints
    from stepdistill.workflows.distill import distill, export_run

    run = tmp_path / "run"
    distill(spec, RECIPE, run, overrides=[*FAST, "train.max_steps=2"], export=False)
    before = sorted(p.name for p in run.iterdir())
    one_error_line(cli("export", "--run", str(run), "--out", str(run)), "an input of this command")
    one_error_line(cli("export", "--run", str(run), "--out", str(tmp_path), "--overwrite"), "contains")
    assert sorted(p.name for p in run.iterdir()) == before and list_checkpoints(run / "checkpoints")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match="notes.txt"):
        export_run(run, mine)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        export_run(run, a_file)
    assert (mine / "notes.txt").read_text() == "keep me" and a_file.read_text() == "x"
    # an earlier student folder is replaced without a flag; --overwrite replaces the others
    export_run(run, tmp_path / "student")
    export_run(run, tmp_path / "student")
    export_run(run, mine, overwrite=True)
    assert not (mine / "notes.txt").exists() and (mine / "stepdistill_export.json").is_file()


# --- two runs of one recipe are bit-identical ----------------------------------------------------------------------
FAMILIES = RECIPE_FAMILIES


@pytest.fixture
def gan_ready_spec(spec, tmp_path, monkeypatch):
    """The tiny teacher with a stand-in for the toy world's real images (the tiny VAE takes 16 px images, the world
    draws 32 px ones): seeded random latents of the teacher's shape, so GAN recipes build and train their head."""
    use_random_real_latents(monkeypatch)
    path = tmp_path / "pipe-real.yaml"
    path.write_text(spec.read_text() + "real_images: toy\n")
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_runs_of_every_recipe_family_are_bit_identical(gan_ready_spec, tmp_path, family):
    import torch

    from stepdistill.workflows.distill import distill

    recipe, extra = FAMILIES[family]
    steps = 4 if "phased" in recipe else 2
    overrides = [*QUICK, *extra, f"train.max_steps={steps}", f"train.checkpoint_every={steps}"]
    states = []
    for k in range(2):
        torch.manual_seed(1000 + k)  # whatever the process's RNG holds before a run must not matter
        distill(gan_ready_spec, REPO / "training" / recipe, tmp_path / f"run{k}", overrides=overrides, export=False,
                log=lambda *a: None)
        states.append(trainable_states(tmp_path / f"run{k}"))
    assert states[0] and states[0].keys() == states[1].keys()
    for where, first in states[0].items():
        second = states[1][where]
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{family}: {where} {key} differs between two runs"


# --- checks before anything is written; a failed run does not block the next ---------------------------------------
def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_next(spec, tmp_path, monkeypatch):
    from stepdistill.training import trainer as trainer_module
    from stepdistill.workflows.distill import distill
    from stepdistill.training.trainer import TrainingDiverged

    out = tmp_path / "run"

    def diverges(self, turn, update):
        raise TrainingDiverged(self.state.step + 1, "the generator loss", float("nan"))

    original = trainer_module.Trainer._update
    monkeypatch.setattr(trainer_module.Trainer, "_update", diverges)
    with pytest.raises(TrainingDiverged):
        distill(spec, RECIPE, out, overrides=[*FAST, "train.max_steps=2"], export=False)
    assert (out / "run.json").is_file()
    monkeypatch.setattr(trainer_module.Trainer, "_update", original)
    notes = []
    summary = distill(spec, RECIPE, out, overrides=[*FAST, "train.max_steps=2", "optimizer.generator_lr=1e-6"],
                      export=False, log=notes.append)  # the corrected command, without --overwrite
    assert summary["steps"] == 2 and any("before its first checkpoint" in n for n in notes)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread only")
def test_the_first_signal_asks_to_stop_and_the_second_stops_at_once():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not stop.requested and time.time() < deadline:
            time.sleep(0.01)  # the handler runs in the main thread between bytecodes
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="signal 2"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with StopRequest(enabled=False) as off:  # several processes: nothing taken over
        assert signal.getsignal(signal.SIGTERM) == before[0] and not off.requested


def test_a_killed_distill_run_stops_after_its_update_with_a_checkpoint_of_it(spec, tmp_path):
    # checkpoints every 100,000 updates: the only one a killed run can leave is the one the signal asks for
    out = tmp_path / "run"
    args = ["distill", "--pipeline", str(spec), "--recipe", str(RECIPE), "--out", str(out), "--no-export", "--set",
            *FAST, "train.log_every=1", "train.checkpoint_every=100000"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.Popen([sys.executable, "-m", "stepdistill.cli", *args, "train.max_steps=100000"], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "logs" / "metrics.csv"
        deadline = time.time() + 240
        while run.poll() is None and time.time() < deadline and (
                not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.2)
        logged = len(metrics.read_text().splitlines()) - 1  # updates finished before the signal
        assert logged >= 2 and run.poll() is None
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130, stderr[-2000:]
    assert "training stopped after update" in stderr and "resume goes on from it" in stderr
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert len(kept) == 1
    stopped_at = int(kept[0].split("_")[1])
    assert stopped_at >= logged and f"after update {stopped_at};" in stderr
    resumed = cli(*args, f"train.max_steps={stopped_at + 1}", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {kept[0]} (step {stopped_at};" in resumed.stdout + resumed.stderr


def test_eval_out_is_checked_before_generating(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    one_error_line(cli("eval", "--pipeline", "toy", "--prompts", "toy", "--steps", "1", "--guidance", "1",
                       "--max-prompts", "2", "--samples-per-prompt", "2", "--latency-batch", "0", "--out", str(folder)),
                   "is a folder")
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["results"]


# --- a full disk -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["torch-short-write", "enospc"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_file(spec, tmp_path, monkeypatch,
                                                                                   capsys, failure):
    import errno
    import shutil
    from collections import namedtuple

    from accelerate import Accelerator

    from stepdistill.cli import entry as cli
    from stepdistill.core import outputs
    from stepdistill.core.outputs import DiskFullError
    from stepdistill.workflows.distill import distill

    def save_state_on_a_full_disk(self, output_dir=None, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 4096)  # the part written before the disk filled
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 120000000")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(Accelerator, "save_state", save_state_on_a_full_disk)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))
    out = tmp_path / "run"
    with pytest.raises(DiskFullError) as err:
        distill(spec, RECIPE, out, overrides=[*FAST, "train.max_steps=2"], export=False)
    assert str(err.value).startswith(f"no space left on {out / 'checkpoints'}")
    assert not any(p.name.startswith(".tmp_") for p in (out / "checkpoints").iterdir())
    monkeypatch.setattr(outputs.shutil, "disk_usage", shutil.disk_usage)

    def fails():
        raise err.value

    capsys.readouterr()  # what the run printed so far
    assert cli._guarded("distill", fails) != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no space left on" in lines[0] and "inline_container" not in lines[0]


def test_a_short_write_with_space_left_is_not_called_a_full_disk(tmp_path):
    from stepdistill.core.outputs import disk_full

    assert not disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2"), tmp_path)
    assert disk_full(OSError(28, "No space left on device"), tmp_path)


# --- generate follows the student; the toy vocabulary is closed ------------------------------------------------------
def test_generate_defaults_to_the_students_steps_and_guidance_and_refuses_what_it_cannot_do(spec, tmp_path):
    from stepdistill.workflows.distill import distill

    run = tmp_path / "run"
    distill(spec, REPO / "training" / "toy-dmd2-4step.yaml", run, export=True, log=lambda *a: None,
            overrides=[*QUICK, "train.max_steps=1", "train.checkpoint_every=1", "objective_config.gan_enabled=false"])
    student = str(run / "student")
    proc = cli("generate", "--pipeline", student, "--prompt", "a red circle", "--num", "2", "--out",
               str(tmp_path / "g.png"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 steps, guidance 1" in proc.stdout and (tmp_path / "g.png").is_file()
    assert "torchvision" not in proc.stderr  # our own command keeps transformers' import-time lines quiet
    one_error_line(cli("generate", "--pipeline", student, "--prompt", "a red circle", "--steps", "25", "--out",
                       str(tmp_path / "h.png")), "4-step", "not 25")
    one_error_line(cli("generate", "--pipeline", student, "--prompt", "a red circle", "--guidance", "3", "--out",
                       str(tmp_path / "h.png")), "already embeds", "guidance 1")
    assert not (tmp_path / "h.png").exists()


def test_cfg_distilled_student_takes_any_step_count_but_no_guidance_on_top(tmp_path):
    from stepdistill.eval.generate import check_student_call, student_call_defaults

    info = {"method": "cfg_distill", "steps": 25, "timesteps": list(range(961, -1, -40)), "guidance_scale": 1.0}
    assert student_call_defaults(info) == (25, 1.0) and student_call_defaults({}) == (25, 3.0)
    check_student_call(info, 10, 1.0)  # its DDIM sampler takes any step count
    with pytest.raises(ValueError, match="already embeds"):
        check_student_call(info, 25, 3.0)
    with pytest.raises(ValueError, match="exactly 1 step, not 4"):
        check_student_call({"method": "dmd", "steps": 1, "timesteps": [999], "guidance_scale": 1.0}, 4, 1.0)


def test_words_outside_the_toy_vocabulary_are_refused_in_one_line(tmp_path):
    from stepdistill.training.config import ConfigError
    from stepdistill.workflows.distill import distill

    one_error_line(cli("generate", "--pipeline", "toy", "--prompt", "a red dog", "--out", str(tmp_path / "g.png")),
                   "'dog'", "toy world's vocabulary")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue unicorn on white background\n")
    with pytest.raises(ConfigError, match=r"prompts.source.*prompt 2 .*'unicorn'"):
        distill(REPO / "pipelines" / "toy.yaml", REPO / "training" / "toy-sid.yaml", tmp_path / "run",
                overrides=[f"prompts.source={prompts}"])
    assert not (tmp_path / "run").exists()


# --- the evaluation's small conveniences ------------------------------------------------------------------------------
def test_toy_reference_statistics_are_computed_once_and_cached_by_fingerprint(tmp_path, monkeypatch):
    import numpy as np

    from stepdistill.eval import toy_metrics
    from stepdistill.eval.toy_metrics import ToyJudge

    first = ToyJudge(reference_size=64, cache_dir=tmp_path).reference_stats()
    cached = list(tmp_path.glob("toy-reference-*.npz"))
    assert len(cached) == 1

    def no_rendering(*args, **kwargs):
        raise AssertionError("the reference images were rendered again")

    monkeypatch.setattr(toy_metrics.world, "sample", no_rendering)
    again = ToyJudge(reference_size=64, cache_dir=tmp_path).reference_stats()
    assert np.array_equal(first.mean, again.mean) and np.array_equal(first.cov, again.cov) and again.num == 64
    with pytest.raises(AssertionError, match="rendered again"):  # another size is another fingerprint
        ToyJudge(reference_size=65, cache_dir=tmp_path).reference_stats()


@pytest.mark.parametrize("steps,latencies", [([1, 2, 4, 8], [3.6, 4.2, 10.2, 20.4, 38.0]),
                                              ([1, 2, 3, 4, 5, 6], [2.5, 3.1, 4.4, 5.0, 6.2, 7.9]),
                                              ([1, 2, 4, 8, 25, 50], [3.6, 10.2, 20.4, 38.0, 103.8, 210.4])])
def test_quality_plot_tick_labels_never_overlap(steps, latencies):
    import matplotlib.pyplot as plt

    from stepdistill.eval.report import quality_figure

    entries = [{"name": "teacher", "role": "teacher", "steps": s, "guidance": 3.0, "fid": 600 / s, "fid_features": "toy",
                "latency_ms": {"batchN": lat}} for s, lat in zip(steps, latencies)]
    entries.append({"name": "student", "role": "student", "steps": 1, "guidance": 1.0, "fid": 99.0,
                    "fid_features": "toy", "latency_ms": {"batchN": latencies[-1] * 0.9}})
    fig = quality_figure(entries)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
                 if t.get_visible() and t.get_text()]
        assert len(boxes) >= 2
        boxes.sort(key=lambda b: b.x0)
        for left, right in zip(boxes, boxes[1:]):
            assert left.x1 <= right.x0, f"tick labels overlap on {ax.get_xlabel()}"
    plt.close(fig)


def test_front_plot_only_for_merge_sweeps(tmp_path):
    from stepdistill.eval.report import write_report

    entry = {"name": "a", "role": "student", "steps": 1, "guidance": 1.0, "nfe": 1, "fid": 10.0, "fid_features": "toy",
             "adherence": 0.9, "diversity": 0.05, "num_samples": 5040, "latency_ms": None}
    entries = [entry, dict(entry, name="b", fid=12.0, diversity=0.06)]
    write_report(tmp_path / "plain", "toy", entries)
    assert not (tmp_path / "plain" / "front.png").exists()
    assert "front.png" not in (tmp_path / "plain" / "report.md").read_text()
    write_report(tmp_path / "sweep", "merge-front", entries, front=True)
    assert (tmp_path / "sweep" / "front.png").is_file()


def test_fid_on_few_samples_and_one_timed_call_are_flagged(tmp_path):
    from stepdistill.eval.report import measurement_warnings, write_report

    entry = {"name": "s", "role": "student", "steps": 1, "guidance": 1.0, "nfe": 1, "fid": 50.0, "fid_features": "toy",
             "adherence": 0.9, "diversity": 0.05, "num_samples": 16,
             "latency_ms": {"batch1": 5.0, "batchN": 2.0, "n": 8, "repeats": 1}}
    warnings = measurement_warnings(entry)
    assert len(warnings) == 2 and "16 samples" in warnings[0] and "one timed call" in warnings[1]
    assert measurement_warnings(dict(entry, num_samples=5040, latency_ms=dict(entry["latency_ms"], repeats=5))) == []
    write_report(tmp_path, "toy", [entry])
    md = (tmp_path / "report.md").read_text()
    assert "**Warnings**" in md and "FID from 16 samples" in md


def test_every_recipe_writes_sample_grids_and_a_cfg_distilled_run_does(spec, tmp_path):
    import yaml

    from stepdistill.workflows.distill import distill

    for recipe in sorted((REPO / "training").glob("*.yaml")):
        train = (yaml.safe_load(recipe.read_text()) or {}).get("train", {})
        assert train.get("sample_every", 0) > 0, recipe.name  # (the last update is always sampled too)
    run = tmp_path / "cfg"
    distill(spec, REPO / "training" / "toy-cfg-distill.yaml", run, log=lambda *a: None, export=False,
            overrides=[*QUICK, "train.max_steps=1", "train.sample_every=1", "train.checkpoint_every=0",
                       "generator.teacher_sampler_steps=3"])
    assert (run / "samples" / "step_000001.png").is_file() and (run / "samples" / "step_000001_ema.png").is_file()


def test_a_run_shorter_than_its_warmup_says_so(spec, tmp_path):
    from stepdistill.workflows.distill import distill

    lines = []
    summary = distill(spec, REPO / "training" / "toy-dmd.yaml", tmp_path / "run", log=lines.append, export=False,
                      overrides=[*QUICK, *PAIRS[:2], "objective_config.ode_warmup_steps=3", "train.max_steps=2",
                                 "train.checkpoint_every=0"])
    assert any(line.startswith("[distill] warning: train.max_steps (2) ends within the 3-update") for line in lines)
    assert "no dmd update" in summary["warnings"][0]


def test_model_card_names_the_teachers_folder_and_the_torchvision_lines(spec, tmp_path):
    from stepdistill.workflows.distill import distill

    run = tmp_path / "run"
    distill(spec, REPO / "training" / "toy-lora-cfg-distill.yaml", run, log=lambda *a: None,
            overrides=[*QUICK, "train.max_steps=1", "train.checkpoint_every=1", "generator.teacher_sampler_steps=3"])
    card = (run / "student" / "README.md").read_text()
    teacher_folder = spec.read_text().split("teacher:")[1].split()[0]
    assert "path/to/" not in card and f'from_pretrained("{Path(teacher_folder).resolve()}")' in card
    assert "prints no warning" not in card and "CLIPImageProcessor" in card and "TRANSFORMERS_VERBOSITY" in card


# --- precision where gradients flow through the teacher ------------------------------------------------------------
def test_distill_runs_the_teacher_networks_an_objective_backpropagates_through_in_float32(spec, tmp_path):
    from stepdistill.workflows.distill import distill

    bf16 = tmp_path / "bf16.yaml"
    bf16.write_text(spec.read_text().replace("dtype: float32", "dtype: bfloat16"))
    lines = []
    sid = distill(bf16, REPO / "training" / "toy-sid.yaml", tmp_path / "sid", log=lines.append, export=False,
                  overrides=[*QUICK, "train.max_steps=1", "train.checkpoint_every=0"])
    assert sid["teacher_dtypes"]["unet"] == "float32" and sid["teacher_dtypes"]["vae"] == "bfloat16"
    assert any("sid backpropagates through the teacher's unet: running it in float32" in line for line in lines)
    dmd2 = distill(bf16, REPO / "training" / "toy-dmd2.yaml", tmp_path / "dmd2", log=lambda *a: None, export=False,
                   overrides=[*QUICK, "train.max_steps=1", "train.checkpoint_every=0",
                              "objective_config.gan_enabled=false", "objective_config.ode_warmup_steps=0"])
    assert dmd2["teacher_dtypes"]["unet"] == "bfloat16"  # DMD2 only reads the teacher's output
    dmd = distill(bf16, REPO / "training" / "toy-dmd.yaml", tmp_path / "dmd", log=lambda *a: None, export=False,
                  overrides=[*QUICK, *PAIRS[:2], "train.max_steps=1", "train.checkpoint_every=0",
                             "objective_config.ode_warmup_steps=0", "objective_config.regression_space=image"])
    assert dmd["teacher_dtypes"]["vae"] == "float32" and dmd["teacher_dtypes"]["unet"] == "bfloat16"
