"""The ten transfer datasets, read through torchvision from tiny fixtures in each real layout.

Every fixture is written here from what the torchvision class reads (annotation
text, .mat and json files, folder structure) with a few 8x8 JPEGs, so the tests
need no download.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image
from scipy.io import savemat

from conftest import embedded_raw
from imagenet_sd.core import params as params_module
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import transfer_sets
from imagenet_sd.evaluate import transfer

REPO = Path(__file__).resolve().parents[1]


def jpeg(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade * 40 % 256, 90, 160)).save(path)
    return path


def lines(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{r}\n" for r in rows))


# --------------------------------------------------------------------------- fixtures, one per layout
# Each writer returns the root to configure and what the reader must find:
# {split: [(file name, class name)]}.

def write_aircraft(root: Path) -> dict:
    data = root / "fgvc-aircraft-2013b" / "data"
    classes = ["707-320", "A380", "Cessna 172"]       # names with spaces: the label is the rest of the line
    lines(data / "variants.txt", classes)
    expected, n = {}, 0
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        rows = []
        for c in classes:
            for _ in range(per_class):
                n += 1
                jpeg(data / "images" / f"{n:07d}.jpg", n)
                rows.append((f"{n:07d}", c))
        lines(data / f"images_variant_{split}.txt", [f"{i} {c}" for i, c in rows])
        expected[split] = [(f"{i}.jpg", c) for i, c in rows]
    return expected


def write_cars(root: Path) -> dict:
    base = root / "stanford_cars"
    classes = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(classes, dtype=object)[None]})
    expected = {}
    for split, folder, mat in (("train", "cars_train", base / "devkit" / "cars_train_annos.mat"),
                               ("test", "cars_test", base / "cars_test_annos_withlabels.mat")):
        names, labels = [], []
        for k in range(6 if split == "train" else 3):
            names.append(f"{k + 1:05d}.jpg")
            labels.append(k % 3 + 1)                  # Cars numbers classes from 1
            jpeg(base / folder / names[-1], k)
        annotations = np.zeros((1, len(names)), dtype=[("fname", object), ("class", object)])
        annotations["fname"], annotations["class"] = names, labels
        savemat(mat, {"annotations": annotations})
        expected[split] = [(f, classes[y - 1]) for f, y in zip(names, labels)]
    return expected


def write_dtd(root: Path) -> dict:
    data = root / "dtd" / "dtd"
    expected = {}
    for split, per_class in (("train", 2), ("val", 1), ("test", 2)):
        rows = [f"{c}/{c}_{split}_{i}.jpg" for c in ("banded", "dotted", "zigzagged") for i in range(per_class)]
        for r in rows:
            jpeg(data / "images" / r)
        lines(data / "labels" / f"{split}1.txt", rows)
        expected[split] = [(r.split("/")[1], r.split("/")[0]) for r in rows]
    return expected


def write_eurosat(root: Path, per_class: int = 10) -> dict:
    for c in ("Forest", "Highway", "River"):
        for i in range(per_class):
            jpeg(root / "eurosat" / "2750" / c / f"{c}_{i + 1}.jpg", i)
    return {}


def write_flowers(root: Path, monkeypatch) -> dict:
    base = root / "flowers-102"
    labels = [1, 2, 3] * 4                            # image_00001 .. image_00012, classes 1-3 of 102
    for i in range(len(labels)):
        jpeg(base / "jpg" / f"image_{i + 1:05d}.jpg", i)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    ids = {"trnid": [1, 2, 3, 4, 5, 6], "valid": [7, 8, 9], "tstid": [10, 11, 12]}
    savemat(base / "setid.mat", {k: np.array([v]) for k, v in ids.items()})
    # torchvision checks both .mat files against the official MD5s; these are ours.
    md5 = {name: hashlib.md5((base / name).read_bytes()).hexdigest() for name in ("imagelabels.mat", "setid.mat")}
    monkeypatch.setattr(torchvision.datasets.Flowers102, "_file_dict", {
        "image": ("102flowers.tgz", ""), "label": ("imagelabels.mat", md5["imagelabels.mat"]),
        "setid": ("setid.mat", md5["setid.mat"])})
    names = torchvision.datasets.Flowers102.classes
    return {split: [(f"image_{i:05d}.jpg", names[labels[i - 1] - 1]) for i in ids[key]]
            for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))}


def write_pets(root: Path) -> dict:
    base = root / "oxford-iiit-pet"
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 3, 1)]   # (image prefix, class, species)
    expected = {}
    for split, source, ids in (("train", "trainval", (1, 2)), ("test", "test", (3,))):
        rows = [(f"{b}_{i}", c, s) for b, c, s in breeds for i in ids]
        for image_id, _, _ in rows:
            jpeg(base / "images" / f"{image_id}.jpg")
        lines(base / "annotations" / f"{source}.txt", [f"{i} {c} {s} 1" for i, c, s in rows])
        expected[split] = [(f"{i}.jpg", {"Abyssinian": "Abyssinian", "american_bulldog": "American Bulldog",
                                         "Bengal": "Bengal"}[i.rsplit("_", 1)[0]]) for i, _, _ in rows]
    (base / "annotations" / "trimaps").mkdir()
    return expected


def write_food(root: Path) -> dict:
    base = root / "food-101"
    expected = {}
    for split, ids in (("train", (1, 2, 3)), ("test", (4,))):
        meta = {c: [f"{c}/{i}" for i in ids] for c in ("apple_pie", "baklava", "waffles")}
        for rows in meta.values():
            for r in rows:
                jpeg(base / "images" / f"{r}.jpg")
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        expected[split] = [(f"{r.split('/')[1]}.jpg", c) for c, rows in meta.items() for r in rows]
    return expected


SUN_CLASSES = {"/a/abbey": "abbey", "/b/bakery/shop": "bakery/shop", "/z/zoo": "zoo"}


def write_sun397(root: Path, partitions: bool) -> dict:
    data = root / "SUN397"
    lines(data / "ClassName.txt", SUN_CLASSES)
    files = {c: [f"{c}/sun_{c.split('/')[-1]}{i}.jpg" for i in range(4)] for c in SUN_CLASSES}
    for rows in files.values():
        for r in rows:
            jpeg(data / r.lstrip("/"))
    if not partitions:
        return {}
    split_rows = {"train": [r for rows in files.values() for r in rows[:2]],
                  "test": [r for rows in files.values() for r in rows[2:]]}
    lines(root / "Training_01.txt", split_rows["train"])
    lines(root / "Testing_01.txt", split_rows["test"])
    return {split: [(r.rsplit("/", 1)[1], SUN_CLASSES["/".join(r.split("/")[:-1])]) for r in rows]
            for split, rows in split_rows.items()}


def write_inaturalist(root: Path, version: str) -> dict:
    # Category ids are the numeric folder names, 0..N-1 across super-categories.
    categories = {"Aves/0": 0, "Aves/1": 1, "Plantae/2": 2}
    expected = {}
    for split, source, ids in (("train", "train", (0, 1, 2)), ("test", "val", (3,))):
        images, annotations = [], []
        for folder, cat in categories.items():
            for i in ids:
                name = f"{folder}/{cat}{i}abc.jpg"
                jpeg(root / version / name, i)
                images.append({"id": len(images), "file_name": f"train_val{version}/{name}"})
                annotations.append({"id": len(annotations), "image_id": images[-1]["id"], "category_id": cat})
        (root / f"{source}{version}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations,
             "categories": [{"id": c, "name": f"species {c}"} for c in categories.values()]}))
        expected[split] = [(f"{cat}{i}abc.jpg", folder) for folder, cat in categories.items() for i in ids]
    return expected


def build(name: str, root: Path, monkeypatch) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    return {"aircraft": lambda: write_aircraft(root), "cars": lambda: write_cars(root),
            "dtd": lambda: write_dtd(root), "eurosat": lambda: write_eurosat(root),
            "flowers": lambda: write_flowers(root, monkeypatch), "pets": lambda: write_pets(root),
            "food": lambda: write_food(root), "sun397": lambda: write_sun397(root, partitions=True),
            "inat2018": lambda: write_inaturalist(root, "2018"),
            "inat2019": lambda: write_inaturalist(root, "2019")}[name]()


def named(split: transfer_sets.Split) -> list[tuple[str, str]]:
    return sorted((p.name, split.classes[y]) for p, y in split.samples)


# --------------------------------------------------------------------------- official splits

OFFICIAL = ["aircraft", "cars", "dtd", "flowers", "pets", "food", "sun397", "inat2018", "inat2019"]


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_splits_are_read_through_torchvision(tmp_path, monkeypatch, name):
    expected = build(name, tmp_path / name, monkeypatch)
    data = transfer_sets.load("paper", name, tmp_path / name)
    assert set(data.splits) == set(expected)
    for split, files in expected.items():
        # Every image in its split, under its own class name, whatever the split's label numbering.
        assert named(data.splits[split]) == sorted(files), split
        assert all(p.is_file() for p, _ in data.splits[split].samples)
    classes = data.splits["train"].classes
    assert all(s.classes == classes for s in data.splits.values())
    assert ("val" in data.splits) == (name in ("aircraft", "dtd", "flowers"))   # official val only
    assert data.headline == ("mean_per_class" if name in ("aircraft", "flowers", "pets") else "top1")
    assert "official" in data.protocol


def test_class_counts_follow_the_dataset_not_the_fixture(tmp_path, monkeypatch):
    # Flowers' 102 names come from torchvision; a fixture using three of them still has 102 classes.
    build("flowers", tmp_path / "f", monkeypatch)
    assert len(transfer_sets.load("paper", "flowers", tmp_path / "f").splits["train"].classes) == 102
    build("inat2018", tmp_path / "i", monkeypatch)
    assert transfer_sets.load("paper", "inat2018", tmp_path / "i").splits["test"].classes == \
        ["Aves/0", "Aves/1", "Plantae/2"]


# --------------------------------------------------------------------------- seeded splits

def test_eurosat_split_is_seeded_stratified_and_reproducible(tmp_path):
    write_eurosat(tmp_path / "a")
    data = transfer_sets.load("paper", "eurosat", tmp_path / "a")
    train, test = data.splits["train"], data.splits["test"]
    assert sorted(data.splits) == ["test", "train"] and train.classes == ["Forest", "Highway", "River"]
    assert np.bincount([y for _, y in test.samples]).tolist() == [3, 3, 3]      # 30% of every class
    assert np.bincount([y for _, y in train.samples]).tolist() == [7, 7, 7]
    assert not {p for p, _ in train.samples} & {p for p, _ in test.samples}
    assert "seeded" in data.protocol
    # The same images in another folder split the same way: the draw depends on names, not on paths or order.
    write_eurosat(tmp_path / "b")
    again = transfer_sets.load("paper", "eurosat", tmp_path / "b").splits["test"]
    assert [(p.name, y) for p, y in again.samples] == [(p.name, y) for p, y in test.samples]


def test_sun397_without_partition_files_draws_a_seeded_half_split(tmp_path):
    write_sun397(tmp_path / "s", partitions=False)
    data = transfer_sets.load("paper", "sun397", tmp_path / "s")
    assert "seeded" in data.protocol and "Training_01.txt" in data.protocol
    assert data.splits["train"].classes == list(SUN_CLASSES.values())
    for split in ("train", "test"):                      # 4 images a class: 2 and 2 (50 and 50 from 100 up)
        assert np.bincount([y for _, y in data.splits[split].samples]).tolist() == [2, 2, 2]
    assert data == transfer_sets.load("paper", "sun397", tmp_path / "s")


# --------------------------------------------------------------------------- params and skipping

def test_empty_root_is_not_configured_and_skipped(tmp_path):
    write_dtd(tmp_path / "dtd")
    raw = embedded_raw()
    raw["profiles"]["embedded"]["transfer"]["datasets"] = {"dtd": str(tmp_path / "dtd"), "cars": ""}
    params = params_module.parse(raw)
    assert params.transfer.datasets == {"dtd": tmp_path / "dtd", "cars": None}
    configured, skipped = transfer_sets.validate(params)
    assert list(configured) == ["dtd"] and skipped == ["cars"]


def test_paper_profile_lists_the_ten_datasets_unconfigured():
    raw = embedded_raw()
    raw["profile"] = "paper"
    datasets = params_module.parse(raw).transfer.datasets
    assert list(datasets) == list(transfer_sets.KNOWN) and set(datasets.values()) == {None}


@pytest.mark.slow
def test_run_fits_on_train_and_val_and_reports_skipped_datasets(tmp_path, checkpoint, capsys):
    write_dtd(tmp_path / "dtd")
    base = params_module.parse(embedded_raw())
    params = dataclasses.replace(
        base, profile="embedded", evaluate=dataclasses.replace(base.evaluate, resize=36, crop=32),
        transfer=dataclasses.replace(base.transfer, datasets={"dtd": tmp_path / "dtd", "cars": None},
                                     batch_size=16, device="cpu", baselines=False, cog=None, in1k=False))
    metrics = transfer.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv", tmp_path / "features")
    m = metrics["dtd"]
    assert (m["classes"], m["train_images"], m["val_images"], m["test_images"]) == (3, 6, 3, 6)
    assert m["headline"] == "top1" and "train1/val1/test1" in m["split"]
    assert metrics["cars"] == {"skipped": "root not configured ('')"}
    assert metrics["average_top1"] == m["top1"] and metrics["average_datasets"] == 1
    assert json.loads((tmp_path / "m.json").read_text()) == transfer.headline(metrics)
    assert len(list((tmp_path / "features" / "dtd").glob("val-*.npz"))) == 1
    printed = capsys.readouterr().out
    assert "cars" in printed and "skipped" in printed and "over 1 datasets" in printed


# --------------------------------------------------------------------------- errors

def damage(name: str, root: Path) -> None:
    """Break one thing each dataset reads."""
    data = {"aircraft": root / "fgvc-aircraft-2013b" / "data" / "images_variant_val.txt",
            "cars": root / "stanford_cars" / "devkit" / "cars_meta.mat",
            "dtd": root / "dtd" / "dtd" / "labels" / "test1.txt",
            "pets": root / "oxford-iiit-pet" / "annotations" / "test.txt",
            "food": root / "food-101" / "meta" / "test.json",
            "inat2018": root / "val2018.json"}
    data[name].unlink()


@pytest.mark.parametrize("name", ["aircraft", "cars", "dtd", "pets", "food", "inat2018"])
def test_missing_annotation_file_is_a_one_line_error(tmp_path, monkeypatch, name):
    build(name, tmp_path / name, monkeypatch)
    damage(name, tmp_path / name)
    with pytest.raises(UserError) as err:
        transfer_sets.load("paper", name, tmp_path / name)
    message = str(err.value)
    assert message.startswith(f"params.yaml: profiles.paper.transfer.datasets.{name} = '{tmp_path / name}': ")
    assert "is missing" in message and transfer_sets.KNOWN[name].layout in message
    assert "\n" not in message


@pytest.mark.parametrize("name", sorted(transfer_sets.KNOWN))
def test_missing_and_empty_roots_are_one_line_errors(tmp_path, name):
    with pytest.raises(UserError, match="no such folder; expected") as err:
        transfer_sets.load("paper", name, tmp_path / "absent")
    assert "\n" not in str(err.value) and not (tmp_path / "absent").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        transfer_sets.load("paper", name, tmp_path / "empty")
    message = str(err.value)
    assert f"datasets.{name} = '{tmp_path / 'empty'}'" in message and "\n" not in message
    assert message.endswith(f"expected {transfer_sets.KNOWN[name].layout}")


def test_missing_image_is_named(tmp_path, monkeypatch):
    build("food", tmp_path / "food", monkeypatch)
    (tmp_path / "food" / "food-101" / "images" / "waffles" / "4.jpg").unlink()
    with pytest.raises(UserError, match=r"image '.*waffles/4.jpg' of the test split is missing"):
        transfer_sets.load("paper", "food", tmp_path / "food")


def test_flowers_with_other_mat_files_says_torchvision_rejected_them(tmp_path, monkeypatch):
    build("flowers", tmp_path / "f", monkeypatch)
    monkeypatch.undo()                                   # back to the official MD5s
    with pytest.raises(UserError, match="torchvision found no dataset there, or a corrupted one; .*MD5"):
        transfer_sets.load("paper", "flowers", tmp_path / "f")


def test_inaturalist_json_naming_an_absent_image_is_an_error(tmp_path, monkeypatch):
    build("inat2019", tmp_path / "i", monkeypatch)
    (tmp_path / "i" / "2019" / "Aves" / "0" / "03abc.jpg").unlink()
    with pytest.raises(UserError, match=r"val2019.json lists 'train_val2019/Aves/0/03abc.jpg', which is not"):
        transfer_sets.load("paper", "inat2019", tmp_path / "i")


def test_sun397_partition_naming_an_absent_image_is_an_error(tmp_path):
    write_sun397(tmp_path / "s", partitions=True)
    (tmp_path / "s" / "SUN397" / "z" / "zoo" / "sun_zoo3.jpg").unlink()
    with pytest.raises(UserError, match=r"Testing_01.txt lists '/z/zoo/sun_zoo3.jpg'"):
        transfer_sets.load("paper", "sun397", tmp_path / "s")


def test_test_class_without_train_images_is_an_error(tmp_path):
    write_dtd(tmp_path / "d")
    labels = tmp_path / "d" / "dtd" / "dtd" / "labels"
    lines(labels / "train1.txt", [r for r in (labels / "train1.txt").read_text().split() if "zigzagged" not in r])
    lines(labels / "val1.txt", [r for r in (labels / "val1.txt").read_text().split() if "zigzagged" not in r])
    with pytest.raises(UserError, match="test class 'zigzagged' has no train images"):
        transfer_sets.load("paper", "dtd", tmp_path / "d")
