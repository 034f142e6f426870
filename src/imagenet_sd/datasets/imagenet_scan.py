"""The ImageNet-style test sets on disk, for eval-imagenet and clip-tune: each configured root
scanned by its layout into {wnid: images}, up front (`validate`), and the plan of what a model is
scored on (`plan`); datasets/inference.py's `tally` counts the hits.

The test sets are datasets/imagenet_sets.py's (roots from `profiles.<profile>.data.<name>`); their folder
layouts (`LAYOUTS`):

- wnid:   <root>/<wnid>/*            class folders (ImageNet-Sketch, ImageNet-R, ImageNet-A)
- index:  <root>/<0..999>/*.jpeg     folder = ImageNet-1K class index (ImageNetV2)
- val:    <root>/<wnid>/*.JPEG       ILSVRC-2012 validation, class folders, or
          <root>/ILSVRC2012_val_*.JPEG  flat, as distributed, labelled by the devkit
                                     (`data.val_labels`, or found beside the folder;
                                     read by datasets/val_labels.py)

Only images of classes the model knows are planned. For a set of a class subset (IN-R and IN-A,
200 classes each) the plan also narrows the logits to the classes shared by the model and the
test set (`EvalPlan.columns`).

Docs: docs/evaluation.md#test-sets
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets.imagenet_sets import TEST_SETS, TestSet
from imagenet_sd.datasets.readers import image_files
from imagenet_sd.datasets.val_labels import VAL_LABEL_FORMS, flat_val_by_wnid, flat_val_images
from imagenet_sd.prompts import classes

# --------------------------------------------------------------------------- layouts and scans

@dataclass(frozen=True)
class Layout:
    """How a test set's root is laid out (datasets/imagenet_sets.py's `layout`)."""
    described: str                           # shown in errors: what the root should contain
    folder_wnid: Callable[[str], str | None]  # class folder name -> wnid; None if not of this layout
    flat: bool = False                       # also the flat ILSVRC-2012 val layout, labelled by the devkit


def _wnid_folder(name: str) -> str | None:
    return name if classes.WNID.match(name) else None


def _index_folder(name: str) -> str | None:
    in1k = classes.imagenet1k_wnids()
    return in1k[int(name)] if name.isdigit() and int(name) < len(in1k) else None


WNID_FOLDERS = "class folders named by wnid (<root>/n01440764/...)"
LAYOUTS: dict[str, Layout] = {
    "wnid": Layout(WNID_FOLDERS, _wnid_folder),
    "index": Layout("class folders named 0..999 by ImageNet-1K class index (<root>/0/...)", _index_folder),
    "val": Layout(f"{WNID_FOLDERS}, or the flat ILSVRC2012_val_*.JPEG files in <root> labelled by "
                  "the devkit (data.val_labels)", _wnid_folder, flat=True),
}


def subset_of(spec: TestSet) -> frozenset[str] | None:
    """The wnids of a test set of a class subset (IN-R, IN-A); None: it covers all of ImageNet-1K."""
    return classes.subset_wnids(spec.classes) if spec.classes else None


def layout_of(spec: TestSet) -> str:
    """What the root of `spec` should contain, in its own words (its class subset's size included)."""
    subset = subset_of(spec)
    return LAYOUTS[spec.layout].described + (f", {len(subset)} {spec.label} classes" if subset else "")


def configured_roots(params) -> dict[str, Path | None]:
    """The root of every test set of datasets/imagenet_sets.py (None: not configured, or left out of params.yaml);
    UserError for a key of `data` that names none."""
    unknown = [name for name in params.data.test_sets if name not in TEST_SETS]
    if unknown:
        raise UserError(f"params.yaml: unknown key profiles.{params.profile}.data.{unknown[0]}; known: train, "
                        f"val_labels and the test sets {', '.join(TEST_SETS)} (datasets/imagenet_sets.py)")
    return {name: params.data.test_sets.get(name) for name in TEST_SETS}


def skipped_test_sets(params, scanned) -> list[str]:
    """The test sets params.yaml sets to '' (those it leaves out are not this profile's: not listed)."""
    return [name for name in TEST_SETS if name in params.data.test_sets and name not in scanned]


def scan_test_set(profile: str, spec: TestSet, root: Path, labels: Path | None = None) -> dict[str, list[Path]]:
    """{wnid: image paths} of a test set root; UserError if the root is missing or malformed.

    `labels`: the devkit or .csv labelling a flat val folder (None: looked for beside it).
    """
    key = f"profiles.{profile}.data.{spec.name}"
    layout, expected = LAYOUTS[spec.layout], f"expected {layout_of(spec)}"
    if not root.is_dir():
        raise UserError(f"params.yaml: {key} = {str(root)!r}: no such folder; {expected}, "
                        f"or set {key}: '' to skip this test set")
    folders = image_files(root)
    flat = flat_val_images(root) if layout.flat else []
    if folders and flat:
        raise UserError(f"params.yaml: {key} = {str(root)!r}: holds both class folders and flat "
                        f"ILSVRC2012_val_*.JPEG files; {expected}, not both")
    if flat:
        return flat_val_by_wnid(profile, root, flat, labels)
    if labels is not None and folders:
        print(f"{spec.name}: class-folder layout; profiles.{profile}.data.val_labels is not used")
    if not folders:
        raise UserError(f"params.yaml: {key} = {str(root)!r}: no class folders with images; {expected}")
    by_wnid: dict[str, list[Path]] = {}
    for folder, files in folders.items():
        wnid = layout.folder_wnid(folder)
        if wnid is None:
            raise UserError(f"params.yaml: {key} = {str(root)!r}: class folder {folder!r} does not fit "
                            f"the layout; {expected}")
        by_wnid[wnid] = files
    return by_wnid


def validate(params) -> dict[str, dict[str, list[Path]]]:
    """Scan every configured test set up front, so a bad root fails before any work."""
    return {name: scan_test_set(params.profile, TEST_SETS[name], root,
                                _val_labels(params) if LAYOUTS[TEST_SETS[name].layout].flat else None)
            for name, root in configured_roots(params).items() if root is not None}


def _val_labels(params) -> Path | None:
    """data.val_labels, the devkit labelling a flat ILSVRC-2012 val folder; None: looked for beside it."""
    labels = params.data.val_labels
    if labels is not None and not labels.exists():
        key = f"profiles.{params.profile}.data.val_labels"
        raise UserError(f"params.yaml: {key} = {str(labels)!r}: no such file or folder; expected "
                        f"{VAL_LABEL_FORMS}, or set {key}: '' to look for them beside the val folder")
    return labels


def scan_val(params) -> dict[str, list[Path]]:
    """{wnid: image paths} of ImageNet val (data.val, either layout; data.val_labels for the flat one)."""
    return scan_test_set(params.profile, TEST_SETS["val"], params.data.val, _val_labels(params))


# --------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class EvalPlan:
    """What to score: images with labels, and which model logits take part."""
    samples: list[tuple[Path, int]]   # image, index into `columns`
    columns: list[int]                # model logit indices in play, in model order
    classes: int                      # classes with at least one counted image


def plan(spec: TestSet, by_wnid: dict[str, list[Path]], model_wnids: list[str]) -> EvalPlan:
    """Keep the images of classes the model knows; for a set of a class subset (IN-R, IN-A) also
    narrow the logits to the classes it shares with the model."""
    in_set = subset_of(spec)
    if in_set is not None:
        columns = [i for i, w in enumerate(model_wnids) if w and w in in_set]
    else:
        columns = list(range(len(model_wnids)))
    label_of = {model_wnids[c]: pos for pos, c in enumerate(columns) if model_wnids[c]}
    samples = [(path, label_of[wnid]) for wnid, files in sorted(by_wnid.items()) if wnid in label_of
               for path in files]
    return EvalPlan(samples, columns, len({label for _, label in samples}))
