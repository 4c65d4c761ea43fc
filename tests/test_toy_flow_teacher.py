"""The toy flow-matching teacher: the shipped SD3-style asset loads and samples, its training function runs and writes
a loadable folder, and its loss is the rectified-flow loss computed by hand."""

import json

import pytest
import torch

from stepdistill.core.assets import PIPELINE_CALL_FILE, TOY_FLOW_TEACHER
from stepdistill.toy import models

TINY = dict(num_layers=1, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16)


@pytest.mark.skipif(not (TOY_FLOW_TEACHER / "model_index.json").is_file(), reason="toy flow teacher asset not present")
def test_shipped_flow_teacher_loads_as_sd3_and_samples():
    from stepdistill.export.loading import load_pipeline, step_kwargs
    from stepdistill.models.teacher import Teacher

    teacher = Teacher.load("toy-flow")
    assert teacher.family == "sd3" and teacher.prediction_type == "flow" and teacher.is_flow
    assert teacher.dtype == torch.float32  # stored in float16, loaded in float32
    assert teacher.latent_shape == (4, 8, 8) and teacher.image_size == (32, 32)
    assert teacher.call_kwargs == {"max_sequence_length": models.FLOW_T5_TOKENS}
    embeds = teacher.encode_prompt(["a small red circle on a gray background"])
    assert embeds.cond.shape == (1, 2 * models.FLOW_T5_TOKENS, 2 * models.TEXT_DIM)
    images = teacher.sample(["a large blue square on a white background"], num_inference_steps=2, guidance_scale=4.0,
                            generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    pipe = load_pipeline("toy-flow")  # the eval harness's loader: no T5, and the folder's own call arguments
    assert pipe.text_encoder_3 is None and step_kwargs(pipe, 2) == {"num_inference_steps": 2, "max_sequence_length": 16}


def test_train_flow_teacher_two_steps_writes_a_loadable_folder(tmp_path):
    from stepdistill.models.teacher import Teacher
    from stepdistill.toy.train import train_flow_teacher

    out = tmp_path / "flow"
    info = train_flow_teacher(out, seed=0, steps=2, batch_size=4, num_latents=8, transformer_overrides=TINY)
    assert info["steps"] == 2 and info["final_loss_ema"] > 0
    assert json.loads((out / PIPELINE_CALL_FILE).read_text())["call_kwargs"] == {"max_sequence_length": 16}
    assert json.loads((out / "training_info.json").read_text())["transformer_storage_dtype"] == "float16"
    assert json.loads((out / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    teacher = Teacher.load(out)
    assert teacher.family == "sd3" and teacher.dtype == torch.float32
    assert teacher.vae.config.shift_factor == 0.0 and teacher.unet.config.num_layers == 1
    images = teacher.sample(["a small red circle on a gray background"], 1, 1.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 32, 32)


def test_link_shared_stores_identical_components_as_links_that_load(tmp_path):
    from stepdistill.core.assets import toy_teacher_path
    from stepdistill.models.teacher import Teacher
    from stepdistill.toy.train import train_flow_teacher

    out = tmp_path / "flow"
    info = train_flow_teacher(out, seed=0, steps=1, batch_size=2, num_latents=4, transformer_overrides=TINY,
                              link_shared=True)
    assert info["linked_components"] == {"vae": ["diffusion_pytorch_model.safetensors"],
                                         "text_encoder_2": ["config.json", "model.safetensors"]}
    weights = out / "vae" / "diffusion_pytorch_model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (toy_teacher_path() / "vae" / weights.name).resolve()
    assert not (out / "vae" / "config.json").is_symlink()  # it records shift_factor 0, the toy teacher's does not
    assert (out / "text_encoder_2" / "model.safetensors").resolve() == (out / "text_encoder" / "model.safetensors")
    assert not any(p.is_symlink() for p in (out / "text_encoder").iterdir())
    assert not any(p.is_symlink() for p in (out / "transformer").iterdir())
    teacher = Teacher.load(out)  # diffusers and transformers load through the links
    assert teacher.pipeline.text_encoder_2 is not None and teacher.vae.config.shift_factor == 0.0
    with pytest.raises(ValueError, match="another transformer size"):
        train_flow_teacher(tmp_path / "more", steps=1, batch_size=2, num_latents=4, init_from=out,
                           transformer_overrides=models.flow_transformer_size(64, 2))


def test_flow_transformer_size_is_checked():
    assert models.flow_transformer_size(160, 5) == {"num_layers": 5, "num_attention_heads": 5,
                                                     "caption_projection_dim": 160}
    with pytest.raises(ValueError, match="multiple of 32"):
        models.flow_transformer_size(100, 4)


def test_flow_matching_loss_equals_the_hand_computation():
    """x_σ = (1 − σ)x₀ + σε, the transformer called at 1000σ, MSE to ε − x₀ (diffusers train_dreambooth_sd3.py);
    σ read from the diffusers scheduler's own table, not from NoiseSchedule."""
    from stepdistill.core.schedule import NoiseSchedule
    from stepdistill.toy.train import flow_matching_loss

    torch.manual_seed(0)
    transformer = models.make_flow_transformer(**TINY).eval()
    scheduler = models.make_flow_scheduler()
    schedule = NoiseSchedule.from_scheduler(scheduler)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    cond, pooled = torch.randn(3, 32, 256, generator=g), torch.randn(3, 256, generator=g)
    t = torch.tensor([0, 499, 998])
    with torch.no_grad():
        loss = flow_matching_loss(transformer, schedule, x0, noise, t, cond, pooled)
        sigma = scheduler.sigmas.flip(0)[t].float()  # the scheduler's table runs from σ = 1 down
        assert torch.allclose(sigma, (t + 1).float() / 1000)  # shift 1: σ_t = (t + 1)/T
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * noise
        pred = transformer(hidden_states=x_sigma, timestep=1000 * sigma, encoder_hidden_states=cond,
                           pooled_projections=pooled).sample
        expected = ((pred - (noise - x0)) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
