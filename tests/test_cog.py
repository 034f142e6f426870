"""ImageNet-CoG: its two official files read into five levels, its ImageNet-1K probe, and their errors."""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import embedded_raw
from imagenet_sd.core import params as params_module
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import read_tsv
from imagenet_sd.core.params import CogParams, DataParams
from imagenet_sd.datasets import fixtures
from imagenet_sd.datasets.imagenet_sets import TEST_SETS
from imagenet_sd.evaluate import cog, transfer
from imagenet_sd.prompts import classes
from test_transfer import make_params, write_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cog_files(tmp_path) -> CogParams:
    root = tmp_path / "cog"
    fixtures._write_cog(root)
    return CogParams(images=root / "images", levels_file=root / "cog_levels_mapping_file.pkl",
                     splits_file=root / "cog_concepts_split_file.pkl")


def dump(path: Path, content) -> None:
    with open(path, "wb") as f:
        pickle.dump(content, f)


def load(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f)


def test_levels_follow_the_official_files(cog_files):
    levels = cog.validate(make_params({}, cog=cog_files))
    assert list(levels) == ["cog_l1", "cog_l2", "cog_l3", "cog_l4", "cog_l5"]
    wnids = load(cog_files.levels_file)
    concepts = load(cog_files.splits_file)
    for name, level_wnids in zip(levels, wnids):
        splits = levels[name].splits
        assert set(splits) == {"train", "test"}     # no official val: C is chosen on part of train
        assert splits["train"].classes == sorted(level_wnids)
        for split, data in splits.items():
            expected = sorted((cog_files.images / f.lstrip("/"), data.classes.index(w))
                              for w in level_wnids for f in concepts[w][split])
            assert data.samples == expected
            # label = the concept folder the image is in
            assert all(p.parent.name == data.classes[y] for p, y in data.samples)


def test_a_mapping_of_levels_is_read_in_key_order(cog_files):
    wnids = load(cog_files.levels_file)
    dump(cog_files.levels_file, {f"L{k}": wnids[k - 1] for k in (5, 3, 1, 2, 4)})
    levels = cog.validate(make_params({}, cog=cog_files))
    assert levels["cog_l1"].splits["train"].classes == sorted(wnids[0])
    assert levels["cog_l5"].splits["train"].classes == sorted(wnids[4])


@pytest.mark.slow
def test_levels_are_probed_and_averaged_apart_from_the_transfer_datasets(tmp_path, checkpoint, cog_files):
    params = make_params({"colours": write_dataset(tmp_path / "colours")}, cog=cog_files)
    metrics = transfer.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv", tmp_path / "features")

    tops = [metrics[name]["top1"] for name in cog.NAMES]
    for name in cog.NAMES:
        m = metrics[name]
        assert (m["classes"], m["train_images"], m["test_images"]) == (
            fixtures.COG_CONCEPTS, fixtures.COG_CONCEPTS * fixtures.COG_TRAIN, fixtures.COG_CONCEPTS * fixtures.COG_TEST)
        assert m["split"].startswith(f"ImageNet-CoG L{name[-1]}")
    assert metrics["cog_average_top1"] == round(float(np.mean(tops)), 2)
    assert metrics["average_top1"] == metrics["colours"]["top1"] and metrics["average_datasets"] == 1
    assert [row["dataset"] for row in read_tsv(tmp_path / "p.tsv")] == ["colours", *cog.NAMES]


def test_unconfigured_cog_is_skipped_and_reported(tmp_path, checkpoint):
    params = make_params({"colours": write_dataset(tmp_path / "colours")})
    metrics = transfer.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv", tmp_path / "features")
    assert metrics["cog_average_top1"] is None
    assert all("not configured" in metrics[name]["skipped"] for name in cog.NAMES)


def test_all_three_paths_or_none(tmp_path):
    raw = embedded_raw()
    block = raw["profiles"]["embedded"]["transfer"]["cog"]
    assert params_module.parse(raw).transfer.cog is not None   # the embedded profile runs the fixture
    block.update(images="", levels_file="", splits_file="")
    assert params_module.parse(raw).transfer.cog is None
    block["levels_file"] = "cog_levels_mapping_file.pkl"
    with pytest.raises(UserError, match=r"transfer\.cog\.images is '' but ImageNet-CoG needs all of"):
        params_module.parse(raw)


@pytest.mark.parametrize("damage, key, says", [
    ("no_images", "images", "no such folder"),
    ("no_levels_file", "levels_file", "no such file"),
    ("levels_not_pickle", "levels_file", "not a readable pickle file"),
    ("four_levels", "levels_file", "expected a sequence of 5 concept lists"),
    ("splits_not_dict", "splits_file", "expected a dict of concept"),
    ("concept_without_test", "", "has no 'test' list"),
    ("image_missing", "", "is missing"),
])
def test_malformed_cog_is_a_one_line_error_before_output(tmp_path, checkpoint, cog_files, damage, key, says):
    if damage == "no_images":
        cog_files = CogParams(tmp_path / "nowhere", cog_files.levels_file, cog_files.splits_file)
    elif damage == "no_levels_file":
        cog_files.levels_file.unlink()
    elif damage == "levels_not_pickle":
        cog_files.levels_file.write_text("n01440764\n")
    elif damage == "four_levels":
        dump(cog_files.levels_file, load(cog_files.levels_file)[:4])
    elif damage == "splits_not_dict":
        dump(cog_files.splits_file, list(load(cog_files.splits_file).items()))
    elif damage == "concept_without_test":
        concepts = load(cog_files.splits_file)
        del concepts[sorted(concepts)[0]]["test"]
        dump(cog_files.splits_file, concepts)
    elif damage == "image_missing":
        next((cog_files.images).rglob("*.JPEG")).unlink()
    with pytest.raises(UserError) as err:
        transfer.run(make_params({}, cog=cog_files), checkpoint, tmp_path / "m.json", tmp_path / "p.tsv",
                     tmp_path / "features")
    message = str(err.value)
    assert f"profiles.embedded.transfer.cog{'.' + key if key else ''}" in message and says in message
    assert "\n" not in message
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "features").exists()


# --------------------------------------------------------------------------- ImageNet-1K

IN1K = classes.imagenet1k_wnids()


def imagenet(root: Path, train: int = 3, val_only: tuple[str, ...] = ()) -> DataParams:
    """A 3-class ImageNet in class folders; `val_only` classes have val images but no train folder."""
    wnids = list(IN1K[:3])
    for i, wnid in enumerate(wnids):
        for split, count in (("train", train), ("val", 2)):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for j in range(count):
                fixtures._image(wnid, j).save(folder / f"{wnid}_{split}_{j}.JPEG")
    for wnid in val_only:
        (root / "val" / wnid).mkdir(parents=True)
        fixtures._image(wnid, 0).save(root / "val" / wnid / f"{wnid}_0.JPEG")
    return DataParams(train=root / "train", test_sets={**dict.fromkeys(TEST_SETS), "val": root / "val"})


def with_in1k(params, data: DataParams):
    return dataclasses.replace(params, data=data, transfer=dataclasses.replace(params.transfer, in1k=True))


def test_in1k_is_fitted_on_train_scored_on_val_of_its_classes(tmp_path, checkpoint):
    data = imagenet(tmp_path / "imagenet", val_only=(IN1K[500],))
    params = with_in1k(make_params({"colours": write_dataset(tmp_path / "colours")}), data)
    metrics = transfer.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv", tmp_path / "features")

    m = metrics["in1k"]
    assert (m["classes"], m["train_images"], m["test_images"]) == (3, 9, 6)
    assert "1 images of other classes left out" in m["split"]
    assert metrics["average_top1"] == metrics["colours"]["top1"] and metrics["average_datasets"] == 1
    assert "in1k" in [row["dataset"] for row in read_tsv(tmp_path / "p.tsv")]


def test_in1k_off_is_reported_as_skipped(tmp_path, checkpoint):
    metrics = transfer.run(make_params({"colours": write_dataset(tmp_path / "colours")}), checkpoint,
                           tmp_path / "m.json", tmp_path / "p.tsv", tmp_path / "features")
    assert metrics["in1k"] == {"skipped": "transfer.in1k: false"}


@pytest.mark.parametrize("damage, says", [
    ("no_train", "data.train or profiles.embedded.data.val is ''"),
    ("not_wnid", "class folder 'cats' is not a wnid"),
    ("empty_train", "no class folders with images"),
])
def test_in1k_without_imagenet_is_a_one_line_error(tmp_path, checkpoint, damage, says):
    data = imagenet(tmp_path / "imagenet")
    if damage == "no_train":
        data = dataclasses.replace(data, train=None)
    elif damage == "not_wnid":
        (data.train / IN1K[0]).rename(data.train / "cats")
    elif damage == "empty_train":
        for f in data.train.rglob("*.JPEG"):
            f.unlink()
    with pytest.raises(UserError) as err:
        transfer.run(with_in1k(make_params({}), data), checkpoint, tmp_path / "m.json", tmp_path / "p.tsv",
                     tmp_path / "features")
    assert says in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "features").exists()
