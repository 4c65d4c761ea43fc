"""`stepdistill merge` (stepdistill/export/merge.py): θ(λ) = (1 − λ)·θ_a + λ·θ_b written as a student folder, the
refusals (architecture, base, sampler), and the sweep's folders and bench suite."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import cli
from tiny_models import make_tiny_sd_pipeline


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    from stepdistill.export.students import export_student
    from stepdistill.models.generators import TeacherSamplerGenerator
    from stepdistill.models.teacher import Teacher
    from stepdistill.training.tsm import narrow_unet

    root = tmp_path_factory.mktemp("merge")
    teacher = Teacher(make_tiny_sd_pipeline())
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        gen = TeacherSamplerGenerator.from_teacher(teacher, 4)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in gen.unet.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out[name] = export_student(teacher, gen, root / name, method="cfg_distill")
    gen = TeacherSamplerGenerator.from_teacher(teacher, 2)
    out["two_steps"] = export_student(teacher, gen, root / "two_steps", method="cfg_distill")
    gen = TeacherSamplerGenerator(narrow_unet(teacher.unet, {"block_out_channels": [32, 32]}), teacher.schedule,
                                  teacher.pipeline.scheduler, 4)
    out["narrow"] = export_student(teacher, gen, root / "narrow", method="cfg_distill")
    other = Teacher(make_tiny_sd_pipeline(seed=5))
    out["other_base"] = export_student(other, TeacherSamplerGenerator.from_teacher(other, 4), root / "other",
                                       method="cfg_distill")
    out["root"] = root
    return out


def test_merge_interpolates_every_unet_tensor_and_keeps_the_rest(students):
    from stepdistill.eval.generate import load_pipeline
    from stepdistill.export.merge import merge_students

    root = students["root"]
    path = merge_students(students["a"], students["b"], 0.25, root / "m25")
    sd_a, sd_b = (load_file(str(students[k] / "unet" / "diffusion_pytorch_model.safetensors")) for k in "ab")
    got = load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    assert got.keys() == sd_a.keys()
    for k in sd_a:
        assert torch.allclose(got[k], 0.75 * sd_a[k] + 0.25 * sd_b[k], atol=1e-6), k
    assert (got[k] - sd_a[k]).abs().max() > 0  # not a copy of a
    info = json.loads((path / "stepdistill_export.json").read_text())
    assert info["merge"]["alpha"] == 0.25 and info["steps"] == 4
    edge = load_file(str(merge_students(students["a"], students["b"], 0.0, root / "m0") / "unet" /
                         "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(edge[k], sd_a[k]) for k in sd_a)
    pipe = load_pipeline(path)  # an ordinary student folder
    image = pipe(["a small red cross on a gray background"], num_inference_steps=4, guidance_scale=1.0,
                 output_type="np").images
    assert image.shape[0] == 1 and (image == image).all()


@pytest.mark.parametrize("other, words", [("narrow", "architectures"), ("other_base", "weights"),
                                          ("two_steps", "sample differently")])
def test_merge_refuses_students_that_do_not_share_architecture_base_or_sampler(students, other, words):
    from stepdistill.export.merge import MergeError, merge_students

    with pytest.raises(MergeError, match=words):
        merge_students(students["a"], students[other], 0.5, students["root"] / f"bad_{other}")
    assert not (students["root"] / f"bad_{other}").exists()
    with pytest.raises(MergeError, match="not an exported"):
        merge_students(students["a"], students["root"], 0.5, students["root"] / "bad")
    with pytest.raises(MergeError, match=r"\[0, 1\]"):
        merge_students(students["a"], students["b"], 1.5, students["root"] / "bad")


def test_merge_cli_sweep_writes_one_folder_per_lambda_and_a_bench_suite(students):
    out = students["root"] / "sweep"
    proc = cli("merge", "--a", str(students["a"]), "--b", str(students["b"]), "--sweep", "0,0.5,1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    suite = yaml.safe_load((out / "front.yaml").read_text())
    assert [e["name"] for e in suite["entries"]] == ["lambda_0", "lambda_0.5", "lambda_1"]
    assert suite["metrics"] == ["toy"] and all(e["steps"] == 4 and e["guidance"] == 1.0 for e in suite["entries"])
    assert all((out / e["name"] / "unet" / "config.json").is_file() for e in suite["entries"])
    proc = cli("merge", "--a", str(students["a"]), "--b", str(students["narrow"]), "--alpha", "0.5", "--out",
               str(out / "x"))
    assert proc.returncode != 0 and "architectures" in proc.stderr and "Traceback" not in proc.stderr


def test_report_plots_the_quality_diversity_front_only_with_two_points(tmp_path):
    from stepdistill.eval.report import plot_front

    entries = [{"name": f"lambda_{lam}", "diversity": 0.03 + 0.01 * lam, "adherence": 0.97 - 0.02 * lam,
                "fid": 40 + 5 * lam} for lam in (0, 0.5, 1)]
    assert plot_front(entries, tmp_path / "front.png") and (tmp_path / "front.png").stat().st_size > 1000
    assert not plot_front(entries[:1], tmp_path / "one.png") and not (tmp_path / "one.png").exists()


def test_merge_never_deletes_what_it_did_not_write(students, tmp_path):
    from stepdistill.core.outputs import OutputFolderError
    from stepdistill.export.merge import MergeError, merge_students, merge_sweep

    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match="notes.txt.*--overwrite"):
        merge_students(students["a"], students["b"], 0.5, notes)
    assert (notes / "notes.txt").read_text() == "keep me"
    sweep = tmp_path / "sweep"
    (sweep / "lambda_0.5").mkdir(parents=True)
    (sweep / "lambda_0.5" / "notes.txt").write_text("x")
    with pytest.raises(OutputFolderError, match="notes.txt"):  # a sweep checks every folder before writing one
        merge_sweep(students["a"], students["b"], [0.25, 0.5], sweep)
    assert not (sweep / "lambda_0.25").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(OutputFolderError, match="is a file"):
        merge_students(students["a"], students["b"], 0.5, a_file)
    assert a_file.read_text() == "not a folder"
    with pytest.raises(OutputFolderError, match="an input of this command"):  # never the inputs, even with overwrite
        merge_students(students["a"], students["b"], 0.5, students["a"], overwrite=True)
    # --overwrite says so: the folder is replaced by the merged student
    merge_students(students["a"], students["b"], 0.5, notes, overwrite=True)
    assert not (notes / "notes.txt").exists() and (notes / "stepdistill_export.json").is_file()
    # a truncated UNet file is named
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(students["b"], broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(MergeError, match=str(weights)):
        merge_students(students["a"], broken, 0.5, tmp_path / "m")
