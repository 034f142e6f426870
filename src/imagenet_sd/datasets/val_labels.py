"""The labels of ImageNet val in its flat layout, as distributed: ILSVRC2012_val_00000001.JPEG
... _00050000.JPEG in one folder, with no class folders.

Their labels come from one of (`data.val_labels`, or found in or beside the val folder):

- the ILSVRC-2012 devkit, ILSVRC2012_devkit_t12/ or its .tar.gz (read without
  extracting): line n of data/ILSVRC2012_validation_ground_truth.txt is the
  ILSVRC2012_ID (1..1000, NOT the sorted-wnid class index) of image n, and
  data/meta.mat maps IDs to wnids;
- Kaggle's LOC_val_solution.csv: the wnid of each image directly (the first of its
  PredictionString).

torchvision's `datasets.imagenet.parse_devkit_archive` reads the same devkit, but only
the official archive (checked by MD5), by extracting it and writing meta.bin into the
data root, and its parsers are not importable on their own; this module reads all
three forms in place, writes nothing, and says in one line what is wrong with a file.
"""
from __future__ import annotations

import csv
import io
import re
import tarfile
from pathlib import Path

import numpy as np

from imagenet_sd.core.errors import UserError, first_line
from imagenet_sd.prompts import classes

VAL_IMAGE = re.compile(r"^ILSVRC2012_val_\d{8}\.jpe?g$", re.IGNORECASE)
DEVKIT = "ILSVRC2012_devkit_t12"
DEVKIT_GROUND_TRUTH = f"{DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = f"{DEVKIT}/data/meta.mat"
SOLUTION_CSV = "LOC_val_solution.csv"
VAL_LABEL_FORMS = (f"the devkit folder {DEVKIT} (data/meta.mat + data/ILSVRC2012_validation_ground_truth.txt), "
                   f"its archive {DEVKIT}.tar.gz, or Kaggle's {SOLUTION_CSV}")


class _BadLabels(ValueError):
    """A label file that is not what VAL_LABEL_FORMS describes; the message says why."""


def flat_val_images(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if VAL_IMAGE.match(p.name) and p.is_file())


def find_val_labels(root: Path) -> Path | None:
    """The devkit folder, devkit archive or solution .csv in the val folder or beside it, if any."""
    for folder in (root, root.parent):
        for name in (DEVKIT, f"{DEVKIT}.tar.gz", SOLUTION_CSV):
            if (folder / name).exists():
                return folder / name
    return None


def flat_val_by_wnid(profile: str, root: Path, images: list[Path], labels: Path | None) -> dict[str, list[Path]]:
    """{wnid: image paths} of a flat val folder, labelled from `labels` or the label file found beside it."""
    labels_key = f"profiles.{profile}.data.val_labels"
    source = labels or find_val_labels(root)
    if source is None:
        raise UserError(f"params.yaml: profiles.{profile}.data.val = {str(root)!r}: flat ILSVRC2012_val_*.JPEG "
                        f"files but no labels in or beside the folder; set {labels_key} to {VAL_LABEL_FORMS}")
    where = (f"params.yaml: {labels_key} = {str(source)!r}" if labels
             else f"{source} (found beside profiles.{profile}.data.val)")
    label_of = read_val_labels(where, source)
    unlabelled = [p.name for p in images if p.stem not in label_of]
    if unlabelled:
        raise UserError(f"{where}: no label for {len(unlabelled)} of the {len(images)} images in {root} "
                        f"(e.g. {unlabelled[0]}); expected the ILSVRC-2012 labels of these images: {VAL_LABEL_FORMS}")
    print(f"val: flat layout, {len(images)} images labelled by {source}")
    by_wnid: dict[str, list[Path]] = {}
    for path in images:
        by_wnid.setdefault(label_of[path.stem], []).append(path)
    return by_wnid


def read_val_labels(where: str, path: Path) -> dict[str, str]:
    """{image name without extension: wnid} from a devkit folder, devkit archive or solution .csv."""
    try:
        if path.is_dir():
            # The devkit folder itself (any name), or the folder holding ILSVRC2012_devkit_t12/.
            data = path / "data" if (path / "data").is_dir() else path / DEVKIT / "data"
            ground_truth, meta = data / Path(DEVKIT_GROUND_TRUTH).name, data / "meta.mat"
            for needed in (ground_truth, meta):
                if not needed.is_file():
                    raise _BadLabels(f"no {needed}")
            labels = devkit_labels(ground_truth.read_text(), meta)
        elif path.name.endswith((".tar.gz", ".tgz", ".tar")):
            labels = _archive_labels(path)
        elif path.suffix == ".csv":
            labels = solution_labels(path.read_text())
        else:
            raise _BadLabels("not a folder, .tar.gz or .csv")
    except (_BadLabels, OSError, EOFError, UnicodeDecodeError, tarfile.TarError) as exc:
        raise UserError(f"{where}: {first_line(exc)}; expected {VAL_LABEL_FORMS}") from None
    foreign = sorted(set(labels.values()) - set(classes.imagenet1k_wnids()))
    if foreign:
        raise UserError(f"{where}: labels name {foreign[0]!r}, not an ImageNet-1K wnid; "
                        f"expected the ILSVRC-2012 labels: {VAL_LABEL_FORMS}")
    return labels


def _archive_labels(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> bytes:
            if name not in members:
                raise _BadLabels(f"the archive has no {name}")
            return tar.extractfile(members[name]).read()
        return devkit_labels(read(DEVKIT_GROUND_TRUTH).decode(), io.BytesIO(read(DEVKIT_META)))


def devkit_labels(ground_truth: str, meta) -> dict[str, str]:
    """{ILSVRC2012_val_0000000n: wnid} from the ground-truth text and meta.mat (a path or file object)."""
    wnid_of = ilsvrc_ids(meta)
    labels = {}
    for n, token in enumerate(ground_truth.split(), start=1):
        if not token.isdigit() or int(token) not in wnid_of:
            raise _BadLabels(f"ground-truth line {n} ({token!r}) is not an ILSVRC2012_ID of meta.mat")
        labels[f"ILSVRC2012_val_{n:08d}"] = wnid_of[int(token)]
    if not labels:
        raise _BadLabels("the ground-truth file is empty")
    return labels


def ilsvrc_ids(meta) -> dict[int, str]:
    """{ILSVRC2012_ID: wnid} of the devkit's meta.mat (its 'synsets' struct array)."""
    import scipy.io  # here: only the flat val layout needs it
    try:
        synsets = scipy.io.loadmat(meta, squeeze_me=True)["synsets"]
        ids, wnids = np.atleast_1d(synsets["ILSVRC2012_ID"]), np.atleast_1d(synsets["WNID"])
        return {int(i): str(w) for i, w in zip(ids, wnids)}
    except Exception as exc:  # loadmat raises many types for a file that is not a MAT file
        raise _BadLabels(f"meta.mat has no 'synsets' with ILSVRC2012_ID and WNID ({first_line(exc)})") from None


def solution_labels(text: str) -> dict[str, str]:
    """{ImageId: wnid} of Kaggle's LOC_val_solution.csv: the first wnid of each PredictionString."""
    rows = list(csv.reader(text.splitlines()))
    if not rows or [cell.strip() for cell in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise _BadLabels("the .csv does not start with the header ImageId,PredictionString")
    labels = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[1].split():
            raise _BadLabels(f"line {n} of the .csv is not ImageId,PredictionString")
        labels[row[0].strip()] = row[1].split()[0]
    return labels
