"""The dataset filters, by the name params.yaml's `filter:` gives them, and the clip-filter stage that runs one.

A filter is one module of this folder exporting `FILTER` (a base.Filter), listed once below.
params.yaml's `filter:` is checked against this list here, by `chosen`, not in core/params/:
params sits in the lowest layer and cannot import the filters (docs/layout.md#the-package-by-subpackage).
Adding one: docs/layout.md#a-dataset-filter.
"""
from __future__ import annotations

from pathlib import Path

from imagenet_sd.core.errors import param_error
from imagenet_sd.core.io import write_json
from imagenet_sd.core.params import Params
from imagenet_sd.filter import clip_filter, none, random_subset
from imagenet_sd.filter.base import HEADLINE, Filter

FILTERS: dict[str, Filter] = {f.name: f for f in (none.FILTER, clip_filter.FILTER, random_subset.FILTER)}


def chosen(params: Params) -> Filter:
    """The filter params.yaml names; UserError (one line) for a name no module registers."""
    if params.filter not in FILTERS:
        raise param_error("filter", params.filter, " | ".join(FILTERS))
    return FILTERS[params.filter]


def run(params: Params, prompts_path: Path, shards_dir: Path, out_dir: Path, metrics_path: Path,
        details_path: Path | None = None) -> dict:
    """The clip-filter stage: the chosen filter's kept set in `out_dir`, headline metrics and details.
    Returns the details."""
    details = chosen(params).run(params, prompts_path, shards_dir, out_dir)
    write_json(metrics_path, {k: details[k] for k in HEADLINE})
    if details_path is not None:
        write_json(details_path, details)
    return details
