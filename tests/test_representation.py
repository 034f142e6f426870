"""Representation statistics: each against a case whose answer is known or a brute-force computation."""
import itertools

import numpy as np
import pytest

from imagenet_sd.evaluate import representation as rep


def relu_features(n=300, d=16, classes=6, seed=0):
    """Post-ReLU-like features with class structure and some dead units."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    means = rng.normal(size=(classes, d))
    x = np.maximum(means[labels] + rng.normal(size=(n, d)), 0).astype(np.float32)
    x[:, :2] = 0  # dead units
    return x, labels


# sparsity

def test_sparsity_counts_known_zeros_per_image():
    x = np.array([[0, 1, 0, 2], [3, 0, 0, 0], [1, 1, 1, 1]], dtype=np.float32)
    assert rep.sparsity(x) == pytest.approx((2 / 4 + 3 / 4 + 0 / 4) / 3)


def test_sparsity_tolerance_counts_near_zeros_only():
    x = np.array([[1e-8, 1e-3], [0.5, -1e-7]], dtype=np.float32)
    assert rep.sparsity(x) == pytest.approx(2 / 4)
    assert rep.sparsity(x, zero_tol=0.0) == 0.0


# intra-class distance

def brute_intra_class(x, labels):
    per_class = []
    for c in np.unique(labels):
        u = x[labels == c].astype(np.float64)
        norms = np.linalg.norm(u, axis=1, keepdims=True)
        u = np.where(norms > 0, u / np.where(norms > 0, norms, 1), 0)
        pairs = list(itertools.permutations(range(len(u)), 2))
        if pairs:
            per_class.append(np.mean([np.sum((u[i] - u[j]) ** 2) for i, j in pairs]))
    return np.mean(per_class)


def test_intra_class_distance_closed_form_matches_brute_force_pairs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 7)).astype(np.float32)
    labels = np.array([0] * 15 + [1] * 2 + [2] * 22 + [3])  # class 3 has one image: skipped
    x[3] = 0  # a zero feature stays the zero vector
    assert rep.intra_class_distance(x, labels) == pytest.approx(brute_intra_class(x, labels), rel=1e-10)


def test_intra_class_distance_is_zero_for_identical_features_and_grows_with_spread():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(5), 20)
    centres = rng.normal(size=(5, 32)) + 3
    identical = centres[labels].astype(np.float32)
    assert rep.intra_class_distance(identical, labels) == pytest.approx(0, abs=1e-12)
    # Scaling one image does not move its l2-normalised feature.
    identical[::3] *= 7
    assert rep.intra_class_distance(identical, labels) == pytest.approx(0, abs=1e-12)
    noise = rng.normal(size=identical.shape)
    small = rep.intra_class_distance((centres[labels] + 0.1 * noise).astype(np.float32), labels)
    large = rep.intra_class_distance((centres[labels] + 1.0 * noise).astype(np.float32), labels)
    assert 0 < small < large <= 4


def test_intra_class_distance_needs_a_class_with_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        rep.intra_class_distance(np.ones((3, 4), np.float32), np.array([0, 1, 2]))


# redundancy

def test_redundancy_is_one_for_perfectly_correlated_dimensions():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(500, 1))
    x = (z * np.array([1.0, -2.0, 0.5, 3.0]) + np.array([0, 5, -1, 2])).astype(np.float32)
    assert rep.redundancy(x) == pytest.approx(1, abs=1e-6)


def test_redundancy_is_near_zero_for_independent_dimensions():
    x = np.random.default_rng(4).normal(size=(20000, 8)).astype(np.float32)
    assert rep.redundancy(x) < 0.02


def test_redundancy_matches_corrcoef_and_ignores_dead_dimensions():
    x, _ = relu_features()
    live = x[:, 2:].astype(np.float64)
    corr = np.abs(np.corrcoef(live, rowvar=False))
    k = corr.shape[0]
    expected = (corr.sum() - k) / (k * (k - 1))
    assert rep.redundancy(x) == pytest.approx(expected, rel=1e-9)
    constant = np.hstack([x, np.full((len(x), 1), 3.7, np.float32)])  # a constant, non-zero unit
    assert rep.redundancy(constant) == pytest.approx(expected, rel=1e-9)


def test_redundancy_needs_two_varying_dimensions():
    x = np.zeros((10, 5), np.float32)
    x[:, 0] = np.arange(10)
    with pytest.raises(ValueError, match="at least 2 dimensions that vary"):
        rep.redundancy(x)


# coding length

def test_coding_length_matches_the_direct_n_by_n_determinant():
    x = np.random.default_rng(5).normal(size=(30, 12)).astype(np.float32)
    z = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    n, d = z.shape
    for eps_sq in (0.5, 0.01):
        # The n x n form of MCR^2's paper (Z as d x n there): an independent check of the d x d one.
        direct = 0.5 * np.linalg.slogdet(np.eye(n) + d / (n * eps_sq) * z @ z.T)[1]
        assert rep.coding_length(x, eps_sq) == pytest.approx(direct, rel=1e-10)


def test_coding_length_grows_with_rank():
    rng = np.random.default_rng(6)
    lengths = []
    for rank in (1, 4, 16, 64):
        x = (rng.normal(size=(400, rank)) @ rng.normal(size=(rank, 64))).astype(np.float32)
        lengths.append(rep.coding_length(x))
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1] / 10


def test_coding_length_rejects_non_positive_eps():
    with pytest.raises(ValueError, match="eps_sq"):
        rep.coding_length(np.ones((3, 3), np.float32), 0)


# statistics, chunking, input checks

def test_statistics_returns_the_four_numbers_in_range():
    x, labels = relu_features()
    stats = rep.statistics(x, labels)
    assert list(stats) == list(rep.KEYS) and all(type(v) is float for v in stats.values())
    assert 2 / 16 <= stats["sparsity"] < 1
    assert 0 < stats["intra_class_distance"] <= 4 and 0 < stats["redundancy"] < 1 and stats["coding_length"] > 0


def test_chunking_does_not_change_the_numbers(monkeypatch):
    x, labels = relu_features(n=100)
    whole = rep.statistics(x, labels)
    monkeypatch.setattr(rep, "CHUNK", 7)
    chunked = rep.statistics(x, labels)
    assert chunked == pytest.approx(whole, rel=1e-9)


@pytest.mark.parametrize("features, labels, message", [
    (np.ones((4, 3), np.float32), np.arange(5), "4 rows but labels has 5"),
    (np.ones((0, 3), np.float32), np.arange(0), "at least 2 images"),
    (np.ones((4, 0), np.float32), np.arange(4), "at least 2 images and 2 dimensions"),
    (np.ones(4, np.float32), np.arange(4), "2-D"),
    (np.ones((4, 3), np.int64), np.arange(4), "floating point"),
    (np.ones((4, 3), np.float32), np.arange(4.0), "labels must be integers"),
    (np.ones((4, 3), np.float32), np.arange(4)[:, None], "labels must be a 1-D"),
    (np.array([[1, np.nan], [1, 2]], np.float32), np.arange(2), "NaN or infinite"),
    (np.array([[1, np.inf], [1, 2]], np.float32), np.arange(2), "NaN or infinite"),
])
def test_bad_input_raises_a_clear_value_error(features, labels, message):
    with pytest.raises(ValueError, match=message):
        rep.statistics(features, labels)


# radar

STATS = {"real": {"sparsity": 0.4, "intra_class_distance": 1.1, "redundancy": 0.2, "coding_length": 900.0},
         "synthetic": {"sparsity": 0.5, "intra_class_distance": 0.9, "redundancy": 0.0, "coding_length": 700.0}}


def test_radar_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plots" / "radar.png"
    rep.radar(STATS, path, "ImageNet val")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_radar_draws_the_statistics_every_model_has(tmp_path):
    pytest.importorskip("matplotlib")
    partial = {m: {k: v for k, v in s.items() if k != "intra_class_distance"} for m, s in STATS.items()}
    rep.radar(partial, tmp_path / "radar.png", "one val image a class")
    assert (tmp_path / "radar.png").stat().st_size > 5000 and not list(tmp_path.glob("*.tmp.png"))


def test_available_reports_what_cannot_be_computed():
    rng = np.random.default_rng(0)
    features = np.maximum(rng.standard_normal((20, 8)), 0).astype(np.float32)
    values, reasons = rep.available(features, np.arange(20))          # one image a class
    assert set(values) == {"sparsity", "redundancy", "coding_length"}
    assert "at least 2 images" in reasons["intra_class_distance"]
    values, reasons = rep.available(features, np.arange(20) % 4)
    assert set(values) == set(rep.KEYS) and not reasons


@pytest.mark.parametrize("stats, message", [
    ({}, "at least one model"),
    ({"real": {"sparsity": 0.4}}, "three statistics that every model has, got sparsity"),
    ({"real": dict(STATS["real"], redundancy=float("nan"))}, "finite and >= 0"),
    ({"real": dict(STATS["real"], coding_length=-1.0)}, "finite and >= 0"),
])
def test_radar_rejects_bad_statistics(tmp_path, stats, message):
    with pytest.raises(ValueError, match=message):
        rep.radar(stats, tmp_path / "radar.png", "x")
