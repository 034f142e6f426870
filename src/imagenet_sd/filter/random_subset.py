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

from imagenet_sd.core.params import Params
from imagenet_sd.datasets import kept
from imagenet_sd.datasets.shards import read_index
from imagenet_sd.filter.base import Decision, Filter, choose, summary

NAME = "random"


def decide(index: dict, seed: int) -> Decision:
    """Every training image passes and none is more confident than another: `base.choose` keeps each
    class's held-out images and a random target's worth of the rest. Memory: 5 bytes an image."""
    total = int(kept.offsets(index)[-1])
    return choose(index, np.ones(total, dtype=bool), np.zeros(total, dtype=np.float32), "per_class", seed,
                  "random filter")


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
