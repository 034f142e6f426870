"""Filter `none`: every synthetic image is kept. Its kept set is kept.json alone, saying so; no model
runs and sd-generate makes no image beyond real x scale for it (datasets.plan.overgenerate_for)."""
from __future__ import annotations

from pathlib import Path

from imagenet_sd.core.params import Params
from imagenet_sd.datasets import kept
from imagenet_sd.datasets.shards import read_index
from imagenet_sd.filter.base import Filter, summary


def run(params: Params, prompts_path: Path, shards_dir: Path, out_dir: Path) -> dict:
    kept.write_everything(out_dir, shards_dir)
    return {"filter": kept.NONE, **summary(read_index(shards_dir))}


FILTER = Filter(name=kept.NONE, run=run, device=None, protocol=lambda run_params: [])
