"""What every dataset filter declares and shares: the `Filter` a filter module exports as `FILTER`,
the `Decision` it makes, each class's target and the summary the clip-filter stage reports.

A filter reads the published shards (data/synthetic, index.json) and writes the kept set
(module datasets.kept) that train-resnet50 reads. Its contract (docs/layout.md#a-dataset-filter):

- held-out images are always kept (they are the yardstick `holdout_top1` measures every run with);
- each class keeps at most its target (`targets`: index.json's `train_targets` when sd-generate
  over-generated, else every training image). sd-generate over-generates `filter.overgenerate`
  for every filter but `none` (datasets.plan.overgenerate_for), so a filter that drops images can
  still keep real x scale a class;
- its details hold `summary`'s keys (the stage's metrics come from them) and `filter`, its name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from imagenet_sd.core import seeds
from imagenet_sd.core.params import Params
from imagenet_sd.datasets import kept


@dataclass(frozen=True)
class Filter:
    """One filter, as its module declares it (`FILTER`) and filter/registry.py lists it."""
    name: str               # the value of params.yaml's `filter:`, and `filter` in its kept set and details
    # (params, prompt table, shards folder, kept-set folder) -> details: `summary`'s keys and its own.
    run: Callable[[Params, Path, Path, Path], dict]
    # Where it computes, from params (a device param's value): with `launcher: slurm` the stage submits
    # a one-GPU job unless it says cpu. None: no model, it runs where DVC runs it.
    device: Callable[[Params], str] | None
    # What of a run's params.yaml (as loaded, a dict) moves its numbers: the report's protocol parts.
    protocol: Callable[[dict], list[str]]


@dataclass
class Decision:
    keep: np.ndarray                 # bool, one an image, class-major (kept.offsets)
    scored_per_class: np.ndarray     # training candidates a class (its target and the over-generated ones)
    passed_per_class: np.ndarray     # of them, those the rule passes
    kept_per_class: np.ndarray       # of them, those kept
    topped_up_per_class: np.ndarray  # of the kept, failing ones (keep: per_class, when too few pass)
    dropped_per_shard: dict[str, int]
    holdout_would_drop: int          # held-out images the rule fails (they are kept all the same)


def targets(index: dict) -> np.ndarray:
    """Training images a class to keep: index.json's `train_targets` (when sd-generate over-generated),
    else every training image of the class."""
    holdout = index.get("holdout_per_class", 0)
    wanted = index.get("train_targets") or {key: max(0, n - holdout) for key, n in index["counts"].items()}
    return np.array([wanted[key] for key in index["classes"]], dtype=np.int64)


HEADLINE = ("kept", "dropped", "pass_rate", "min_pass_rate", "classes_topped_up", "min_per_class")   # metrics/filter.json


def summary(index: dict, decision: Decision | None = None) -> dict:
    """Kept training images per class and in all (held-out images are not training images);
    without a decision (filter: none), every image."""
    holdout = index.get("holdout_per_class", 0)
    train = np.array([max(0, index["counts"][key] - holdout) for key in index["classes"]], dtype=np.int64)
    if decision is None:
        scored = passed = kept_ = train
        topped_up = np.zeros_like(train)
    else:
        scored, passed, kept_ = decision.scored_per_class, decision.passed_per_class, decision.kept_per_class
        topped_up = decision.topped_up_per_class
    rates = passed / np.maximum(scored, 1)
    empty = [key for key, n in zip(index["classes"], kept_.tolist()) if n == 0]
    total = int(scored.sum())
    return {"candidates": total, "targets": int(targets(index).sum()), "kept": int(kept_.sum()),
            "dropped": total - int(kept_.sum()), "passed": int(passed.sum()),
            "kept_fraction": round(float(kept_.sum()) / total, 4) if total else 1.0,
            "pass_rate": round(float(passed.sum()) / total, 4) if total else 1.0,
            "min_pass_rate": round(float(rates.min()), 4) if len(rates) else 1.0,
            "classes_topped_up": int((topped_up > 0).sum()), "failing_kept": int(topped_up.sum()),
            "min_per_class": int(kept_.min()) if len(kept_) else 0,
            "max_per_class": int(kept_.max()) if len(kept_) else 0,
            "empty_classes": len(empty), "empty_class_keys": empty[:20],
            "holdout_images": int(sum(min(index["counts"][k], holdout) for k in index["classes"])),
            "per_class": dict(zip(index["classes"], kept_.tolist())),
            "pass_rate_per_class": dict(zip(index["classes"], np.round(rates, 4).tolist()))}


def choose(index: dict, ok: np.ndarray, confidence: np.ndarray, keep: str, seed: int, draw: str) -> Decision:
    """Each class's kept images, from a pass bit and a confidence an image (class-major, kept.offsets).

    Held-out images are always kept. Each class keeps its target (`targets`) out of its training
    images: when more pass, a random target's worth of the passing ones (the lowest `seeds.ranks`
    under the seed, the filter's name of its draw `draw` and the class, so the choice depends neither on the order of shards nor on the
    pool's size); when fewer pass, every passing one and, with `keep: per_class`, the most confident
    failing ones (then the lower image index) up to the target, as He et al.'s selection.
    """
    starts = kept.offsets(index)
    counts = np.diff(starts)
    holdout, total = index.get("holdout_per_class", 0), int(starts[-1])
    wanted = targets(index)
    per_shard = index["images_per_class_per_shard"]
    chosen = np.zeros(total, dtype=bool)
    stats = np.zeros((4, len(counts)), dtype=np.int64)          # scored, passed, kept, topped up
    dropped_per_shard = np.zeros(len(index["shards"]), dtype=np.int64)
    holdout_would_drop = 0
    for c, key in enumerate(index["classes"]):
        first, held = int(starts[c]), min(holdout, int(counts[c]))
        holdout_would_drop += int((~ok[first:first + held]).sum())
        chosen[first:first + held] = True        # held-out images are never filtered (module kept)
        candidates = np.arange(first + held, int(starts[c + 1]))
        passing = candidates[ok[candidates]]
        n = int(wanted[c])
        if len(passing) > n:
            take = passing[np.argsort(seeds.ranks(seeds.derive(seed, draw, key), passing - first),
                                      kind="stable")[:n]]
        elif len(passing) < n and keep == "per_class":
            failing = candidates[~ok[candidates]]
            order = np.argsort(-confidence[failing], kind="stable")     # ties: lower image index first
            take = np.concatenate([passing, failing[order[:n - len(passing)]]])
        else:
            take = passing
        chosen[take] = True
        left_out = candidates[~chosen[candidates]] - first
        dropped_per_shard += np.bincount(left_out // per_shard, minlength=len(dropped_per_shard))
        stats[:, c] = len(candidates), len(passing), len(take), int((~ok[take]).sum())
    return Decision(chosen, *stats, {entry["file"]: int(n) for entry, n in zip(index["shards"], dropped_per_shard) if n},
                    holdout_would_drop)
