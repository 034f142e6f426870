"""The ImageNet-style test sets eval-imagenet (and clip-tune) score on: one entry each, the facts only.

Read by params (each set's root is `profiles.<profile>.data.<name>`), the evaluation (the folder
layout, the class subset), clip-tune and the report (the label, whether the paper has the column).
How a layout is scanned lives in datasets/imagenet_scan.py (`LAYOUTS`), keyed by `layout`; a class
subset's wnids are read by prompts/classes.py (`subset_wnids`) from data/classes/<classes>.
The name is a metrics key (metrics/imagenet.json, metrics/clip.json): never rename one.
Adding one: docs/layout.md#an-imagenet-style-test-set.
"""
from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("wnid", "index", "val")


@dataclass(frozen=True)
class TestSet:
    __test__ = False        # not a pytest test class, whatever its name
    name: str               # params key data.<name> and metrics key
    label: str              # the reports' name of it
    layout: str             # one of LAYOUTS: class folders named by wnid | by ImageNet-1K class index 0..999 |
                            # wnid folders or the flat ILSVRC-2012 val files labelled by the devkit
    classes: str = ""       # a subset of ImageNet-1K: its wnid list in data/classes/ (logits restricted to the
                            # classes shared with the model, as the standard 200-way IN-R/IN-A evaluation); '': all
    in_paper: bool = False  # a column of the paper's Table 1 (data/paper/table1.tsv: <name>_top1, <name>_top5)


TEST_SETS: dict[str, TestSet] = {t.name: t for t in (
    TestSet("val", "IN-Val", "val", in_paper=True),                       # ILSVRC-2012 validation
    TestSet("v2", "IN-v2", "index", in_paper=True),                       # ImageNetV2 matched-frequency
    TestSet("v2_threshold", "IN-v2 threshold-0.7", "index"),               # ImageNetV2 threshold-0.7
    TestSet("v2_top", "IN-v2 top-images", "index"),                       # ImageNetV2 top-images
    TestSet("sketch", "IN-Sketch", "wnid", in_paper=True),                # ImageNet-Sketch
    TestSet("r", "IN-R", "wnid", "imagenet_r.txt", in_paper=True),        # ImageNet-Rendition, 200 classes
    TestSet("a", "IN-A", "wnid", "imagenet_a.txt", in_paper=True),        # ImageNet-A (natural adversarial), 200
)}
