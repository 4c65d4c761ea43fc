"""Benchmark suites and the bench/eval engine on tiny random models: validation errors, the toy-metric report,
resume, failure without a report, and the COCO-style path (Inception FID + CLIP score) on a tiny subset."""

import json

import numpy as np
import pytest
import torch
import yaml

from tiny_models import make_tiny_clip, make_tiny_sd_pipeline

from stepdistill.cli import main
from stepdistill.eval.report import REQUIRED_KEYS
from stepdistill.eval.runner import run_suite
from stepdistill.eval.suite import SuiteError, load_suite


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny SD pipeline that makes 32x32 images (the toy evaluator's size), the standard 16x16 one, and a tiny
    randomly initialised toy evaluator."""
    from stepdistill.toy.evaluator import ToyEvaluator

    root = tmp_path_factory.mktemp("models")
    pipe = make_tiny_sd_pipeline(None)
    pipe.unet.register_to_config(sample_size=16)  # default height = 16 latents x VAE factor 2 = 32 px
    pipe.save_pretrained(str(root / "tiny32"), safe_serialization=True)
    make_tiny_sd_pipeline(root / "tiny16", seed=1)
    torch.manual_seed(0)
    ToyEvaluator(channels=(8, 16), feature_dim=16).save_pretrained(str(root / "evaluator"))
    return {"tiny32": root / "tiny32", "tiny16": root / "tiny16", "evaluator": root / "evaluator"}


def _toy_suite(models, **extra) -> dict:
    suite = {
        "suite": "tiny-toy",
        "metrics": ["toy"],
        "prompts": "toy",
        "max_prompts": 4,
        "samples_per_prompt": 2,
        "batch_size": 4,
        "seed": 7,
        "toy_evaluator": str(models["evaluator"]),
        "toy_reference_size": 64,
        "latency": {"batch": 2, "repeats": 1, "warmup": 0},
        "grid_prompts": 3,
        "entries": [
            {"name": "teacher", "role": "teacher", "pipeline": str(models["tiny32"]), "steps": 2, "guidance": 2.0},
            {"name": "student", "role": "student", "pipeline": str(models["tiny32"]), "steps": 1, "guidance": 1.0,
             "scheduler": "EulerDiscreteScheduler"},
        ],
    }
    suite.update(extra)
    return suite


def _write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _bench(suite_file, out, capsys=None):
    rc = main(["bench", "--suite", str(suite_file), "--out", str(out)])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


# --- validation ----------------------------------------------------------------------------------------------------
def test_invalid_suites_exit_nonzero_and_write_nothing(tmp_path, models, capsys):
    out = tmp_path / "out"
    base = _toy_suite(models)

    bad = json.loads(json.dumps(base))
    bad["entries"][1]["stepz"] = 4
    rc, err = _bench(_write(tmp_path / "unknown.yaml", bad), out, capsys)
    assert rc != 0
    assert "entries[1].stepz" in err and "unknown.yaml" in err and "did you mean 'steps'" in err
    assert "allowed keys in entries[1]: name, role, pipeline, steps, guidance" in err

    bad = dict(base, sampels_per_prompt=3)
    rc, err = _bench(_write(tmp_path / "top.yaml", bad), out, capsys)
    assert rc != 0 and "'sampels_per_prompt'" in err and "samples_per_prompt" in err

    (tmp_path / "empty.txt").write_text("\n  \n")
    rc, err = _bench(_write(tmp_path / "empty.yaml", dict(base, prompts="empty.txt", max_prompts=None)), out, capsys)
    assert rc != 0 and str(tmp_path / "empty.txt") in err and "no prompts" in err

    bad = json.loads(json.dumps(base))
    bad["entries"][0]["pipeline"] = "no/such/pipeline"
    rc, err = _bench(_write(tmp_path / "nopipe.yaml", bad), out, capsys)
    assert rc != 0 and str(tmp_path / "no/such/pipeline") in err and "entries[0].pipeline" in err

    assert not (out / "report.json").exists() and not (out / "samples").exists()


@pytest.mark.parametrize("patch, key", [
    ({"samples_per_prompt": 0}, "samples_per_prompt"),
    ({"samples_per_prompt": 1}, "samples_per_prompt"),  # toy diversity/coverage need 2
    ({"batch_size": "big"}, "batch_size"),
    ({"metrics": ["toy", "fidd"]}, "metrics"),
    ({"latency": {"batch": 0}}, "latency.batch"),
    ({"entries": []}, "entries"),
    ({"entries": [{"name": "t", "role": "teacher", "pipeline": "P", "steps": [4, 0], "guidance": 1.0}]},
     "entries[0].steps[1]"),
    ({"entries": [{"name": "t", "role": "teacher", "pipeline": "P", "steps": 4, "guidance": -1}]},
     "entries[0].guidance"),
    ({"entries": [{"name": "t", "role": "teacher", "pipeline": "P", "steps": 2.5, "guidance": 1}]},
     "entries[0].steps"),
    ({"entries": [{"name": "t", "role": "boss", "pipeline": "P", "steps": 2, "guidance": 1}]}, "entries[0].role"),
    ({"entries": [{"name": "t", "role": "teacher", "pipeline": "P", "steps": 2, "guidance": 1,
                   "scheduler": "NoSuchScheduler"}]}, "entries[0].scheduler"),
    ({"entries": [{"name": "t", "role": "teacher", "pipeline": "P", "steps": 2, "guidance": 1}] * 2}, "entries[1]"),
    ({"prompts": "missing.txt"}, "prompts"),
    ({"metrics": ["fid"], "prompts": "toy"}, "metrics"),  # fid without reference images/statistics
])
def test_suite_value_errors_name_the_key(tmp_path, models, patch, key):
    data = _toy_suite(models)
    for entry in patch.get("entries", []):
        if entry.get("pipeline") == "P":
            entry["pipeline"] = str(models["tiny32"])
    data.update(patch)
    with pytest.raises(SuiteError) as info:
        load_suite(_write(tmp_path / "s.yaml", data))
    assert f"{key}:" in str(info.value) and "s.yaml" in str(info.value)


def test_suite_and_training_read_prompt_files_alike(tmp_path):
    """One reader of .txt / .jsonl prompt files: a suite gets the prompts training gets (plus JSONL styles), and
    training's errors reach a suite as one SuiteError naming the file and the line."""
    from stepdistill.eval.suite import read_prompt_file
    from stepdistill.training.prompts import PromptSource

    (tmp_path / "p.jsonl").write_text('{"prompt": "a red cat", "style": "photo"}\n\n{"prompt": "a dog"}\n')
    (tmp_path / "p.txt").write_text("a red cat\n\n a dog \n")
    for name in ("p.jsonl", "p.txt"):
        prompts, _ = read_prompt_file(tmp_path / name)
        assert prompts == [p.strip() for p in PromptSource.from_spec(tmp_path / name).prompts] == ["a red cat", "a dog"]
    assert read_prompt_file(tmp_path / "p.jsonl")[1] == ["photo", "unstyled"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(SuiteError, match=r"bad.jsonl, line 2: not valid JSON"):
        read_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(SuiteError, match=r"empty.txt: no prompts"):
        read_prompt_file(tmp_path / "empty.txt")


def test_prompt_file_formats(tmp_path, models):
    from stepdistill.eval.suite import read_prompt_file

    (tmp_path / "p.txt").write_text("a red cat\n\n  a blue dog  \n")
    assert read_prompt_file(tmp_path / "p.txt") == (["a red cat", "a blue dog"], None)
    (tmp_path / "p.jsonl").write_text('{"prompt": "x", "style": "anime"}\n\n{"prompt": "y", "image_id": 3}\n')
    assert read_prompt_file(tmp_path / "p.jsonl") == (["x", "y"], ["anime", "unstyled"])
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(SuiteError, match=r"bad.jsonl, line 1"):
        read_prompt_file(tmp_path / "bad.jsonl")
    # a relative prompt path is relative to the suite file; steps/guidance lists expand to their product
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "toy4.txt").write_text("a small red circle on a gray background\n" * 2)
    data = _toy_suite(models, prompts="toy4.txt", max_prompts=None)
    data["entries"] = [dict(data["entries"][0], steps=[1, 2, 4], guidance=[1.0, 3.0])]
    suite = load_suite(_write(tmp_path / "sub" / "s.yaml", data))
    assert suite.prompt_source == str(tmp_path / "sub" / "toy4.txt") and len(suite.prompts) == 2
    assert [(c.steps, c.guidance) for c in suite.configurations()] == [
        (1, 1.0), (1, 3.0), (2, 1.0), (2, 3.0), (4, 1.0), (4, 3.0)]


# --- the toy-metric suite: report, grid, resume --------------------------------------------------------------------
def test_toy_suite_report_and_resume(tmp_path, models, capsys):
    suite_file = _write(tmp_path / "toy.yaml", _toy_suite(models))
    out = tmp_path / "bench"
    rc = main(["bench", "--suite", str(suite_file), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| teacher | teacher | 2 | 2 | 4 |" in captured.out  # the Markdown table is printed

    report = json.loads((out / "report.json").read_text())
    assert report["suite"] == "tiny-toy" and report["device"]
    assert [(e["name"], e["role"], e["steps"], e["nfe"]) for e in report["entries"]] == [
        ("teacher", "teacher", 2, 4), ("student", "student", 1, 1)]
    for e in report["entries"]:
        assert set(REQUIRED_KEYS) <= set(e)
        assert e["fid_features"] == "toy" and np.isfinite(e["fid"]) and 0 <= e["adherence"] <= 1
        assert np.isfinite(e["diversity"]) and set(e["coverage"]) == {"x", "y", "radius"}
        assert e["num_samples"] == 8 and set(e["latency_ms"]) >= {"batch1", "batchN", "n"}
        assert e["latency_ms"]["n"] == 2
    assert report["entries"][1]["scheduler"] == "EulerDiscreteScheduler"
    for name in ("report.md", "quality.png", "grid.png", "metrics.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "| student | student | 1 | 1 | 1 |" in md and "grid.png" in md and "Grid columns" in md
    from PIL import Image

    grid = Image.open(out / "grid.png")  # 2 rows (entries) x 3 columns of 32 px images (+2 px borders), x4
    assert grid.size == (4 * (3 * 34 + 2), 4 * (2 * 34 + 2))
    status = json.loads((out / "run_status.json").read_text())
    assert status["state"] == "complete" and status["generated_images"] == 16

    # restart: nothing is generated, scored or timed again; the samples are untouched
    samples = sorted((out / "samples").rglob("batch-*.npz"))
    assert len(samples) == 4  # 2 configurations x 2 batches of 4
    mtimes = {p: p.stat().st_mtime_ns for p in samples}
    suite = load_suite(suite_file)
    again = run_suite(suite, out, log=lambda msg: None)
    assert again["run"]["generated_images"] == 0 and again["run"]["generation_calls"] == 0
    assert again["run"]["cached_entries"] == 2
    assert {p: p.stat().st_mtime_ns for p in samples} == mtimes
    assert [e["fid"] for e in again["entries"]] == [e["fid"] for e in report["entries"]]
    assert (out / "report.previous.json").is_file()  # the earlier report was retired, then rewritten

    # a lost batch (and lost entry cache) is regenerated alone, and the metrics come out identical
    samples[1].unlink()
    for f in (out / "entries").iterdir():
        f.unlink()
    third = run_suite(suite, out, log=lambda msg: None)
    assert third["run"]["generated_images"] == 4 and third["run"]["generation_calls"] == 1
    assert third["entries"][0]["fid"] == pytest.approx(report["entries"][0]["fid"], rel=1e-6)
    assert third["entries"][0]["adherence"] == report["entries"][0]["adherence"]


def test_remeasure_rescores_stored_samples_and_reports_each_entry(tmp_path, models):
    """``remeasure`` (what ``stepdistill demo`` uses): stored samples are reused, every entry is scored and timed
    again; ``on_entry`` sees each entry as it finishes."""
    suite = load_suite(_write(tmp_path / "toy.yaml", _toy_suite(models)))
    out = tmp_path / "bench"
    seen = []
    first = run_suite(suite, out, log=lambda msg: None, write_files=False, on_entry=seen.append)
    assert [e["name"] for e in seen] == ["teacher", "student"] and seen == first["entries"]
    again = run_suite(suite, out, log=lambda msg: None, write_files=False, remeasure=True)
    assert again["run"]["generated_images"] == 0 and again["run"]["cached_entries"] == 0
    assert [e["fid"] for e in again["entries"]] == [e["fid"] for e in first["entries"]]
    assert not (out / "report.json").exists()


def test_failure_leaves_no_complete_report(tmp_path, models, capsys, monkeypatch):
    suite_file = _write(tmp_path / "toy.yaml", _toy_suite(models, latency=False))
    out = tmp_path / "bench"
    out.mkdir()
    (out / "report.json").write_text('{"suite": "an older run", "entries": []}')
    import stepdistill.eval.generate as gen

    real, calls = gen.generate, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second configuration's first batch
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", flaky)
    rc = main(["bench", "--suite", str(suite_file), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("stepdistill bench: error:") == 1 and "simulated crash" in err.strip().splitlines()[-1]
    assert not (out / "report.json").exists() and not (out / "report.md").exists()
    assert json.loads((out / "report.previous.json").read_text())["suite"] == "an older run"
    status = json.loads((out / "run_status.json").read_text())
    assert status["state"] == "failed" and "simulated crash" in status["message"] and len(status["finished"]) == 1

    # the eval command: the same engine, one entry -> one JSON file
    monkeypatch.setattr(gen, "generate", real)
    metrics = tmp_path / "metrics.json"
    rc = main(["eval", "--pipeline", str(models["tiny32"]), "--prompts", "toy", "--max-prompts", "2", "--steps", "1",
               "--guidance", "1", "--metrics", "toy", "--samples-per-prompt", "2", "--toy-evaluator",
               str(models["evaluator"]), "--toy-reference-size", "32", "--latency-batch", "0", "--out", str(metrics)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(metrics.read_text())
    (entry,) = result["entries"]
    assert entry["num_samples"] == 4 and entry["latency_ms"] is None and set(REQUIRED_KEYS) <= set(entry)
    assert (tmp_path / "metrics_samples" / "samples").is_dir()


def test_unavailable_metric_fails_before_generating(tmp_path, models, capsys, monkeypatch):
    monkeypatch.delenv("STEPDISTILL_INCEPTION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "ref").mkdir()
    data = _toy_suite(models, metrics=["fid"], reference_images="ref")
    rc = main(["bench", "--suite", str(_write(tmp_path / "fid.yaml", data)), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "STEPDISTILL_INCEPTION" in err and "never downloads" in err
    assert not (tmp_path / "out" / "samples").exists() and not (tmp_path / "out" / "report.json").exists()


# --- the COCO-style path: Inception FID + CLIP score on a tiny subset ----------------------------------------------
def test_coco_style_fid_and_clip(tmp_path, models):
    from PIL import Image

    from stepdistill.eval.fid import FeatureStats
    from stepdistill.eval.inception import (
        INCEPTION_STATE_DICT_NAME,
        InceptionV3Features,
    )

    (tmp_path / "captions.txt").write_text("a red cat\na blue dog on grass\na green car\na small house\n")
    ref = tmp_path / "val2014"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):  # not square: the centre square is taken before the 256-style resize
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(ref / f"COCO_val2014_{k:012d}.png")
    torch.manual_seed(0)
    state = {k: v for k, v in InceptionV3Features().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / INCEPTION_STATE_DICT_NAME)  # the pytorch-fid file layout
    del state
    data = {
        "suite": "coco-tiny",
        "metrics": ["fid", "clip"],
        "prompts": "captions.txt",
        "samples_per_prompt": 2,
        "batch_size": 8,
        "resolution": 24,
        "fid_resize": 16,
        "inception": str(tmp_path),  # a folder holding the weights file is enough
        "reference_images": "val2014",
        "reference_stats": "stats/coco-tiny.npz",
        "clip_model": str(make_tiny_clip(tmp_path / "tiny-clip")),
        "latency": False,
        "entries": [{"name": "teacher", "role": "teacher", "pipeline": str(models["tiny16"]), "steps": 2,
                     "guidance": 3.0, "negative_prompt": "blurry"}],
    }
    out = tmp_path / "out"
    report = run_suite(load_suite(_write(tmp_path / "coco.yaml", data)), out, log=lambda msg: None)
    (entry,) = report["entries"]
    assert entry["fid_features"] == "inception-2015-12-05" and np.isfinite(entry["fid"])
    assert entry["fid_reference_size"] == 4
    assert np.isfinite(entry["clip_score_cosine"]) and entry["clip_model"] == "tiny-clip"
    assert entry["adherence"] == entry["clip_score_cosine"] and "CLIP" in entry["adherence_metric"]
    assert np.isfinite(entry["diversity"]) and entry["diversity_features"] == "clip (tiny-clip)"
    assert entry["latency_ms"] is None and entry["nfe"] == 4 and entry["num_samples"] == 8
    with np.load(next((out / "samples").rglob("batch-*.npz"))) as batch:
        assert batch["images"].shape == (8, 3, 24, 24) and batch["images"].dtype == np.uint8
    stats = FeatureStats.load(tmp_path / "stats" / "coco-tiny.npz")  # cached with its fingerprint
    assert stats.num == 4 and stats.fingerprint["fid_resize"] == 16 and stats.fingerprint["num_images"] == 4
    md = (out / "report.md").read_text()
    assert "inception-2015-12-05" in md and "CLIP cos" in md
