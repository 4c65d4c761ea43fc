"""Fréchet distance against closed forms and an independent implementation; feature statistics and their cache;
the FID Inception-v3 plumbing (random weights: real weights are checked where they can be carried)."""

import json
import os
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from stepdistill.eval.errors import MetricUnavailable
from stepdistill.eval.fid import (
    FeatureStats,
    StreamingStats,
    clean_resize,
    compute_fid,
    compute_stats,
    frechet_distance,
    load_or_compute,
    quantize_images,
)
from stepdistill.eval.inception import (
    INCEPTION_STATE_DICT_NAME,
    INCEPTION_TORCHSCRIPT_NAME,
    InceptionV3Features,
)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


def _sqrt_psd(matrix):
    """Symmetric PSD square root from an eigen-decomposition (independent of scipy's sqrtm)."""
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


# --- Fréchet distance ----------------------------------------------------------------------------------------------
def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    lam1, lam2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    # Commuting (diagonal) covariances: Tr((Σ₁Σ₂)^{1/2}) = Σ √(λ₁λ₂).
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(lam1 + lam2 - 2.0 * np.sqrt(lam1 * lam2))
    got = frechet_distance(mu1, np.diag(lam1), mu2, np.diag(lam2))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, abs=1e-6)


def test_full_covariance_closed_form_via_eigendecomposition():
    rng = np.random.default_rng(1)
    d = 10
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    # Tr((Σ₁Σ₂)^{1/2}) = Tr((Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}) = Σ √eig(Σ₁^{1/2} Σ₂ Σ₁^{1/2}) (similar matrices).
    r1 = _sqrt_psd(s1)
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0.0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-6)


def test_set_against_itself_is_zero():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(400, 24)) * rng.uniform(0.5, 2.0, size=24) + 3.0
    stats = FeatureStats.from_features(feats)
    assert abs(frechet_distance(stats.mean, stats.cov, stats.mean, stats.cov)) < 1e-6
    assert abs(stats.frechet_distance(stats)) < 1e-6


def test_agrees_with_independent_implementation():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(300, 32))
    b = rng.normal(size=(250, 32)) @ rng.normal(scale=0.3, size=(32, 32)) + 0.5
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    expected = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * np.real(root)))
    got = compute_fid(lambda x: x, [a[:100], a[100:], ], (mu_b, cov_b))
    assert got == pytest.approx(expected, abs=1e-4)
    assert FeatureStats.from_features(a).frechet_distance(FeatureStats.from_features(b)) == pytest.approx(expected, abs=1e-4)


def test_singular_product_is_regularised():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(8, 20)), rng.normal(size=(8, 20)) + 1.0  # fewer samples than dimensions
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov)
    assert np.isfinite(value) and value > 0
    # an exactly singular product (zero covariance) takes the eps·I path and warns
    zero = np.zeros((3, 3))
    with pytest.warns(RuntimeWarning, match="singular"):
        value = frechet_distance(np.zeros(3), zero, np.ones(3), np.eye(3))
    assert value == pytest.approx(3.0 + 3.0, abs=1e-2)


def test_non_negligible_imaginary_part_raises(monkeypatch):
    def fake_sqrtm(matrix, *args, **kwargs):
        return np.eye(matrix.shape[0]) + 0.5j * np.ones(matrix.shape)

    monkeypatch.setattr(scipy.linalg, "sqrtm", fake_sqrtm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="imaginary"):
            frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- statistics ----------------------------------------------------------------------------------------------------
def test_streaming_stats_equal_numpy():
    rng = np.random.default_rng(5)
    data = rng.normal(size=(537, 9)) * 0.01 + 1000.0  # large offset: the shifted sums must avoid cancellation
    acc = StreamingStats()
    for chunk in np.array_split(data, [1, 50, 51, 300]):
        acc.update(torch.from_numpy(chunk) if len(chunk) % 2 else chunk)
    assert acc.num == len(data)
    np.testing.assert_allclose(acc.mean, np.mean(data, axis=0), rtol=1e-12)
    np.testing.assert_allclose(acc.cov, np.cov(data, rowvar=False), rtol=1e-7, atol=1e-12)
    stats = acc.to_stats({"features": "x"})
    assert stats.num == len(data) and stats.fingerprint == {"features": "x"}
    with pytest.raises(ValueError):
        acc.update(np.zeros((2, 4)))


def test_save_load_roundtrip_and_foreign_npz(tmp_path):
    rng = np.random.default_rng(6)
    stats = FeatureStats.from_features(rng.normal(size=(50, 4)), fingerprint={"features": "toy", "n": 50})
    path = stats.save(tmp_path / "stats.npz")
    loaded = FeatureStats.load(path)
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert loaded.num == 50 and loaded.fingerprint == {"features": "toy", "n": 50}
    # pytorch-fid / clean-fid statistics files hold only mu and sigma
    np.savez(tmp_path / "foreign.npz", mu=stats.mean, sigma=stats.cov)
    foreign = FeatureStats.load(tmp_path / "foreign.npz")
    assert foreign.num == -1 and foreign.fingerprint == {}
    assert abs(foreign.frechet_distance(stats)) < 1e-6


def test_cache_reused_only_when_fingerprint_matches(tmp_path):
    rng = np.random.default_rng(7)
    calls = []

    def compute():
        calls.append(1)
        return FeatureStats.from_features(rng.normal(size=(40, 3)))

    path = tmp_path / "cache" / "ref.npz"
    fp = {"features": "inception", "resolution": 256, "resize": "clean", "num_images": 40, "sizes": (1, 2)}
    first = load_or_compute(path, fp, compute)
    assert len(calls) == 1 and path.exists()
    again = load_or_compute(path, dict(reversed(list({**fp, "sizes": [1, 2]}.items()))), compute)  # same content
    assert len(calls) == 1
    np.testing.assert_array_equal(again.mean, first.mean)
    changed = load_or_compute(path, {**fp, "num_images": 41}, compute)
    assert len(calls) == 2
    assert FeatureStats.load(path).fingerprint["num_images"] == 41
    assert not np.array_equal(changed.mean, first.mean)
    # an array result is accepted, and a corrupt cache is recomputed (with a warning), not trusted
    path.write_bytes(b"not an npz")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        load_or_compute(path, fp, lambda: rng.normal(size=(10, 3)))
    assert FeatureStats.load(path).num == 10
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]  # no temporary files left behind


def test_compute_stats_streams_any_feature_fn():
    batches = [torch.full((3, 2), float(i)) for i in range(4)]
    stats = compute_stats(lambda b: b.numpy() * 2.0, batches, fingerprint={"features": "double"})
    full = np.concatenate([b.numpy() * 2.0 for b in batches])
    np.testing.assert_allclose(stats.mean, full.mean(0))
    np.testing.assert_allclose(stats.cov, np.cov(full, rowvar=False))
    assert stats.num == 12


# --- preprocessing -------------------------------------------------------------------------------------------------
def test_quantize_and_clean_resize():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2).repeat(2, 3, 1, 1)
    q = quantize_images(images)
    assert q.dtype == np.uint8 and q.shape == (2, 3, 2, 2)
    assert q[0, 0].ravel().tolist() == [0, 128, 255, 255]
    const = np.full((2, 3, 40, 30), 37, dtype=np.uint8)
    out = clean_resize(const, 299)
    assert out.shape == (2, 3, 299, 299) and out.dtype == np.float32
    np.testing.assert_allclose(out, 37.0, atol=1e-3)
    assert clean_resize(const, (20, 10)).shape == (2, 3, 20, 10)
    with pytest.raises(TypeError):
        clean_resize(const.astype(np.float32), 299)


# --- Inception-v3 --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    model = InceptionV3Features()
    # random but non-trivial batch-norm statistics, so that a mis-loaded buffer would change the features
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def test_inception_random_init_features(inception):
    images = torch.rand(2, 3, 64, 48) * 2 - 1
    feats = inception.extract(images)
    assert feats.shape == (2, 2048) and feats.dtype == np.float64
    assert np.all(np.isfinite(feats)) and np.all(feats >= 0)  # pool3 follows a ReLU


def test_inception_layout_matches_pytorch_fid(inception):
    # torchvision's inception_v3 has 27,161,264 parameters with its 1000-way fc and the AuxLogits head
    # (3,326,696); the FID graph has no aux head and a 1008-way fc: 27,161,264 - 3,326,696 + 8 * 2049.
    assert sum(p.numel() for p in inception.parameters()) == 23_850_960
    state = inception.state_dict()
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.bn.running_mean": (384,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert len([k for k in state if not k.endswith("num_batches_tracked")]) == 94 * 5 + 2  # 94 conv-bn units + fc


def test_state_dict_round_trip(tmp_path, inception):
    # pytorch-fid's file predates BatchNorm's num_batches_tracked counters: save without them
    state = {k: v.clone() for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / INCEPTION_STATE_DICT_NAME)
    loaded = InceptionV3Features.from_pretrained(tmp_path)  # a folder holding the file is enough
    assert loaded.backend == "torch"
    for key, value in inception.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(1, 3, 75, 75) * 255
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), inception(x))
    # with the counters (a state dict saved by a recent torch) it loads too
    loaded.load_inception_state_dict(inception.state_dict())


def test_malformed_state_dict_is_a_clear_error(tmp_path, inception):
    state = {k: v for k, v in inception.state_dict().items() if not k.startswith("Mixed_7c")}
    file = tmp_path / "broken.pth"
    torch.save(state, file)
    with pytest.raises(MetricUnavailable, match="missing keys") as info:
        InceptionV3Features.from_pretrained(file)
    assert str(file) in str(info.value)


class _TinyScripted(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: same calling convention (0..255 input, return_features)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = (img.to(torch.float32) - 128.0) / 128.0
        features = self.proj(x.mean(dim=(2, 3)))
        if return_features:
            return features
        return features[:, :1008]


def test_torchscript_file_is_called_with_return_features(tmp_path):
    torch.manual_seed(1)
    tiny = _TinyScripted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(tiny).save(str(tmp_path / INCEPTION_TORCHSCRIPT_NAME))
    model = InceptionV3Features.from_pretrained(tmp_path / INCEPTION_TORCHSCRIPT_NAME)
    assert model.backend == "torchscript"
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = model.extract(images)
    resized = torch.from_numpy(clean_resize(quantize_images(images), 299))
    with torch.no_grad():
        expected = tiny(resized, return_features=True).double().numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)


def test_missing_weights_raise_metric_unavailable(tmp_path, monkeypatch):
    with pytest.raises(MetricUnavailable) as info:
        InceptionV3Features.from_pretrained(tmp_path / "nowhere.pth")
    message = str(info.value)
    for needle in ("nowhere.pth", "pt_inception-2015-12-05", "inception-2015-12-05.pt", "pytorch-fid", "clean-fid",
                   "--inception", "STEPDISTILL_INCEPTION"):
        assert needle in message, needle
    # no path, no environment variable, empty cache folder
    monkeypatch.delenv("STEPDISTILL_INCEPTION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(MetricUnavailable, match="STEPDISTILL_INCEPTION"):
        InceptionV3Features.from_pretrained()
    # the environment variable pointing at an empty folder
    monkeypatch.setenv("STEPDISTILL_INCEPTION", str(tmp_path))
    with pytest.raises(MetricUnavailable, match="holds neither file"):
        InceptionV3Features.from_pretrained()
    assert issubclass(MetricUnavailable, RuntimeError)
    assert os.environ["STEPDISTILL_INCEPTION"] == str(tmp_path)


def test_fingerprint_is_json(inception):
    fp = inception.fingerprint(resolution=256, num_images=30000)
    assert json.loads(json.dumps(fp)) == fp and fp["features"] == "inception-v3-2015-12-05-pool3"
