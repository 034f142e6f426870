"""Linear probes: both kinds solve the same problem, reach full accuracy where they should, and agree."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import embedded_raw
from imagenet_sd.core import params
from imagenet_sd.core.errors import UserError
from imagenet_sd.models import probes

KINDS = ("sklearn", "torch")
CPU = torch.device("cpu")
DEFAULT = embedded_raw()


def blobs(n: int, classes: int, dim: int, spread: float, seed: int,
          centres_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around class centres shared by every draw with the same `centres_seed`."""
    centres = np.random.default_rng(centres_seed).normal(0, spread, (classes, dim))
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    return (centres[y] + rng.normal(0, 1, (n, dim))).astype(np.float32), y


@pytest.mark.parametrize("kind", KINDS)
def test_probes_reach_full_accuracy_on_separable_features(kind):
    train_x, train_y = blobs(80, 4, 64, spread=5, seed=1)
    test_x, test_y = blobs(40, 4, 64, spread=5, seed=2)
    result = probes.probe(train_x, train_y, test_x, test_y, seed=3, kind=kind)
    assert result["top1"] == 100.0 and result["mean_per_class"] == 100.0
    assert result["C"] in probes.C_GRID and result["probe"] == kind


@pytest.mark.parametrize("classes", [10, 2])
def test_probes_agree_on_overlapping_classes(classes):
    # Overlapping blobs: about 80 % top-1, so there are many mistakes to agree or disagree on.
    train_x, train_y = blobs(600, classes, 64, spread=0.35 if classes > 2 else 0.2, seed=1)
    test_x, test_y = blobs(400, classes, 64, spread=0.35 if classes > 2 else 0.2, seed=2)
    grid = probes.c_grid(1e-3, 1e2, 6)
    results = {k: probes.probe(train_x, train_y, test_x, test_y, seed=0, kind=k, grid=grid) for k in KINDS}
    assert 60 < results["sklearn"]["top1"] < 95
    assert abs(results["sklearn"]["top1"] - results["torch"]["top1"]) <= 1.5
    assert abs(grid.index(results["sklearn"]["C"]) - grid.index(results["torch"]["C"])) <= 1
    # The same C gives the same classifier, also weakly regularised: predictions, not just accuracies, match.
    for c in grid:
        predictions = [probes.fit_probe(probes.FITTERS[k], train_x, train_y, c, CPU)(test_x) for k in KINDS]
        assert np.mean(predictions[0] == predictions[1]) >= 0.95, c


def test_the_default_grid_is_kornbliths_and_a_c_at_its_edge_is_flagged():
    grid = probes.C_GRID
    assert len(grid) == 45 and grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1e5)
    assert np.allclose(np.diff(np.log10(grid)), 0.25)
    assert probes.c_grid(0.5, 0.5, 1) == (0.5,)
    train_x, train_y = blobs(80, 4, 64, spread=5, seed=1)
    test_x, test_y = blobs(40, 4, 64, spread=5, seed=2)
    # Separable: every C of this grid is perfect, the tie goes to the smallest, the grid's low end.
    edge = probes.probe(train_x, train_y, test_x, test_y, seed=3, kind="sklearn", grid=(1.0, 10.0))
    assert edge["C"] == 1.0 and edge["C_at_edge"]
    inside = probes.probe(*blobs(600, 10, 64, spread=0.35, seed=1), *blobs(400, 10, 64, spread=0.35, seed=2),
                          seed=0, kind="sklearn", grid=probes.c_grid(1e-6, 1e5, 12))
    assert not inside["C_at_edge"], inside


def test_torch_objective_is_sklearns_at_sklearns_solution():
    # One function, one optimum: the torch probe's objective at its own solution and at
    # scikit-learn's (same C, same stopping rule) agree to float32 precision.
    x, y = blobs(300, 5, 16, spread=0.5, seed=4)
    sk = probes.SklearnFit(x, y, CPU)
    sk.fit(1.0)
    own = probes.TorchFit(x, y, CPU)
    own.fit(1.0)
    at_sklearn = probes.TorchFit(x, y, CPU)
    at_sklearn.load((sk.classes, torch.tensor(sk.clf.coef_), torch.tensor(sk.clf.intercept_)))
    assert own.objective(1.0) == pytest.approx(at_sklearn.objective(1.0), rel=1e-4)


def test_stratified_split_is_seeded_and_keeps_every_class():
    y = np.array([0] * 10 + [1] * 5 + [2] * 1)
    fit, val = probes.stratified_split(y, 0.2, seed=7)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(16))
    assert np.bincount(y[val], minlength=3).tolist() == [2, 1, 0]
    assert set(y[fit]) == {0, 1, 2}
    again = probes.stratified_split(y, 0.2, seed=7)
    assert fit.tolist() == again[0].tolist() and val.tolist() == again[1].tolist()
    other = [probes.stratified_split(y, 0.2, seed=s)[1].tolist() for s in range(8, 12)]
    assert any(v != val.tolist() for v in other)


@pytest.mark.parametrize("kind", KINDS)
def test_one_class_training_set_predicts_that_class(kind):
    x = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    y = np.full(6, 3)
    result = probes.probe(x, y, x[:2], y[:2], seed=0, kind=kind)
    assert (result["top1"], result["mean_per_class"], result["C"]) == (100.0, 100.0, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_official_val_chooses_c_and_is_refitted_on(kind):
    # Class 2 exists only in val: the final probe knows it only if it was refit on train + val.
    x, y = blobs(90, 3, 32, spread=5, seed=1)
    train = y < 2
    test_x, test_y = blobs(30, 3, 32, spread=5, seed=2)
    result = probes.probe(x[train], y[train], test_x, test_y, seed=0, kind=kind, val=(x[~train], y[~train]))
    assert result["top1"] == 100.0


def test_mean_per_class_differs_from_top1_on_imbalance():
    top1, per_class = probes.accuracies(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1]))
    assert top1 == 75.0 and per_class == 50.0


def test_auto_picks_torch_on_a_gpu_or_a_large_problem_else_sklearn():
    assert probes.resolve_kind("auto", 1000, 10, torch.device("cuda")) == "torch"
    assert probes.resolve_kind("auto", probes.TORCH_FROM // 100, 100, CPU) == "torch"
    assert probes.resolve_kind("auto", 1000, 10, CPU) == "sklearn"
    assert probes.resolve_kind("sklearn", 10 ** 6, 8142, torch.device("cuda")) == "sklearn"


def test_probe_param_is_validated():
    raw = copy.deepcopy(DEFAULT)
    raw["profiles"]["embedded"]["transfer"]["probe"] = "gpu"
    with pytest.raises(UserError) as err:
        params.parse(raw)
    message = str(err.value)
    assert "profiles.embedded.transfer.probe" in message and "auto | sklearn | torch" in message
    assert "\n" not in message
    assert params.parse(DEFAULT).transfer.probe in params.PROBES
