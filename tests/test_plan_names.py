"""Shard names of the plan: work-folder keys of users' finished shards (GPU-hours), so they never change.

`old_names` below is a frozen copy of the code that named shards until issue 32 (plan.py's `Shard.tag`,
`Layout.class_counts`, `all_train` and `shard_images` as they were at 2026-12-07), kept here only to
compare against: the plan computes the same names in a vectorised pass now, and must give exactly
these. LITERAL pins a few names as written by that code, in case both ever drift together.
"""
import hashlib
import math
import random

import numpy as np
import pytest

from imagenet_sd.datasets import plan as planning
from imagenet_sd.datasets import shards
from imagenet_sd.prompts.prompts import ClassPrompt


def rows(n: int, shuffled: bool = False) -> list[ClassPrompt]:
    out = [ClassPrompt(wnid=f"n{i:08d}", index=i, c=f"class {i}", h_c="", d_c="", prompt="{c}") for i in range(n)]
    if shuffled:
        random.Random(n).shuffle(out)           # the layout sorts them into logit order
    return out


def old_names(rows_, counts: dict[str, int], per_class: int, holdout: int = 0,
              targets: dict[str, int] | None = None) -> list[tuple[str, int, bool]]:
    """(work file name, images, all_train) of every shard, by the code before issue 32."""
    ordered = sorted(rows_, key=lambda r: r.index)
    n = np.array([counts[r.key] for r in ordered], dtype=np.int64)
    train_end = n if targets is None else np.array([holdout + targets[r.key] for r in ordered], dtype=np.int64)
    min_count = int(n.min()) if len(n) else 0

    def class_counts(k):
        return np.clip(n - k * per_class, 0, per_class)

    def all_train(k):
        start, c = k * per_class, class_counts(k)
        return holdout <= start and bool(np.all(train_end >= start + c))

    def tag(k):
        if all_train(k):
            if min_count >= (k + 1) * per_class:
                return planning.FULL
            return hashlib.sha256(class_counts(k).astype("<i8").tobytes()).hexdigest()[:10]
        start, end = k * per_class, (k + 1) * per_class
        bounds = np.clip(np.array([holdout] * len(ordered) + list(train_end), dtype=np.int64), start, end)
        return hashlib.sha256(class_counts(k).astype("<i8").tobytes() + bounds.astype("<i8").tobytes()
                              ).hexdigest()[:10]

    def images(k):
        if min_count >= (k + 1) * per_class:
            return per_class * len(ordered)
        return int(class_counts(k).sum())

    shards_ = math.ceil(int(n.max(initial=0)) / per_class)
    return [(shards.work_name(k, tag(k)), images(k), all_train(k)) for k in range(shards_)]


def new_names(layout: planning.Layout, order=None) -> list[tuple[str, int, bool]]:
    ks = list(range(len(layout))) if order is None else order
    got = {k: (layout[k].file_name, len(layout[k]), layout.all_train(k)) for k in ks}
    return [got[k] for k in range(len(layout))]


def shapes():
    """(name, rows, counts, per_class, holdout, targets) of plans of several shapes."""
    r3 = rows(3)
    keys3 = [r.key for r in r3]
    yield "uneven, one class over several shards", r3, dict(zip(keys3, [3, 7, 1])), 2, 0, None
    yield "one image a class a shard", r3, dict(zip(keys3, [5, 2, 4])), 1, 0, None
    yield "every shard full", r3, dict.fromkeys(keys3, 6), 3, 0, None
    many = rows(60, shuffled=True)
    rng = random.Random(1)
    yield "many classes a shard", many, {r.key: rng.randint(1, 25) for r in many}, 4, 0, None
    # holdout and over-generation, as sd-generate counts them (plan.counts_for)
    targets = {r.key: rng.randint(1, 12) for r in many}
    yield "holdout + overgenerate", many, planning.made_from(targets, 2, 0.5), 3, 2, targets
    yield "holdout, no over-generation", many, planning.made_from(targets, 3, 0.0), 2, 3, targets
    yield "over-generation, no holdout", many, planning.made_from(targets, 0, 1.5), 5, 0, targets
    yield "holdout without targets", r3, dict(zip(keys3, [9, 4, 6])), 2, 1, None
    # ImageNet's shape in miniature: most classes at the largest size, a tail below (rehearse_scale.py)
    inet = rows(100)
    yield "ImageNet-shaped", inet, {r.key: (13 if i % 3 else 7 + i % 6) for i, r in enumerate(inet)}, 1, 0, None
    for seed in range(25):          # random plans
        rng = random.Random(100 + seed)
        rs = rows(rng.randint(1, 30), shuffled=True)
        holdout, over = rng.choice([0, 0, 1, 2, 5]), rng.choice([0.0, 0.25, 1.5])
        targets = {r.key: rng.randint(1, 20) for r in rs}
        counts = planning.made_from(targets, holdout, over)
        yield f"random {seed}", rs, counts, rng.randint(1, 6), holdout, rng.choice([targets, None])


SHAPES = list(shapes())


@pytest.mark.parametrize("block", [None, 1, 7, 150])
def test_shard_names_are_those_of_the_code_before_issue_32(monkeypatch, block):
    """Every shard's work name, image count and split summary equal the old code's, whichever order the
    shards are asked for in and wherever the blocks of shards fall (`block`: Layout.block_elements)."""
    if block is not None:
        monkeypatch.setattr(planning.Layout, "block_elements", block)
    for name, rs, counts, per_class, holdout, targets in SHAPES:
        layout = planning.Layout(rs, counts, [], per_class, holdout=holdout, targets=targets)
        expected = old_names(rs, counts, per_class, holdout, targets)
        assert new_names(layout) == expected, name
        again = planning.Layout(rs, counts, [], per_class, holdout=holdout, targets=targets)
        shuffled = random.Random(0).sample(range(len(again)), len(again))      # asked for out of order
        assert new_names(again, shuffled) == expected, name
        assert [s.file_name for s in again] == [n for n, _, _ in expected], name


# Names as the code before issue 32 wrote them: literals, so that the frozen copy above cannot drift.
LITERAL = {
    "uneven, one class over several shards": [
        "shard-000000.8b6d5f8b8d.tar", "shard-000001.663a9308e8.tar", "shard-000002.7ff9dbe79d.tar",
        "shard-000003.cbed07e094.tar"],
    "holdout + overgenerate": [
        "shard-000000.44fffc4b25.tar", "shard-000001.16fd1343c5.tar", "shard-000002.63685edc1d.tar",
        "shard-000003.4d94afb745.tar", "shard-000004.75b4228e56.tar", "shard-000005.0c6738452e.tar",
        "shard-000006.248996bc8e.tar"],
    "ImageNet-shaped": [f"shard-{k:06d}.full.tar" for k in range(7)] + [
        "shard-000007.7748eef703.tar", "shard-000008.a707313114.tar", "shard-000009.d27e30bfc9.tar",
        "shard-000010.5795072b26.tar", "shard-000011.093fd07aa4.tar", "shard-000012.f572015036.tar"],
}


@pytest.mark.parametrize("name", sorted(LITERAL))
def test_shard_names_are_pinned(name):
    _, rs, counts, per_class, holdout, targets = next(s for s in SHAPES if s[0] == name)
    layout = planning.Layout(rs, counts, [], per_class, holdout=holdout, targets=targets)
    assert [s.file_name for s in layout] == LITERAL[name]
