"""The filter registry (filter/registry.py): a filter is one module and one line there, and the stage,
sd-generate's over-generation and the report read the registry, not the names (docs/layout.md#a-dataset-filter)."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import embedded_raw, write_synthetic_shards
from imagenet_sd.core import params
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import kept
from imagenet_sd.datasets import plan as planning
from imagenet_sd.datasets.shards import read_index
from imagenet_sd.filter import base, registry
from imagenet_sd.prompts import prompts
from imagenet_sd.report import tables

KEYS = ["n00000001", "n00000002"]
TRAIN, HOLDOUT = 4, 1


def every_other(p: params.Params, prompts_path: Path, shards_dir: Path, out_dir: Path) -> dict:
    """A filter written in the test: each class keeps its held-out images and every other training image."""
    index = read_index(shards_dir)
    starts = kept.offsets(index)
    keep = np.ones(int(starts[-1]), dtype=bool)
    for c in range(len(index["classes"])):
        keep[starts[c] + HOLDOUT:starts[c + 1]:2] = False
    per_class = np.full(len(KEYS), TRAIN // 2)
    decision = base.Decision(keep, np.full(len(KEYS), TRAIN), per_class, per_class, np.zeros(len(KEYS), int), {}, 0)
    kept.write(out_dir, shards_dir, keep, {"filter": "every_other"})
    return {"filter": "every_other", **base.summary(index, decision)}


EVERY_OTHER = base.Filter(name="every_other", run=every_other, device=None,
                          protocol=lambda run_params: ["every other image kept"])


@pytest.fixture
def shards_dir(tmp_path) -> Path:
    rows = [prompts.ClassPrompt(wnid=k, index=i, c=k, h_c="", d_c="", prompt=k) for i, k in enumerate(KEYS)]
    prompts.write(tmp_path / "prompts.tsv", rows)
    write_synthetic_shards(tmp_path / "shards", rows, TRAIN, HOLDOUT, per_shard=TRAIN + HOLDOUT)
    return tmp_path / "shards"


def with_filter(name: str) -> params.Params:
    return params.parse({**embedded_raw(), "filter": name})


def test_a_registered_filter_runs_through_the_stage_and_is_read_everywhere(tmp_path, shards_dir, monkeypatch):
    monkeypatch.setitem(registry.FILTERS, EVERY_OTHER.name, EVERY_OTHER)
    p = with_filter("every_other")
    details = registry.run(p, tmp_path / "prompts.tsv", shards_dir, tmp_path / "filtered", tmp_path / "filter.json")
    assert json.loads((tmp_path / "filter.json").read_text()) == {k: details[k] for k in base.HEADLINE}
    assert (details["kept"], details["dropped"], details["min_per_class"]) == (len(KEYS) * TRAIN // 2, len(KEYS) * TRAIN // 2, 2)
    kept_set = kept.read(tmp_path / "filtered", shards_dir)
    assert [kept_set.keeps(0, i) for i in range(HOLDOUT + TRAIN)] == [True, False, True, False, True]
    # sd-generate over-generates for it (every filter but none), and the report says what it did.
    assert planning.overgenerate_for(p) == p.filtering.overgenerate > 0
    assert planning.overgenerate_for(with_filter("none")) == 0
    assert "every other image kept" in tables.protocol(yaml.safe_load(yaml.safe_dump({**embedded_raw(), "filter": "every_other"})))


def test_filter_none_is_a_module_too(tmp_path, shards_dir):
    details = registry.run(with_filter("none"), tmp_path / "prompts.tsv", shards_dir, tmp_path / "filtered",
                           tmp_path / "filter.json")
    assert details["filter"] == "none" and details["kept"] == len(KEYS) * TRAIN and details["dropped"] == 0
    assert kept.read(tmp_path / "filtered", shards_dir) is None


def test_an_unregistered_filter_is_one_line_naming_the_registered_ones():
    p = with_filter("clpi")              # params cannot see the filters (layers): the stage checks the name
    with pytest.raises(UserError) as error:
        registry.chosen(p)
    message = str(error.value)
    assert "\n" not in message and "filter = 'clpi'" in message and " | ".join(registry.FILTERS) in message
    with pytest.raises(UserError, match="filter = ''"):
        with_filter(" ")


def test_filter_random_keeps_each_classs_target_at_random_and_the_held_out_images(tmp_path):
    """The CLIP filter's control: over-generated shards, the target a class kept, drawn by the seed."""
    rows = [prompts.ClassPrompt(wnid=k, index=i, c=k, h_c="", d_c="", prompt=k) for i, k in enumerate(KEYS)]
    prompts.write(tmp_path / "prompts.tsv", rows)
    write_synthetic_shards(tmp_path / "shards", rows, 8, HOLDOUT, per_shard=3, targets=TRAIN)

    def kept_by(seed: int, out: str) -> list[list[bool]]:
        details = registry.run(params.parse({**embedded_raw(), "filter": "random", "seed": seed}),
                               tmp_path / "prompts.tsv", tmp_path / "shards", tmp_path / out, tmp_path / f"{out}.json")
        assert (details["filter"], details["kept"], details["dropped"]) == ("random", len(KEYS) * TRAIN, len(KEYS) * 4)
        assert details["min_per_class"] == details["max_per_class"] == TRAIN and details["pass_rate"] == 1.0
        kept_set = kept.read(tmp_path / out, tmp_path / "shards")
        return [[kept_set.keeps(c, i) for i in range(HOLDOUT + 8)] for c in range(len(KEYS))]

    first, again, other = kept_by(0, "a"), kept_by(0, "b"), kept_by(1, "c")
    assert first == again and first != other                 # the seed decides the draw, nothing else
    assert all(row[:HOLDOUT] == [True] * HOLDOUT for row in first)
    assert first[0] != first[1]                                # each class draws its own subset
    assert "random filter keeps per_class, over-generates 0.25" in tables.protocol({**embedded_raw(), "filter": "random"})
