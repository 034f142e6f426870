"""Filter `random`: each class keeps its target count of training images drawn at random, with no
model: the control of the CLIP filter. sd-generate over-generates for it as for `clip`
(`filter.overgenerate`), so a run with `filter: random` trains on as many images a class, drawn
from as large a pool, as the same run with `filter: clip`; the difference between the two is what
CLIP's choice adds over dropping that many images blindly.

Held-out images are kept. The draw is `seeds.ranks` under the global seed and the class key, so it
depends neither on the order of the shards nor on the pool's size: a larger over-generation keeps a
superset's draw order, and another `seed` draws another subset.

Docs: docs/he2023.md#the-random-control
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from imagenet_sd.core import seeds
from imagenet_sd.core.params import Params
from imagenet_sd.datasets import kept
from imagenet_sd.datasets.shards import read_index
from imagenet_sd.filter.base import Decision, Filter, summary, targets

NAME = "random"


def decide(index: dict, seed: int) -> Decision:
    """Held-out images and a random target's worth of each class's training images; memory one bit an image."""
    starts = kept.offsets(index)
    counts = np.diff(starts)
    holdout, wanted = index.get("holdout_per_class", 0), targets(index)
    per_shard = index["images_per_class_per_shard"]
    chosen = np.zeros(int(starts[-1]), dtype=bool)
    stats = np.zeros((3, len(counts)), dtype=np.int64)          # candidates, kept, topped up (always 0)
    dropped_per_shard = np.zeros(len(index["shards"]), dtype=np.int64)
    for c, key in enumerate(index["classes"]):
        first, held = int(starts[c]), min(holdout, int(counts[c]))
        chosen[first:first + held] = True
        candidates = np.arange(first + held, int(starts[c + 1]))
        order = np.argsort(seeds.ranks(seeds.derive(seed, "random filter", key), candidates - first), kind="stable")
        take = candidates[order[:int(wanted[c])]]
        chosen[take] = True
        left_out = candidates[~chosen[candidates]] - first
        dropped_per_shard += np.bincount(left_out // per_shard, minlength=len(dropped_per_shard))
        stats[:2, c] = len(candidates), len(take)
    # Every candidate "passes" (there is no rule): the pass rate says so, the kept count is the target.
    return Decision(chosen, stats[0], stats[0], stats[1], stats[2],
                    {entry["file"]: int(n) for entry, n in zip(index["shards"], dropped_per_shard) if n}, 0)


def run(params: Params, prompts_path: Path, shards_dir: Path, out_dir: Path) -> dict:
    index = read_index(shards_dir)
    decision = decide(index, params.seed)
    totals = summary(index, decision)
    how = {"overgenerate": index.get("overgenerate", 0), "seed": params.seed}
    kept.write(out_dir, shards_dir, decision.keep, {
        "filter": NAME, **how, "holdout_per_class": index.get("holdout_per_class", 0), "kept": totals["kept"],
        "dropped": totals["dropped"], "dropped_per_shard": decision.dropped_per_shard})
    return {"filter": NAME, **how, **totals}


def protocol(run_params: dict) -> list[str]:
    block = (run_params.get("profiles") or {}).get(run_params.get("profile"), {}) or {}
    overgenerate = (block.get("filter") or {}).get("overgenerate", 0)
    return [f"random filter keeps per_class, over-generates {overgenerate:g}"]


FILTER = Filter(name=NAME, run=run, device=None, protocol=protocol)
