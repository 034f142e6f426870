"""Scoring heads: eval-imagenet's test sets (its plans and tallies) and zero-shot CLIP on the
transfer datasets, over their own class names."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imagenet_sd.clip_tune.features import ImageTower, TestFeatures, encode_images
from imagenet_sd.clip_tune.tuning import EVAL_CHUNK, Monitor
from imagenet_sd.core.params import Params
from imagenet_sd.datasets import inference, transfer_sets
from imagenet_sd.models import clip_model, probes
from imagenet_sd.models.clip_model import Clip

# He et al.'s template of each transfer dataset (transfer_ds_template.py), by this project's dataset names.
TRANSFER_TEMPLATES = {
    "aircraft": ("a photo of a {}, a type of aircraft.",),
    "cars": ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
             "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}."),
    "dtd": ("{} texture.",),
    "eurosat": ("a centered satellite photo of {}.",),
    "flowers": ("a photo of a {}, a type of flower.",),
    "food": ("a photo of a {}, a type of food.",),
    "pets": ("a photo of a {}, a type of pet.",),
    "sun397": ("a photo of a {}.", "a photo of the {}."),
}
PLAIN_TEMPLATES = ("a photo of a {}.",)          # any other dataset (a folder of class folders)
# Datasets whose classes have no names to write a text from (torchvision lists iNaturalist's 2018
# and 2019 categories as numbered folders).
UNNAMED = ("inat2018", "inat2019")


@torch.no_grad()
def score_head(head: nn.Linear, tests: dict[str, TestFeatures], device: torch.device) -> dict[str, dict]:
    """eval-imagenet's scores (inference.tally) of the head on every test set."""
    head.to(device).eval()

    def batches(test: TestFeatures):
        labels = torch.tensor([label for _, label in test.plan.samples])
        for start in range(0, len(labels), EVAL_CHUNK):
            yield head(test.features[start:start + EVAL_CHUNK].to(device)).cpu(), labels[start:start + EVAL_CHUNK]
    scores = {name: inference.tally(batches(test), test.plan) for name, test in tests.items()}
    for one in scores.values():
        one.pop("column_top1")          # per class: eval-imagenet's details only
    return scores


def monitor_of(test: TestFeatures) -> Monitor:
    return test.features, torch.tensor([label for _, label in test.plan.samples]), torch.tensor(test.plan.columns)


def readable(name: str) -> str:
    """A class folder or label as words: "apple_pie" -> "apple pie", "AnnualCrop" -> "Annual Crop"."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name.replace("_", " ")).strip()


def transfer_zero_shot(datasets: dict[str, transfer_sets.TransferSet], clip: Clip,
                       tower: ImageTower, folder: Path, params: Params, device: torch.device) -> dict:
    """Zero-shot CLIP on each transfer dataset's test split, over its own class names. A head tuned on
    the synthetic images' classes does not apply to another label space, so there is no tuned row."""
    results = {}
    for name, dataset in datasets.items():
        if name in UNNAMED:
            results[name] = {"skipped": "its classes are numbered folders, with no names to write a text from"}
            continue
        test = dataset.splits["test"]
        templates = TRANSFER_TEMPLATES.get(name, PLAIN_TEMPLATES)
        directions = clip_model.class_directions(clip, [readable(c) for c in test.classes], templates, device)
        features, _ = encode_images(tower, clip.processor, test.samples, f"transfer-{name}", folder, params, device)
        predicted = (torch.from_numpy(features) @ directions.T).argmax(dim=1).numpy()
        top1_, per_class = probes.accuracies(predicted, np.array([y for _, y in test.samples]))
        results[name] = {"top1": round(top1_, 2), "mean_per_class": round(per_class, 2),
                         "classes": len(test.classes), "test_images": len(test.samples), "templates": list(templates)}
    scored = [m["top1"] for m in results.values() if "top1" in m]
    results["average_top1"] = round(float(np.mean(scored)), 2) if scored else None
    return results
