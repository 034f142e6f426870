"""The digits profile's real data: scikit-learn's handwritten digits, split once into train and test.

scikit-learn ships the test set of the UCI "Optical Recognition of Handwritten Digits"
data (1,797 images of 8x8 pixels, 17 grey levels, classes 0-9). It is split here, per
class and by a fixed seed, into a train split (70 %, 1,258 images) and a test split
(30 %, 539 images): `split()`. The train split is all the generator
(`imagenet_sd.digits`) ever sees, and the real baseline's (`source: real`) training
set; the test split is seen by nothing but eval-imagenet, as the profile's `val`.

`build(out)` writes both as class folders named by wnid (`<out>/train/<wnid>/<i>.png`,
`<out>/test/<wnid>/<i>.png`, `i` the image's index in `load_digits`), 8x8 RGB PNGs
(grey level v of 0..16 -> round(v x 255 / 16) on all three channels, lossless).

Docs: docs/digits.md
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imagenet_sd.core import seeds
from imagenet_sd.models import embedded
from imagenet_sd.prompts import classes

VERSION = 1
MARKER = "digits.json"
SPLIT_SEED = 0           # the split is the same whatever the run's `seed`: it is data, not an experiment
TEST_SHARE = 0.3
LEVELS = 16              # load_digits' grey levels run 0..16
SPLITS = ("train", "test")


def load() -> tuple[np.ndarray, np.ndarray]:
    """(images as uint8 N x 8 x 8 in 0..255, labels 0..9) of scikit-learn's digits, in its order."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255 / LEVELS)).astype(np.uint8)
    return pixels, bunch.target.astype(np.int64)


def split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """{"train": indices, "test": indices} into `labels`: round(30 %) of each class to test,
    chosen by `seeds.ranks` (no library's random stream, so the split never changes with numpy)."""
    test = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = members[np.argsort(seeds.ranks(seeds.derive(SPLIT_SEED, "digits-split", int(label)), members),
                                   kind="stable")]
        test.extend(order[: round(TEST_SHARE * len(members))])
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def train_split() -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the train split, in index order."""
    pixels, labels = load()
    chosen = split(labels)["train"]
    return pixels[chosen], labels[chosen]


def _write(workdir: Path, root: Path) -> None:
    """Both splits' class folders into `root`, and split.json (where they come from, counts a class)."""
    from PIL import Image
    pixels, labels = load()
    wnids = classes.digits_wnids()
    counts = {}
    for name, chosen in split(labels).items():
        for i in chosen:
            folder = root / name / wnids[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(pixels[i][:, :, None], 3, axis=2)).save(folder / f"{i:04d}.png")
        counts[name] = {wnids[c]: int((labels[chosen] == c).sum()) for c in range(len(wnids))}
    (root / "split.json").write_text(json.dumps({"source": "sklearn.datasets.load_digits", "split_seed": SPLIT_SEED,
                                                 "test_share": TEST_SHARE, "counts": counts}, indent=1) + "\n")


def is_current(out: Path) -> bool:
    return embedded.is_current(out, MARKER, VERSION)


def build(out: Path) -> bool:
    """Write the train and test folders into `out` unless current there; True if written (built beside
    `out` and renamed into place, the marker last: a crash leaves no half folder)."""
    return embedded.build_folder(out, _write, MARKER, VERSION)
