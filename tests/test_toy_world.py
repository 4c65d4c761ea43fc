"""The toy world: determinism, prompt round trip, rendering, tokenizer, evaluator loading."""

import json

import numpy as np
import pytest
import torch

from stepdistill.toy import world
from stepdistill.toy.assets import TOY_EVALUATOR, TOY_TEACHER
from stepdistill.toy.tokenizer import build_tokenizer_files


def test_sampling_is_deterministic_and_in_range():
    a, attrs_a = world.sample(7, 16)
    b, attrs_b = world.sample(7, 16)
    c, _ = world.sample(8, 16)
    assert a.shape == (16, 3, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert attrs_a.prompts() == attrs_b.prompts()
    assert not np.array_equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_prompts_round_trip_and_vocabulary():
    prompts = world.all_prompts()
    assert len(prompts) == len(set(prompts)) == 4 * 6 * 2 * 3
    for p in prompts:
        parsed = world.parse_prompt(p)
        rebuilt = world.make_prompt(*(world.DISCRETE_ATTRIBUTES[k][parsed[k]] for k in ("shape", "color", "size", "background")))
        assert rebuilt == p
        assert set(p.split()) <= set(world.VOCABULARY)
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        world.parse_prompt("a photo of a cat")


def test_rendered_colours_and_sizes_follow_the_prompt():
    prompts = ["a large red square on a black background", "a small blue circle on a white background"]
    images, attrs = world.sample(0, 2, prompts=prompts)
    rgb = (images + 1) / 2
    # the shape's pixel at its centre is the shape colour: red is R-dominant, blue is B-dominant
    for i, channel in ((0, 0), (1, 2)):
        cy, cx = int(attrs.y[i] * 32), int(attrs.x[i] * 32)
        assert rgb[i, :, cy, cx].argmax() == channel
    # covered area: a large shape covers more pixels than a small one
    area = [(np.abs(rgb[i] - np.array(world.BACKGROUNDS[b])[:, None, None]).sum(0) > 0.3).mean()
            for i, b in ((0, "black"), (1, "white"))]
    assert area[0] > 2 * area[1]


def test_tokenizer_single_tokens_per_word(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(build_tokenizer_files(tmp_path), local_files_only=True)
    for word in world.VOCABULARY:
        assert len(tok(word).input_ids) == 3, word  # <bos> word <eos>
    ids = tok("a small red triangle on a gray background").input_ids
    assert len(ids) == 10
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 16


@pytest.mark.skipif(not TOY_EVALUATOR.is_dir(), reason="toy evaluator asset not present")
def test_shipped_evaluator_reads_real_samples():
    from stepdistill.toy.evaluator import ToyEvaluator

    model = ToyEvaluator.from_pretrained(str(TOY_EVALUATOR), local_files_only=True).eval()
    images, attrs = world.sample(123_456, 200)
    with torch.no_grad():
        out = model(torch.from_numpy(images))
    for name, truth in attrs.discrete().items():
        assert (out[name].argmax(1).numpy() == truth).mean() >= 0.98, name
    assert np.abs(out["continuous"].numpy() - attrs.continuous()).mean() < 0.03


@pytest.mark.skipif(not (TOY_TEACHER / "model_index.json").is_file(), reason="toy teacher asset not present")
def test_shipped_teacher_is_a_plain_sd_pipeline():
    from diffusers import StableDiffusionPipeline

    from stepdistill.models.teacher import Teacher

    pipe = StableDiffusionPipeline.from_pretrained(TOY_TEACHER, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a large red square on a black background"], num_inference_steps=2, guidance_scale=3.0,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)
    cfg = pipe.scheduler.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.num_train_timesteps, cfg.prediction_type) == (
        0.00085, 0.012, "scaled_linear", 1000, "epsilon")
    teacher = Teacher.load("toy")
    assert teacher.latent_shape == (4, 8, 8)
