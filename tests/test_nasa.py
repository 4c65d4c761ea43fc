"""SNOOPI's NASA attention (stepdistill/export/shipped/pipeline_nasa.py): the paper's properties against an explicit
softmax(Q·Kᵀ/√d)·V computed here from the layer's weights, the pipeline, and plain-diffusers loading of an export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from stepdistill.export.shipped.pipeline_nasa import NASAAttnProcessor, NASAStableDiffusionPipeline, apply_nasa

from plain_diffusers import run_without_stepdistill
from tiny_models import make_tiny_sd_pipeline

HEADS, DIM_HEAD, QUERY_DIM, CROSS_DIM = 2, 8, 16, 12


def _layer(cross: bool = True) -> Attention:
    torch.manual_seed(0)
    layer = Attention(QUERY_DIM, cross_attention_dim=CROSS_DIM if cross else None, heads=HEADS, dim_head=DIM_HEAD,
                      bias=False, out_bias=True)
    with torch.no_grad():  # a non-zero output bias, so "linear in α" is checked as affine at the output
        layer.to_out[0].bias.normal_()
    return layer.double().eval()


def _explicit_z(layer: Attention, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """softmax(Q·Kᵀ/√d)·V per head with the layer's W_q, W_k, W_v, heads concatenated: (B, L, heads·d)."""
    q, k, v = h @ layer.to_q.weight.T, c @ layer.to_k.weight.T, c @ layer.to_v.weight.T
    out = []
    for i in range(HEADS):
        sl = slice(i * DIM_HEAD, (i + 1) * DIM_HEAD)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(DIM_HEAD), dim=-1)
        out.append(w @ v[..., sl])
    return torch.cat(out, dim=-1)


def _out(layer: Attention, z: torch.Tensor) -> torch.Tensor:
    return z @ layer.to_out[0].weight.T + layer.to_out[0].bias


def _inputs():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 5, QUERY_DIM, generator=g, dtype=torch.float64)
    c_pos = torch.randn(3, 7, CROSS_DIM, generator=g, dtype=torch.float64)
    c_neg = torch.randn(3, 7, CROSS_DIM, generator=g, dtype=torch.float64)
    return h, c_pos, c_neg


def test_nasa_output_is_z_plus_minus_alpha_z_minus_of_the_explicit_attention():
    layer, (h, c_pos, c_neg) = _layer(), _inputs()
    layer.set_processor(NASAAttnProcessor())
    got = layer(h, encoder_hidden_states=c_pos, nasa_negative=c_neg, nasa_alpha=0.3)
    want = _out(layer, _explicit_z(layer, h, c_pos) - 0.3 * _explicit_z(layer, h, c_neg))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_identity_at_alpha_zero_and_without_a_negative():
    layer, (h, c_pos, c_neg) = _layer(), _inputs()
    layer.set_processor(AttnProcessor2_0())
    plain = layer(h, encoder_hidden_states=c_pos)
    torch.testing.assert_close(plain, _out(layer, _explicit_z(layer, h, c_pos)), rtol=1e-10, atol=1e-10)
    layer.set_processor(NASAAttnProcessor())
    torch.testing.assert_close(layer(h, encoder_hidden_states=c_pos, nasa_negative=c_neg, nasa_alpha=0.0), plain,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(h, encoder_hidden_states=c_pos), plain, rtol=1e-12, atol=1e-12)


def test_linear_in_alpha():
    layer, (h, c_pos, c_neg) = _layer(), _inputs()
    layer.set_processor(NASAAttnProcessor())
    f = {a: layer(h, encoder_hidden_states=c_pos, nasa_negative=c_neg, nasa_alpha=a) for a in (0.0, 0.1, 0.25, 1.0)}
    for a in (0.1, 0.25):
        torch.testing.assert_close(f[a] - f[0.0], a * (f[1.0] - f[0.0]), rtol=1e-10, atol=1e-10)
    assert (f[1.0] - f[0.0]).abs().max() > 1e-3  # the negative does change the output


def test_negative_equal_to_the_prompt_gives_one_minus_alpha_z_plus():
    layer, (h, c_pos, _) = _layer(), _inputs()
    layer.set_processor(NASAAttnProcessor())
    got = layer(h, encoder_hidden_states=c_pos, nasa_negative=c_pos.clone(), nasa_alpha=0.2)
    torch.testing.assert_close(got, _out(layer, 0.8 * _explicit_z(layer, h, c_pos)), rtol=1e-10, atol=1e-10)


def test_self_attention_is_untouched():
    layer, (h, _, c_neg) = _layer(cross=False), _inputs()
    layer.set_processor(AttnProcessor2_0())
    plain = layer(h)
    layer.set_processor(NASAAttnProcessor())
    fake_negative = torch.randn(3, 5, QUERY_DIM, dtype=torch.float64)
    torch.testing.assert_close(layer(h, nasa_negative=fake_negative, nasa_alpha=0.5), plain, rtol=1e-12, atol=1e-12)


def test_batch_mismatch_is_a_clear_error():
    layer, (h, c_pos, c_neg) = _layer(), _inputs()
    layer.set_processor(NASAAttnProcessor())
    with pytest.raises(ValueError, match="nasa_negative has batch 1"):
        layer(h, encoder_hidden_states=c_pos, nasa_negative=c_neg[:1], nasa_alpha=0.1)


def test_unet_with_nasa_processors_matches_sdpa_without_a_negative():
    pipe = make_tiny_sd_pipeline()
    unet = pipe.unet.eval()
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    c = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=c).sample
        apply_nasa(unet)
        same = unet(x, t, encoder_hidden_states=c).sample
        steered = unet(x, t, encoder_hidden_states=c,
                       cross_attention_kwargs={"nasa_negative": torch.randn_like(c), "nasa_alpha": 0.1}).sample
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)
    assert (steered - plain).abs().max() > 1e-4


def test_pipeline_negative_prompt_through_nasa():
    base = make_tiny_sd_pipeline()
    pipe = NASAStableDiffusionPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=1, guidance_scale=1.0, output_type="np")

    def run(**extra):
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw, **extra).images

    plain = run()
    assert np.abs(run(negative_prompt="a blue square", nasa_alpha=0.0) - plain).max() < 1e-6
    steered = run(negative_prompt="a blue square", nasa_alpha=0.5)
    assert np.abs(steered - plain).max() > 1e-4
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        run(negative_prompt=["a", "b"], nasa_alpha=0.1)


_RUNNER = r"""
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
spec = json.loads(open(sys.argv[1]).read())
folder = spec["folder"]
pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder + "/pipeline_nasa.py",
                                         trust_remote_code=True, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
def run(**extra):
    return pipe(spec["prompt"], generator=torch.Generator().manual_seed(0), num_inference_steps=1, guidance_scale=1.0,
                output_type="np", **extra).images
plain, steered = run(), run(negative_prompt=spec["negative"], nasa_alpha=0.5)
np.save(spec["steered"], steered)
json.dump({"class": type(pipe).__name__, "changed": float(np.abs(steered - plain).max())}, open(spec["report"], "w"))
"""


def test_exported_student_ships_nasa_for_plain_diffusers(tmp_path):
    from stepdistill.export.students import export_student
    from stepdistill.models.generators import Generator
    from stepdistill.models.teacher import Teacher

    make_tiny_sd_pipeline(tmp_path / "teacher")
    teacher = Teacher.load(str(tmp_path / "teacher"))
    folder = export_student(teacher, Generator.from_teacher(teacher, timesteps=(999,)), tmp_path / "student",
                            method="dmd2", ema=False)
    assert (folder / "pipeline_nasa.py").is_file()
    card = (folder / "README.md").read_text()
    assert f'custom_pipeline="{folder}/pipeline_nasa.py"' in card
    spec = {"folder": str(folder), "prompt": "a red circle", "negative": "a blue square",
            "steered": str(tmp_path / "steered.npy"), "report": str(tmp_path / "report.json")}
    report = run_without_stepdistill(_RUNNER, spec, tmp_path)
    assert report["stepdistill_modules"] == []
    assert report["class"] == "NASAStableDiffusionPipeline" and report["changed"] > 1e-4
    # the same images in this process, through stepdistill's generate()
    from stepdistill.eval.generate import generate, load_pipeline

    ours = generate(load_pipeline(folder), ["a red circle"], [0], 1, 1.0, negative_prompt="a blue square",
                    nasa_alpha=0.5, progress=False)
    theirs = torch.from_numpy(np.load(spec["steered"])).permute(0, 3, 1, 2) * 2 - 1
    assert (ours - theirs).abs().max() < 1e-5
