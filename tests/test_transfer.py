"""eval-transfer: the linear probe, the feature cache, dataset layouts and errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import embedded_raw
from imagenet_sd.core import params as params_module
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import read_tsv
from imagenet_sd.datasets import feature_cache, transfer_sets
from imagenet_sd.evaluate import transfer

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}


def make_params(datasets: dict[str, Path], baselines: bool = False, cog=None, **reference) -> params_module.Params:
    base = params_module.parse(embedded_raw())
    ev = dataclasses.replace(base.evaluate, resize=36, crop=32,
                             reference_models={**base.evaluate.reference_models, **reference})
    tr = dataclasses.replace(base.transfer, datasets=datasets, batch_size=16, device="cpu", baselines=baselines,
                             cog=cog, in1k=False)
    return dataclasses.replace(base, profile="embedded", evaluate=ev, transfer=tr)


def write_dataset(root: Path, train: int = 4, test: int = 2) -> Path:
    for split, count in (("train", train), ("test", test)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (36, 36), tuple(min(255, c + 7 * i) for c in colour)).save(folder / f"{i}.png")
    return root


# --------------------------------------------------------------------------- stage

@pytest.mark.slow
def test_run_writes_metrics_and_reuses_feature_cache(tmp_path, checkpoint, monkeypatch):
    data = write_dataset(tmp_path / "colours")
    params = make_params({"colours": data})
    cache = tmp_path / "features"
    first = transfer.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv", cache)

    m = first["colours"]
    assert (m["classes"], m["train_images"], m["test_images"]) == (3, 12, 6)
    assert 0 <= m["top1"] <= 100 and 0 <= m["mean_per_class"] <= 100
    assert m["probe"] == "sklearn"      # auto, on a CPU, for a problem this small
    assert first["average_top1"] == m["top1"]
    # The metrics file: the numbers a person compares; the rest is in the details.
    assert json.loads((tmp_path / "m.json").read_text()) == {"colours": {"top1": m["top1"]},
                                                              "average_top1": first["average_top1"]}
    assert read_tsv(tmp_path / "p.tsv") == [{"dataset": "colours", "model": "trained", "top1": str(m["top1"])}]
    assert len(list(cache.rglob("*.npz"))) == 2

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran although features were cached")
    monkeypatch.setattr(transfer, "extract", no_encoder)
    second = transfer.run(params, checkpoint, tmp_path / "m2.json", tmp_path / "p2.tsv", cache)
    assert second == first


@pytest.mark.slow
def test_baselines_random_encoder_and_reference_models_are_probed_too(tmp_path, checkpoint):
    data = write_dataset(tmp_path / "colours")
    torch.manual_seed(1)
    weights = tmp_path / "resnet50-reference.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    params = make_params({"colours": data}, baselines=True, **{"torchvision-resnet50": weights})
    cache = tmp_path / "features"
    metrics = transfer.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv", cache)

    assert set(metrics["baselines"]) == {"random-init", "torchvision-resnet50"}
    for m in metrics["baselines"].values():
        assert 0 <= m["colours"]["top1"] <= 100 and m["average_top1"] == m["colours"]["top1"]
    assert [row["dataset"] for row in read_tsv(tmp_path / "p.tsv")] == \
        ["colours", "colours (random-init)", "colours (torchvision-resnet50)"]
    assert len(list(cache.rglob("*.npz"))) == 6      # train and test features of each of the 3 encoders
    # The random encoder is seeded: the same features again, served from the cache.
    again = transfer.run(params, checkpoint, tmp_path / "m2.json", tmp_path / "p2.tsv", cache)
    assert again == metrics and len(list(cache.rglob("*.npz"))) == 6


def test_cache_key_changes_with_model_and_preprocessing(tmp_path):
    split = transfer_sets.load("embedded", "d", write_dataset(tmp_path / "d")).splits["train"]
    base = feature_cache.cache_key("aaa", "d", "train", "prep", split)
    assert base == feature_cache.cache_key("aaa", "d", "train", "prep", split)
    assert base != feature_cache.cache_key("bbb", "d", "train", "prep", split)
    assert base != feature_cache.cache_key("aaa", "d", "train", "other", split)
    assert base != feature_cache.cache_key("aaa", "d", "test", "prep", split)


def test_no_dataset_configured_is_reported_not_an_error(tmp_path, checkpoint):
    metrics = transfer.run(make_params({}), checkpoint, tmp_path / "m.json", tmp_path / "p.tsv",
                           tmp_path / "features")
    assert metrics["average_top1"] is None and "no transfer dataset configured" in metrics["note"]
    assert read_tsv(tmp_path / "p.tsv") == []


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("damage", ["missing_root", "missing_test", "empty_train", "extra_test_class"])
def test_bad_dataset_roots_are_one_line_errors_before_output(tmp_path, checkpoint, damage):
    good = write_dataset(tmp_path / "good")
    root = tmp_path / "bad"
    if damage != "missing_root":
        write_dataset(root)
    if damage == "missing_test":
        for f in (root / "test").rglob("*.png"):
            f.unlink()
    elif damage == "empty_train":
        for f in (root / "train").rglob("*.png"):
            f.unlink()
    elif damage == "extra_test_class":
        (root / "test" / "purple").mkdir()
        Image.new("RGB", (36, 36)).save(root / "test" / "purple" / "0.png")
    with pytest.raises(UserError) as err:
        transfer.run(make_params({"good": good, "bad": root}), checkpoint, tmp_path / "m.json",
                     tmp_path / "p.tsv", tmp_path / "features")
    message = str(err.value)
    assert "profiles.embedded.transfer.datasets.bad" in message and str(root) in message
    assert "\n" not in message
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "features").exists()


def test_features_are_cached_in_the_work_dir_which_must_be_writable(tmp_path, checkpoint):
    params = make_params({"colours": write_dataset(tmp_path / "colours")})
    work = tmp_path / "work"
    params = dataclasses.replace(params, transfer=dataclasses.replace(params.transfer, work_dir=work))
    transfer.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv")
    assert len(list((work / "features" / "colours").glob("*.npz"))) == 2

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    params = dataclasses.replace(params, transfer=dataclasses.replace(params.transfer, work_dir=blocked))
    with pytest.raises(UserError, match=r"transfer\.work_dir = .*: cannot write there") as err:
        transfer.run(params, checkpoint, tmp_path / "m2.json", tmp_path / "p2.tsv")
    assert "\n" not in str(err.value) and not (tmp_path / "m2.json").exists()


def test_damaged_cache_file_is_recomputed(tmp_path):
    path = tmp_path / "d" / "train-x.npz"
    path.parent.mkdir()
    path.write_bytes(b"truncated")
    features, hit = feature_cache.cached(path, lambda: np.ones((2, 3)))
    assert not hit and features.dtype == np.float32 and features.shape == (2, 3)
    again, hit = feature_cache.cached(path, lambda: pytest.fail("recomputed a good cache file"))
    assert hit and np.array_equal(again, features)


@pytest.mark.parametrize("name", ["average_top1", "baselines", "cog_l1", "a/b"])
def test_unusable_dataset_names_are_rejected(tmp_path, name):
    with pytest.raises(UserError, match="cannot name a dataset"):
        transfer_sets.load("embedded", name, write_dataset(tmp_path / "d"))
