"""Diversity, coverage, latency, CLIP score (tiny random CLIP built here, nothing downloaded), and the optional
OpenCLIP / HPSv2 back-ends reporting themselves unavailable."""

import json
import sys

import numpy as np
import pytest
import torch

from stepdistill.eval.clip_score import ClipScorer, OpenClipScorer
from stepdistill.eval.diversity import coverage, pairwise_diversity, per_prompt_diversity
from stepdistill.eval.errors import MetricUnavailable
from stepdistill.eval.latency import measure_latency


# --- diversity -----------------------------------------------------------------------------------------------------
def test_diversity_hand_computation():
    a, b, c = [1.0, 0.0], [0.0, 3.0], [2.0, 2.0]
    # cos(a,b) = 0, cos(a,c) = cos(b,c) = 1/√2  ->  mean(1 − cos) = (1 + 2(1 − 1/√2)) / 3
    one = (1.0 + 2.0 * (1.0 - 1.0 / np.sqrt(2.0))) / 3.0
    assert pairwise_diversity([np.array([a, b, c])]) == pytest.approx(one, abs=1e-12)
    # a second prompt with two opposite samples (1 − cos = 2): the mean over prompts
    two = np.array([[1.0, 1.0], [-1.0, -1.0]])
    assert pairwise_diversity([np.array([a, b, c]), torch.tensor(two)]) == pytest.approx((one + 2.0) / 2.0, abs=1e-12)
    np.testing.assert_allclose(per_prompt_diversity([np.array([a, b, c]), two]), [one, 2.0])


def test_identical_samples_have_zero_diversity():
    rng = np.random.default_rng(0)
    v = rng.normal(size=8)
    assert pairwise_diversity([np.tile(v, (5, 1)), np.tile(2.0 * v, (3, 1))]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        pairwise_diversity([v[None, :]])  # one sample: undefined
    with pytest.raises(ValueError):
        pairwise_diversity([np.zeros((2, 3))])  # zero vectors: cosine undefined


def test_coverage_exposes_a_narrow_spread():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(2000, 2)) * [1.0, 2.0]
    collapsed = rng.normal(size=(500, 2)) * [0.1, 0.2] + [0.5, 0.0]
    report = coverage(collapsed, reference, names=["position", "size"])
    for name in ("position", "size"):
        entry = report["per_attribute"][name]
        assert entry["std_ratio"] < 0.2
        assert entry["wasserstein"] > 0.3
    assert report["min_std_ratio"] < 0.2 and report["mean_std_ratio"] < 1
    same = coverage(reference, reference)
    assert same["per_attribute"]["attr0"]["std_ratio"] == pytest.approx(1.0)
    assert same["mean_wasserstein"] == pytest.approx(0.0, abs=1e-12)
    assert coverage(reference[:, 0], reference[:, 0])["per_attribute"]["attr0"]["wasserstein"] == 0.0


# --- latency -------------------------------------------------------------------------------------------------------
def test_measure_latency_counts_and_syncs():
    calls, syncs = [], []
    result = measure_latency(lambda: calls.append(1), warmup=3, repeats=4, sync=lambda: syncs.append(1), batch_size=8)
    assert len(calls) == 7 and len(syncs) == 8  # before and after each timed call
    assert len(result["times_s"]) == 4 and result["median_s"] >= 0
    assert result["min_s"] <= result["median_s"] <= result["max_s"]
    assert result["median_s_per_item"] == pytest.approx(result["median_s"] / 8)
    plain = measure_latency(lambda: sum(range(100)), warmup=0, repeats=1, sync=False)
    assert plain["repeats"] == 1 and "median_s_per_item" not in plain


# --- CLIP score ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from tiny_models import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


def _independent_cosines(folder, images, prompts):
    """Cosines straight from CLIPModel.get_image_features / get_text_features, with transformers' own image
    processor and tokenizer."""
    import warnings

    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from stepdistill.eval.clip_score import to_pil_images

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    pixels = processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return torch.nn.functional.cosine_similarity(img, txt, dim=-1).double().numpy()


def test_clip_scorer_matches_independent_computation(tiny_clip_dir):
    scorer = ClipScorer(tiny_clip_dir, batch_size=2)
    torch.manual_seed(3)
    images = torch.rand(3, 3, 40, 56) * 2 - 1  # not square: exercises resize of the short side + centre crop
    prompts = ["a red cat", "cat", "red"]
    result = scorer.score(images, prompts)
    assert result["clip_model"] == "tiny-clip"
    assert set(result) >= {"clip_score_cosine", "clip_score_100", "clip_model", "num_images"}
    assert np.isfinite(result["clip_score_cosine"]) and np.isfinite(result["clip_score_100"])
    expected = _independent_cosines(tiny_clip_dir, images, prompts)
    np.testing.assert_allclose(scorer.cosines(images, prompts), expected, atol=1e-5)
    assert result["clip_score_cosine"] == pytest.approx(float(np.mean(expected)), abs=1e-5)
    assert result["clip_score_100"] == pytest.approx(float(np.mean(100 * np.maximum(expected, 0))), abs=1e-3)
    assert result["num_images"] == 3
    emb = scorer.embed_images(images)
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


def test_clip_scorer_missing_folder(tmp_path):
    with pytest.raises(MetricUnavailable, match="config.json"):
        ClipScorer(tmp_path / "no-clip-here")


# --- optional back-ends --------------------------------------------------------------------------------------------
def test_open_clip_unavailable_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # behaves as not installed, whatever this machine has
    with pytest.raises(MetricUnavailable, match=r"pip install 'stepdistill\[eval\]'"):
        OpenClipScorer("ViT-g-14.bin")


def test_hps_unavailable_without_package(monkeypatch, tmp_path):
    from stepdistill.eval.hps import HPS_STYLES, HPSv2Scorer, benchmark_prompts

    monkeypatch.setitem(sys.modules, "hpsv2", None)
    with pytest.raises(MetricUnavailable, match=r"pip install 'stepdistill\[eval\]'"):
        HPSv2Scorer(tmp_path / "HPS_v2.1_compressed.pt", version="2.1")
    with pytest.raises(MetricUnavailable, match=r"pip install 'stepdistill\[eval\]'"):
        benchmark_prompts()
    with pytest.raises(ValueError):
        HPSv2Scorer(None, version="3")
    # prompt files given explicitly need no package
    for style in HPS_STYLES:
        (tmp_path / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(3)]))
    prompts = benchmark_prompts(tmp_path)
    assert list(prompts) == list(HPS_STYLES) and prompts["photo"][2] == "photo prompt 2"
