"""Teacher loading (folder / single file / toy), prompt encoding, CFG and conversions on tiny random SD1-, SD2- (v)
and SDXL-like pipelines built in the test; everything offline."""

from __future__ import annotations

import json
import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import stepdistill.models.teacher as teacher_mod
from stepdistill.models.conditioning import PromptEmbeds, unet_forward
from stepdistill.models.teacher import Teacher, TeacherLoadError
from tiny_models import make_tiny_sd_pipeline, make_tiny_sdxl_pipeline, sd_pipeline_to_single_file

FAMILIES = ("sd1", "sd2", "sdxl")
PROMPTS = ["a red circle on a blue background", "a small green square"]




@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted during a teacher test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    make_tiny_sd_pipeline(root / "sd1", prediction_type="epsilon")
    make_tiny_sd_pipeline(root / "sd2", prediction_type="v_prediction")
    make_tiny_sdxl_pipeline(root / "sdxl")
    return root


@pytest.fixture(scope="module")
def teachers(folders):
    return {name: Teacher.load(folders / name) for name in FAMILIES}


def _x_t(teacher: Teacher, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *teacher.latent_shape, generator=torch.Generator().manual_seed(seed))


# --- loading ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_load_folder(teachers, folders, name):
    t = teachers[name]
    assert t.family == ("sdxl" if name == "sdxl" else "sd")
    assert t.prediction_type == ("v_prediction" if name == "sd2" else "epsilon")
    assert t.schedule.prediction_type == t.prediction_type
    assert t.latent_shape == (4, 8, 8)
    assert t.image_size == (16, 16)
    assert t.source == str(folders / name)
    if name == "sdxl":
        assert t.text_encoder_2 is not None and t.tokenizer_2 is not None
    else:
        assert t.pipeline.safety_checker is None and t.text_encoder_2 is None
    for module in (t.unet, t.vae, t.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    torch.testing.assert_close(
        t.schedule.alphas_cumprod, t.pipeline.scheduler.alphas_cumprod.to(torch.float64), rtol=0, atol=1e-7
    )


def test_toy_resolves_to_assets_folder(monkeypatch, folders):
    repo = teacher_mod.Path(teacher_mod.__file__).resolve().parents[2]
    assert teacher_mod.TOY_TEACHER_DIR == repo / "assets" / "toy-teacher"
    monkeypatch.setattr(teacher_mod, "TOY_TEACHER_DIR", folders / "sd1")
    assert Teacher.load("toy").source == str(folders / "sd1")


def test_toy_missing_says_how_to_create(monkeypatch, tmp_path):
    missing = tmp_path / "assets" / "toy-teacher"
    monkeypatch.setattr(teacher_mod, "TOY_TEACHER_DIR", missing)
    with pytest.raises(TeacherLoadError, match="stepdistill toy train-teacher") as info:
        Teacher.load("toy")
    assert str(missing) in str(info.value)


# --- load errors ------------------------------------------------------------------------------------------------------
def test_error_nonexistent_path(tmp_path):
    path = tmp_path / "no-such-model"
    with pytest.raises(TeacherLoadError, match="does not exist") as info:
        Teacher.load(path)
    assert str(path) in str(info.value)


def test_error_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(TeacherLoadError, match="model_index.json") as info:
        Teacher.load(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_error_truncated_safetensors(tmp_path, teachers):
    file = sd_pipeline_to_single_file(teachers["sd1"].pipeline, tmp_path / "full.safetensors")
    data = file.read_bytes()
    for cut in (len(data) // 2, 5):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(TeacherLoadError, match="safetensors") as info:
            Teacher.load(broken, config=teachers["sd1"].source)
        assert str(broken) in str(info.value)


def test_error_unsupported_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    with pytest.raises(TeacherLoadError) as info:
        Teacher.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "SanaPipeline" in message
    for supported in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert supported in message


def test_error_incomplete_folder(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(TeacherLoadError) as info:
        Teacher.load(tmp_path)
    assert str(tmp_path) in str(info.value)


# --- single-file checkpoints ------------------------------------------------------------------------------------------
def test_single_file_round_trip(tmp_path, teachers):
    ref = teachers["sd1"]
    file = sd_pipeline_to_single_file(ref.pipeline, tmp_path / "tiny-sd1.safetensors")
    t = Teacher.load(file, config=ref.source)
    assert t.source == str(file) and t.family == "sd" and t.latent_shape == ref.latent_shape
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, name).state_dict(), getattr(t, name).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    e = t.encode_prompt(PROMPTS)
    torch.testing.assert_close(e.cond, ref.encode_prompt(PROMPTS).cond)
    x = _x_t(t)
    torch.testing.assert_close(t.predict(x, 500, e, 3.0), ref.predict(x, 500, e, 3.0))


def test_single_file_without_config_says_what_to_pass(tmp_path, teachers):
    file = sd_pipeline_to_single_file(teachers["sd1"].pipeline, tmp_path / "tiny.safetensors")
    with pytest.raises(TeacherLoadError, match="config=") as info:
        Teacher.load(file)
    assert str(file) in str(info.value)


# --- prompt encoding --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_encode_prompt_shapes(teachers, name):
    t = teachers[name]
    e = t.encode_prompt(PROMPTS)
    dim = 64 if name == "sdxl" else 32
    assert len(e) == 2
    assert e.cond.shape == (2, 77, dim) and e.uncond.shape == (2, 77, dim)
    if name == "sdxl":
        assert e.cond_added["text_embeds"].shape == (2, 32)
        assert e.uncond_added["text_embeds"].shape == (2, 32)
        expected_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)
        torch.testing.assert_close(e.cond_added["time_ids"], expected_ids)
        torch.testing.assert_close(e.uncond_added["time_ids"], expected_ids)
        assert set(e.unet_kwargs("uncond")) == {"encoder_hidden_states", "added_cond_kwargs"}
    else:
        assert e.cond_added is None and e.uncond_added is None
        assert set(e.unet_kwargs()) == {"encoder_hidden_states"}
    no_uncond = t.encode_prompt(PROMPTS, with_uncond=False)
    assert no_uncond.uncond is None and no_uncond.uncond_added is None
    torch.testing.assert_close(no_uncond.cond, e.cond)


def test_sd_uncond_is_the_empty_prompt(teachers):
    t = teachers["sd1"]
    e = t.encode_prompt(PROMPTS)
    ids = t.tokenizer([""] * 2, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = t.text_encoder(ids)[0]
    torch.testing.assert_close(e.uncond, direct)
    neg = t.encode_prompt(PROMPTS, negative_prompts="a large triangle")
    assert not torch.allclose(neg.uncond, e.uncond)
    torch.testing.assert_close(neg.cond, e.cond)


def test_sdxl_uncond_follows_force_zeros_for_empty_prompt(teachers):
    t = teachers["sdxl"]
    assert t.pipeline.config.force_zeros_for_empty_prompt
    e = t.encode_prompt(PROMPTS)
    assert torch.count_nonzero(e.uncond) == 0 and torch.count_nonzero(e.uncond_added["text_embeds"]) == 0
    explicit = t.encode_prompt(PROMPTS, negative_prompts=["", ""])
    assert torch.count_nonzero(explicit.uncond) > 0


def test_prompt_embeds_select_and_to(teachers):
    e = teachers["sdxl"].encode_prompt(PROMPTS + ["a blue circle"])
    one = e.select(1)
    assert len(one) == 1 and one.cond_added["time_ids"].shape == (1, 6)
    torch.testing.assert_close(one.cond, e.cond[1:2])
    masked = e.select(torch.tensor([True, False, True]))
    torch.testing.assert_close(masked.uncond_added["text_embeds"], e.uncond_added["text_embeds"][[0, 2]])
    assert len(e.select(slice(0, 2))) == 2 and len(e.select([2, 0])) == 2
    d = e.to(dtype=torch.float64)
    assert d.cond.dtype == torch.float64 and d.uncond_added["time_ids"].dtype == torch.float64


# --- guided prediction ------------------------------------------------------------------------------------------------
def _unet_twice(t: Teacher, x, steps, e: PromptEmbeds, w: float) -> torch.Tensor:
    """CFG computed independently: two separate UNet calls."""
    with torch.no_grad():
        u = t.unet(x, steps, **e.unet_kwargs("uncond")).sample
        c = t.unet(x, steps, **e.unet_kwargs("cond")).sample
    return u + w * (c - u)


@pytest.mark.parametrize("name", FAMILIES)
def test_cfg_equals_formula_in_one_batched_forward(teachers, name):
    t = teachers[name]
    e = t.encode_prompt(PROMPTS)
    x = _x_t(t)
    steps = torch.tensor([17, 801])
    calls = []
    handle = t.unet.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            guided = t.predict(x, steps, e, guidance_scale=4.5)
            cond_only = t.predict(x, steps, e, guidance_scale=1.0)
    finally:
        handle.remove()
    assert calls == [4, 2]  # CFG: one forward of 2B rows; w == 1: one forward of B rows
    torch.testing.assert_close(guided, _unet_twice(t, x, steps, e, 4.5), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cond_only, _unet_twice(t, x, steps, e, 1.0), rtol=1e-4, atol=1e-5)


def test_int_timestep_and_broadcast_embeds(teachers):
    t = teachers["sd1"]
    e = t.encode_prompt(PROMPTS)
    x = _x_t(t)
    with torch.no_grad():
        a = t.predict(x, 500, e, 2.0)
        b = t.predict(x, torch.tensor([500, 500]), e, 2.0)
        single = t.predict(x, 500, e.select(0), 2.0)
        per_row = t.predict(x, 500, e.select([0, 0]), 2.0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(single, per_row)


def test_cfg_without_uncond_is_an_error(teachers):
    t = teachers["sd1"]
    e = t.encode_prompt(PROMPTS, with_uncond=False)
    with pytest.raises(ValueError, match="with_uncond=True"):
        unet_forward(t.unet, _x_t(t), 10, e, guidance_scale=3.0)


def test_gradients_flow_to_input_not_weights(teachers):
    t = teachers["sd1"]
    e = t.encode_prompt(PROMPTS)
    x = _x_t(t).requires_grad_(True)
    t.predict_x0(x, 300, e, 2.0).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is None for p in t.unet.parameters())


def test_predict_x0_v_prediction_matches_closed_form(teachers):
    t = teachers["sd2"]
    e = t.encode_prompt(PROMPTS)
    x = _x_t(t)
    steps = torch.tensor([5, 900])
    with torch.no_grad():
        v = t.predict(x, steps, e, 3.0)
        x0 = t.predict_x0(x, steps, e, 3.0)
        eps = t.predict_eps(x, steps, e, 3.0)
    ac = t.pipeline.scheduler.alphas_cumprod.to(torch.float64)[steps].view(-1, 1, 1, 1)
    a, s = ac.sqrt().float(), (1 - ac).sqrt().float()
    torch.testing.assert_close(x0, a * x - s * v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps, a * v + s * x, rtol=1e-5, atol=1e-5)


def test_predict_x0_epsilon_matches_closed_form(teachers):
    t = teachers["sd1"]
    e = t.encode_prompt(PROMPTS)
    x = _x_t(t)
    with torch.no_grad():
        eps = t.predict(x, 250, e, 2.0)
        x0 = t.predict_x0(x, 250, e, 2.0)
        eps2 = t.predict_eps(x, 250, e, 2.0)
    ac = float(t.pipeline.scheduler.alphas_cumprod[250])
    torch.testing.assert_close(x0, (x - (1 - ac) ** 0.5 * eps) / ac**0.5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps2, eps)


# --- VAE and sampling -------------------------------------------------------------------------------------------------
def test_decode_encode_use_scaling_factor(teachers):
    t = teachers["sd1"]
    sf = t.vae.config.scaling_factor
    latents = _x_t(t)
    with torch.no_grad():
        images = t.decode(latents)
        raw = t.vae.decode(latents / sf).sample
        assert images.shape == (2, 3, 16, 16)
        assert images.min() >= -1 and images.max() <= 1
        torch.testing.assert_close(images, raw.clamp(-1, 1))
        z = t.encode(images)
        assert z.shape == (2, *t.latent_shape)
        torch.testing.assert_close(z, t.vae.encode(images).latent_dist.mean * sf)


def test_decode_encode_apply_shift_factor(folders):
    t = Teacher.load(folders / "sd1")
    t.vae.register_to_config(shift_factor=0.25)
    sf = t.vae.config.scaling_factor
    latents = _x_t(t)
    with torch.no_grad():
        torch.testing.assert_close(t.decode(latents), t.vae.decode(latents / sf + 0.25).sample.clamp(-1, 1))
        images = t.decode(latents)
        torch.testing.assert_close(t.encode(images), (t.vae.encode(images).latent_dist.mean - 0.25) * sf)


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_shape_range_and_determinism(teachers, name):
    t = teachers[name]
    prompts = PROMPTS + ["a blue circle"]
    a = t.sample(prompts, 2, 3.0, generator=torch.Generator().manual_seed(0), negative_prompt="a square")
    b = t.sample(prompts, 2, 3.0, generator=torch.Generator().manual_seed(0), negative_prompt="a square")
    assert a.shape == (3, 3, 16, 16)
    assert a.min() >= -1 and a.max() <= 1 and a.min() < 0 < a.max()
    torch.testing.assert_close(a, b)
    c = t.sample(prompts, 2, 1.0, generator=torch.Generator().manual_seed(0))
    assert c.shape == (3, 3, 16, 16)
