"""The transfer datasets of eval-transfer (and of clip-tune's zero-shot rows): the paper's Table 2 ten, plus plain folders.

`profiles.<profile>.transfer.datasets` maps a name to a root folder. The ten
names below are read through torchvision's class for that dataset, with
download=False and the root laid out as that class expects it; any other name is
a plain folder with `train/<class>/` and `test/<class>/` image folders (the
embedded fixture is one). A root of '' means not configured: the dataset is
skipped and reported, not an error.

Splits follow the same authors' transfer code for these ten datasets (naver/trex,
`transfer/data/`, t-ReX, ICLR 2023): the probe is fitted on "trainval" (train
plus the official val where there is one) and scored on test. The official val
is kept apart here, as split 'val', so that the probe can use it; eval-transfer
fits on train + val.

| name     | torchvision class   | train                      | val      | test                      |
|----------|---------------------|----------------------------|----------|---------------------------|
| aircraft | FGVCAircraft        | official train (variants)  | official | official test             |
| cars     | StanfordCars        | official train             | -        | official test             |
| dtd      | DTD                 | official train1            | val1     | test1 (partition 1)       |
| eurosat  | EuroSAT             | seeded 70% of each class   | -        | seeded 30% of each class  |
| flowers  | Flowers102          | official train             | official | official test             |
| pets     | OxfordIIITPet       | official trainval          | -        | official test             |
| food     | Food101             | official train             | -        | official test             |
| sun397   | SUN397              | Training_01.txt            | -        | Testing_01.txt            |
| inat2018 | INaturalist('2018') | train2018.json             | -        | val2018.json              |
| inat2019 | INaturalist('2019') | train2019.json             | -        | val2019.json              |

EuroSAT has no official split: 30% of every class is test, the rest train:
18,900 / 8,100 images, the sizes of trex's split (13,500 + 5,400 / 8,100, after
Feng et al., ICLR 2022), which takes 810 test images from every class where this
one takes a share proportional to the class. SUN397 uses the first of its ten
official partitions (50 train / 50 test images a class, files from Partitions.zip
in the root) when they are there, else a seeded draw of 50 train / 50 test images
a class (half of each class, if it has under 100). Seeded splits use `SPLIT_SEED`, not the `seed` param: the
split is part of the benchmark, so runs with different seeds score on the same
test images. iNaturalist's test images are its official val (test labels were
never published).

`headline` is the metric a dataset is usually reported in (Kornblith et al.,
CVPR 2019: mean per-class accuracy for Aircraft, Flowers and Pets, top-1 for the
others). The paper's Table 2 reports top-1 for all ten, as `average_top1` does.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from scipy.io.matlab import MatReadError
from torchvision import datasets as tv

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.seeds import derive
from imagenet_sd.datasets.readers import image_files

SPLIT_SEED = 0
EUROSAT_TEST_FRACTION = 0.3
SUN397_PER_CLASS = 50
GENERIC_LAYOUT = "<root>/train/<class>/ and <root>/test/<class>/ image folders"
IN1K = "in1k"           # ImageNet-1K probed as in ImageNet-CoG (module cog)
RESERVED = ("average_top1", "average_datasets", "note", "baselines", IN1K)   # metrics keys beside the datasets
COG_PREFIX = "cog_"     # ImageNet-CoG's levels and average (module cog) are named cog_*
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# What torchvision's constructors raise on a missing or malformed dataset: "Dataset not found"
# (RuntimeError), a missing annotation file (OSError), unparsable lines, .mat or json files.
READ_ERRORS = (RuntimeError, OSError, ValueError, KeyError, IndexError, TypeError, MatReadError)

Samples = list[tuple[Path, int]]


@dataclass(frozen=True)
class Split:
    classes: list[str]              # class names, label = position
    samples: Samples


@dataclass(frozen=True)
class TransferSet:
    splits: dict[str, Split]        # 'train', 'test', and 'val' where the dataset has an official one
    protocol: str                   # how the splits were made, recorded in metrics
    headline: str                   # 'top1' or 'mean_per_class': the metric the dataset is usually reported in


class Malformed(Exception):
    """A dataset root that exists but does not hold what its layout promises; message: what is wrong."""


# --------------------------------------------------------------------------- helpers

def labelled(classes: list[str], pairs) -> tuple[list[str], Samples]:
    """(class names, [(path, label)]) from a torchvision object's own lists."""
    return list(classes), [(Path(p), int(y)) for p, y in pairs]


def harmonise(parts: dict[str, tuple[list[str], Samples]]) -> dict[str, Split]:
    """One class list for all splits, train's, labels remapped by class name.

    DTD, Pets and Food-101 number classes per split (from that split's file), so
    the same label could name different classes in train and test.
    """
    classes = parts["train"][0]
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, (names, samples) in parts.items():
        unknown = next((names[y] for _, y in samples if names[y] not in index), None)
        if unknown is not None:
            raise Malformed(f"{split} class {unknown!r} has no train images")
        if not samples:
            raise Malformed(f"the {split} split is empty")
        missing = next((p for p, _ in samples if not p.is_file()), None)
        if missing is not None:
            raise Malformed(f"image {str(missing)!r} of the {split} split is missing")
        splits[split] = Split(classes, sorted((p, index[names[y]]) for p, y in samples))
    return splits


def seeded_split(name: str, classes: list[str], samples: Samples,
                 counts: Callable[[int], tuple[int, int]]) -> dict[str, Split]:
    """{'train', 'test'}: per class, `counts(n)` = (train, test) images drawn without overlap.

    Each class is shuffled by its own seed, derived from SPLIT_SEED, the dataset
    and the class name, after sorting its paths: the draw depends neither on
    the order files are listed in nor on the other classes.
    """
    by_class: dict[int, list[Path]] = {label: [] for label in range(len(classes))}
    for path, label in samples:
        by_class[label].append(path)
    train, test = [], []
    for label, class_name in enumerate(classes):
        members = sorted(by_class[label])
        n_train, n_test = counts(len(members))
        rng = np.random.default_rng(derive(SPLIT_SEED, "transfer-split", name, class_name))
        order = rng.permutation(len(members))
        test += [(members[i], label) for i in order[:n_test]]
        train += [(members[i], label) for i in order[n_test:n_test + n_train]]
    return harmonise({"train": (classes, train), "test": (classes, test)})


# --------------------------------------------------------------------------- the ten

def official(make: Callable[[str], object], splits: dict[str, str],
             pairs: Callable[[object], Iterable] = lambda ds: zip(ds._image_files, ds._labels)) -> dict[str, Split]:
    """Our splits from a torchvision class's official ones: `splits` maps ours to theirs, `make(theirs)`
    builds the torchvision object, `pairs(ds)` lists its (path, label) pairs."""
    parts = {}
    for ours, theirs in splits.items():
        ds = make(theirs)
        parts[ours] = labelled(ds.classes, pairs(ds))
    return harmonise(parts)


TRAIN_TEST = {"train": "train", "test": "test"}
TRAIN_VAL_TEST = {"train": "train", "val": "val", "test": "test"}


def aircraft(root: Path) -> TransferSet:
    splits = official(lambda s: tv.FGVCAircraft(root, split=s, annotation_level="variant", download=False),
                      TRAIN_VAL_TEST)
    return TransferSet(splits, "official train/val/test (variant, 100 classes)", "mean_per_class")


def cars(root: Path) -> TransferSet:
    splits = official(lambda s: tv.StanfordCars(root, split=s, download=False), TRAIN_TEST, lambda ds: ds._samples)
    return TransferSet(splits, "official train/test", "top1")


def dtd(root: Path) -> TransferSet:
    splits = official(lambda s: tv.DTD(root, split=s, partition=1, download=False), TRAIN_VAL_TEST)
    return TransferSet(splits, "official partition 1: train1/val1/test1", "top1")


def eurosat(root: Path) -> TransferSet:
    ds = tv.EuroSAT(root, download=False)
    classes, samples = labelled(ds.classes, ds.samples)

    def counts(n: int) -> tuple[int, int]:
        n_test = min(n - 1, max(1, round(EUROSAT_TEST_FRACTION * n)))   # every class in both splits
        return n - n_test, n_test
    return TransferSet(seeded_split("eurosat", classes, samples, counts),
                       f"seeded: {EUROSAT_TEST_FRACTION:.0%} of each class test, the rest train "
                       f"(split seed {SPLIT_SEED})", "top1")


def flowers(root: Path) -> TransferSet:
    splits = official(lambda s: tv.Flowers102(root, split=s, download=False), TRAIN_VAL_TEST)
    return TransferSet(splits, "official train/val/test", "mean_per_class")


def pets(root: Path) -> TransferSet:
    splits = official(lambda s: tv.OxfordIIITPet(root, split=s, target_types="category", download=False),
                      {"train": "trainval", "test": "test"}, lambda ds: zip(ds._images, ds._labels))
    return TransferSet(splits, "official trainval/test", "mean_per_class")


def food(root: Path) -> TransferSet:
    splits = official(lambda s: tv.Food101(root, split=s, download=False), TRAIN_TEST)
    return TransferSet(splits, "official train/test", "top1")


def sun397(root: Path) -> TransferSet:
    ds = tv.SUN397(root, download=False)
    classes, samples = labelled(ds.classes, zip(ds._image_files, ds._labels))
    partition = {"train": root / "Training_01.txt", "test": root / "Testing_01.txt"}
    if all(f.is_file() for f in partition.values()):
        label_of = dict(samples)
        parts = {split: (classes, partition_samples(f, ds._data_dir, label_of)) for split, f in partition.items()}
        return TransferSet(harmonise(parts), "official partition 1: Training_01/Testing_01", "top1")

    def counts(n: int) -> tuple[int, int]:
        half = min(SUN397_PER_CLASS, n // 2)
        return half, half
    return TransferSet(seeded_split("sun397", classes, samples, counts),
                       f"seeded: {SUN397_PER_CLASS} train + {SUN397_PER_CLASS} test images a class "
                       f"(no Training_01.txt/Testing_01.txt in the root; split seed {SPLIT_SEED})", "top1")


def partition_samples(listing: Path, data_dir: Path, label_of: dict[Path, int]) -> Samples:
    """The images a SUN397 partition file names ('/a/abbey/sun_x.jpg' lines), labelled as torchvision does."""
    samples = []
    for line in listing.read_text().split():
        path = data_dir / line.lstrip("/")
        if path not in label_of:
            raise Malformed(f"{listing.name} lists {line!r}, which is not an image of SUN397/")
        samples.append((path, label_of[path]))
    return samples


def inaturalist(version: str) -> Callable[[Path], TransferSet]:
    def read(root: Path) -> TransferSet:
        ds = tv.INaturalist(root, version=version, target_type="full", download=False)
        # torchvision lists every image of the version folder under its category;
        # which images are train and which val is only in the official json files.
        label_of = {f"{ds.all_categories[c]}/{name}": c for c, name in ds.index}
        classes = list(ds.all_categories)
        parts = {split: (classes, official_split(root / f"{source}{version}.json", Path(ds.root), label_of))
                 for split, source in (("train", "train"), ("test", "val"))}
        return TransferSet(harmonise(parts), f"official train{version}.json / val{version}.json as test", "top1")
    return read


def official_split(annotations: Path, version_dir: Path, label_of: dict[str, int]) -> Samples:
    """Images of an iNaturalist train/val json, labelled by torchvision's category of their folder."""
    with open(annotations) as f:
        images = json.load(f)["images"]
    samples = []
    for image in images:
        # 'train_val2018/Plantae/7477/x.jpg': the first folder is the archive's, which
        # torchvision's layout renames to the version ('2018').
        relative = image["file_name"].split("/", 1)[-1]
        if relative not in label_of:
            raise Malformed(f"{annotations.name} lists {image['file_name']!r}, which is not under "
                            f"{version_dir.name}/<super-category>/<category>/")
        samples.append((version_dir / relative, label_of[relative]))
    return samples


@dataclass(frozen=True)
class Known:
    read: Callable[[Path], TransferSet]
    layout: str                     # what the root must hold, for error messages


KNOWN: dict[str, Known] = {
    "aircraft": Known(aircraft, "<root>/fgvc-aircraft-2013b/data/ with images/, variants.txt and "
                                "images_variant_{train,val,test}.txt "
                                "(fgvc-aircraft-2013b.tar.gz extracted into <root>)"),
    "cars": Known(cars, "<root>/stanford_cars/ with cars_train/, cars_test/, cars_test_annos_withlabels.mat "
                        "and devkit/cars_meta.mat, devkit/cars_train_annos.mat"),
    "dtd": Known(dtd, "<root>/dtd/dtd/ with images/<class>/ and labels/{train,val,test}1.txt "
                      "(dtd-r1.0.1.tar.gz extracted into <root>/dtd)"),
    "eurosat": Known(eurosat, "<root>/eurosat/2750/<class>/*.jpg "
                              "(the RGB EuroSAT.zip extracted into <root>/eurosat)"),
    "flowers": Known(flowers, "<root>/flowers-102/ with jpg/, imagelabels.mat and setid.mat, the official files "
                              "(torchvision checks their MD5)"),
    "pets": Known(pets, "<root>/oxford-iiit-pet/ with images/ and annotations/{trainval,test}.txt"),
    "food": Known(food, "<root>/food-101/ with images/<class>/ and meta/{train,test}.json"),
    "sun397": Known(sun397, "<root>/SUN397/ with ClassName.txt and <letter>/<class>/sun_*.jpg, and for the "
                            "official split <root>/Training_01.txt and Testing_01.txt from Partitions.zip"),
    "inat2018": Known(inaturalist("2018"), "<root>/2018/<super-category>/<category>/*.jpg "
                                           "(train_val2018.tar.gz extracted and renamed 2018) "
                                           "and <root>/train2018.json, <root>/val2018.json"),
    "inat2019": Known(inaturalist("2019"), "<root>/2019/<super-category>/<category>/*.jpg "
                                           "(train_val2019.tar.gz extracted and renamed 2019) "
                                           "and <root>/train2019.json, <root>/val2019.json"),
}


# --------------------------------------------------------------------------- plain folders

def folders(root: Path) -> TransferSet:
    found = {}
    for split in ("train", "test"):
        classes = image_files(root / split) if (root / split).is_dir() else {}
        if not classes:
            raise Malformed(f"no class folders with images in {split}/")
        found[split] = classes
    unknown = sorted(set(found["test"]) - set(found["train"]))
    if unknown:
        raise Malformed(f"test class {unknown[0]!r} has no train/ folder; "
                        "train/ and test/ must hold the same classes")
    names = sorted(found["train"])
    label = {c: i for i, c in enumerate(names)}
    splits = {split: Split(names, [(p, label[c]) for c, files in sorted(classes.items()) for p in files])
              for split, classes in found.items()}
    return TransferSet(splits, "train/ and test/ folders", "top1")


# --------------------------------------------------------------------------- entry points

def load(profile: str, name: str, root: Path) -> TransferSet:
    """The dataset `name` at `root`; UserError naming the param, the root and the layout if it is not there."""
    key = f"profiles.{profile}.transfer.datasets.{name}"
    check_name(key, name)
    known = KNOWN.get(name)
    layout = known.layout if known else GENERIC_LAYOUT
    # Checked first: torchvision's INaturalist would create a missing root.
    if not root.is_dir():
        raise UserError(f"params.yaml: {key} = {str(root)!r}: no such folder; expected {layout}")
    try:
        return known.read(root) if known else folders(root)
    except (Malformed, *READ_ERRORS) as exc:
        raise UserError(f"params.yaml: {key} = {str(root)!r}: {reason(exc)}; expected {layout}") from None


def reason(exc: Exception) -> str:
    """What is wrong with a dataset root, on one line."""
    text = " ".join(str(exc).split())
    if isinstance(exc, Malformed):
        return text
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename} is missing"
    if text.startswith("Dataset not found"):     # "... or corrupted": Flowers102 checks MD5s
        return "torchvision found no dataset there" + (", or a corrupted one" if "corrupted" in text else "")
    return f"torchvision could not read it ({type(exc).__name__}: {text})"


def check_name(key: str, name: str) -> None:
    if name in RESERVED or name.startswith(COG_PREFIX) or not SAFE_NAME.fullmatch(name):
        raise UserError(f"params.yaml: {key}: {name!r} cannot name a dataset (it names a cache folder and "
                        f"a metrics key); use letters, digits, '.', '_', '-', not {', '.join(RESERVED)} "
                        f"or {COG_PREFIX}* (ImageNet-CoG's: transfer.cog)")


def validate(params) -> tuple[dict[str, TransferSet], list[str]]:
    """(the configured datasets, read and checked; the names whose root is '' and are skipped)."""
    configured, skipped = {}, []
    for name, root in params.transfer.datasets.items():
        if root is None:
            check_name(f"profiles.{params.profile}.transfer.datasets.{name}", name)
            skipped.append(name)
        else:
            configured[name] = load(params.profile, name, root)
    return configured, skipped
