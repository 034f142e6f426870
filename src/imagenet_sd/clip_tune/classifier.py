"""He et al.'s classifier tuning from its inputs to its scores (module stage writes the outputs).

Checks every input before CLIP loads, encodes the synthetic shards' images once into the feature
cache (module features), builds the zero-shot head from the class names' CLIP texts, tunes it
(module tuning) and scores both heads on the test sets and zero-shot CLIP on the transfer
datasets (module scoring). Docs: docs/he2023.md#clip-classifier-tuning
"""
from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import torch

from imagenet_sd.clip_tune.features import (
    ImageTower,
    SyntheticSet,
    encode_images,
    encode_shards,
    encode_test_sets,
    features_folder,
    features_recipe,
    shard_file,
)
from imagenet_sd.clip_tune.scoring import monitor_of, score_head, transfer_zero_shot
from imagenet_sd.clip_tune.tuning import Monitor, logit_scale, train_head, zero_shot_head
from imagenet_sd.core.device import resolve
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.params import Params
from imagenet_sd.datasets import fewshot, imagenet_scan, kept, readers, transfer_sets
from imagenet_sd.datasets.shards import read_index
from imagenet_sd.models import clip_model
from imagenet_sd.prompts import clip_texts, prompts


def real_shots(params: Params, shots_path: Path, keys: list[str]) -> list[tuple[Path, int]]:
    """(path, label) of the K-shot images (shots.tsv of the few-shot stage, checked against `shots`)."""
    table = fewshot.load(shots_path, keys, params.shots)
    if params.shots and params.data.train is None:
        raise UserError(f"params.yaml: shots = {params.shots} needs profiles.{params.profile}.data.train, the "
                        "folder shots.tsv's paths are relative to; set it, or set shots: 0")
    return [(params.data.train / path, label) for label, key in enumerate(keys) for path in table.paths[key]]


def tune(params: Params, prompts_path: Path, shards_dir: Path, kept_dir: Path, shots_path: Path) -> dict:
    """The details reports/clip.json holds (stage.run writes them)."""
    cp, key = params.clip_classifier, f"profiles.{params.profile}.clip_classifier"
    # Everything that can be wrong is checked before the model loads.
    rows = prompts.read(prompts_path)
    keys = readers.class_keys(rows)
    ordered = sorted(rows, key=lambda r: r.index)
    index = read_index(shards_dir)
    readers.check_index_classes(index, keys, shards_dir)
    kept_set = kept.read(kept_dir, shards_dir)
    shots = real_shots(params, shots_path, keys)
    scanned = imagenet_scan.validate(params)
    datasets, transfer_skipped = transfer_sets.validate(params)
    device = resolve(cp.device, f"{key}.device")
    fingerprint = clip_model.weights(cp.model, f"{key}.model")

    clip = clip_model.load(cp.model, f"{key}.model", device)
    tower = ImageTower(clip).eval()
    folder = features_folder(params, features_recipe(cp.model, fingerprint, clip.processor, device))
    (folder / "shards").mkdir(exist_ok=True)
    done = {entry.name for entry in (folder / "shards").iterdir()}        # one listing, at any scale
    todo = [e for e in index["shards"] if shard_file(folder, e).name not in done]
    print(f"clip-tune: {len(index['shards']) - len(todo)} of {len(index['shards'])} shards' features already in "
          f"{folder}; {len(todo)} to encode", file=sys.stderr)
    encoded, undecodable, seconds = encode_shards(tower, clip.processor, keys, todo, shards_dir, folder, params,
                                                  device) if todo else (0, 0, 0.0)

    synthetic = SyntheticSet([shard_file(folder, e) for e in index["shards"]], index.get("holdout_per_class", 0),
                             kept_set)
    if not len(synthetic):
        raise UserError(f"{shards_dir}: no synthetic training image left (all held out, dropped by the filter or "
                        "undecodable); generate more (scale) or loosen the filter")
    real = None
    if shots:
        real_x, _ = encode_images(tower, clip.processor, shots, "shots", folder, params, device)
        real = (torch.from_numpy(real_x), torch.tensor([label for _, label in shots]))
    tests = encode_test_sets(scanned, [r.wnid for r in ordered], tower, clip.processor, folder, params, device)

    templates = clip_texts.templates(params.clip_templates, "tune")
    names = clip_texts.names(ordered, params.clip_class_names)
    head = zero_shot_head(clip_model.class_directions(clip, names, templates, device), logit_scale(clip))
    zero_shot = copy.deepcopy(head)
    monitors: dict[str, Monitor] = {}
    if synthetic.holdout is not None:
        monitors["holdout"] = (*synthetic.holdout, None)
    if "val" in tests:
        monitors["val"] = monitor_of(tests["val"])
    started = time.perf_counter()
    history = train_head(head, synthetic, real, params, device, monitors)
    training_seconds = time.perf_counter() - started
    transfer_scores = transfer_zero_shot(datasets, clip, tower, folder, params, device)
    for name in transfer_skipped:
        transfer_scores[name] = {"skipped": "root not configured ('')"}

    details = {
        "model": cp.model, "weights": fingerprint, "backbone": clip_model.backbone(cp.model, fingerprint),
        "class_names": params.clip_class_names, "templates": list(templates), "setting": "few-shot" if real
        else "zero-shot", "shots": params.shots, "train_images": len(synthetic), "real_images": len(shots),
        "holdout_images": len(synthetic.holdout[1]) if synthetic.holdout else 0, "classes": len(keys),
        "zero_shot": score_head(zero_shot, tests, device), "tuned": score_head(head, tests, device),
        "transfer_zero_shot": transfer_scores,
        "skipped_test_sets": imagenet_scan.skipped_test_sets(params, tests),
        "features": {"folder": str(folder), "encoded": encoded, "undecodable": undecodable,
                     "reused_shards": len(index["shards"]) - len(todo), "seconds": round(seconds, 2),
                     "images_per_second": round(encoded / seconds, 1) if encoded and seconds > 0 else None,
                     "test_sets_from_cache": sorted(n for n, t in tests.items() if t.cached)},
        "training": {"epochs": cp.epochs, "steps": cp.epochs * math.ceil(len(synthetic) / cp.batch_size),
                     "lr": cp.few_shot_lr if real else cp.lr, "seconds": round(training_seconds, 2),
                     "history": history},
    }
    print(summary_table(details))
    return details


def summary_table(details: dict) -> str:
    lines = [f"{'test set':<10} {'zero-shot':>9} {'tuned':>9}"]
    for name, m in details["zero_shot"].items():
        tuned = details["tuned"][name]["top1"]
        lines.append(f"{name:<10} {_pct(m['top1']):>9} {_pct(tuned):>9}")
    for name, m in details["transfer_zero_shot"].items():
        if isinstance(m, dict) and "top1" in m:
            lines.append(f"{name:<10} {_pct(m['top1']):>9} {'-':>9}   (transfer, zero-shot only)")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
