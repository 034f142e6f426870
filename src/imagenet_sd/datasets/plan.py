"""Which image goes where: per-class counts, and the shards they fill, computed lazily.

How many images: images per class = round(real images of the class x `scale`),
at least 1 (the paper keeps ImageNet's class sizes), plus `train.holdout_per_class`
held-out images (indices 0 .. holdout-1) that training never sees, so that it trains on
exactly the real counts x scale. Real counts come from the
configured real train folder, listed once and then cached by the folder's
listing signature (`real_counts`); without one (and for free-form classes) every
class counts as 1300, ImageNet-1k's largest and most common class size.

Which image: every (class, image index) has its own seed,
`seeds.derive(seed, "image", class key, index)`. Its key in the shards is
`<label>_<index>` (`shards.sample_key`): numbers only, so any class name of any
length or script is stored safely. With real guidance (`init_strength` > 0) it also starts
from its class's real shot `index mod K` (`init_for`; module fewshot). With prompt le its
prompt is its class's sentence `index` (`prompt_for`; module language).

Shard layout: with b = images_per_shard // classes, shard k holds image indices
[k*b, (k+1)*b) of every class that has them, in an order shuffled from (seed, k)
so that a shard read front to back is a random mix of classes. Shard k is
therefore a function of k and the per-class counts alone: nothing here holds an
object per image, and a 64M-image plan costs what its counts array costs. Shard k
holds the same images at every `scale` that gives every class at least (k+1)*b
images; its content tag (`Shard.tag`) is "full" then, and otherwise a hash of its
per-class counts, so the partial shards of two scales never share a file name.
Every start of sd-generate names every shard (`generation.unfinished`), 65,000 of them at 64M
images: a full shard is known in O(1), and the others' tags are computed a block of shards at a
time in one vectorised pass (`Layout.tag`), never a numpy pass over the classes per shard
(tests/test_plan_names.py pins the names: they are work-folder keys).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from imagenet_sd.core import seeds
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import write_json
from imagenet_sd.core.locks import locked
from imagenet_sd.core.params import Params, require_dir
from imagenet_sd.datasets import kept, shards
from imagenet_sd.prompts import backgrounds
from imagenet_sd.prompts.prompts import BACKGROUND_SLOT, SENTENCE_SLOT, ClassPrompt

FALLBACK_REAL_COUNT = 1300      # ImageNet-1k's largest (and most common) class size
FULL = "full"                   # content tag of a shard that holds b images of every class


@dataclass(frozen=True, slots=True)
class Item:
    """One image to generate."""
    cls: ClassPrompt
    image_index: int
    prompt: str
    init: str | None = None     # real guidance: the real image it starts from, relative to data.train
    split: str = "train"        # one of SPLITS: what the dataset uses it for (in its record)

    @property
    def key(self) -> str:
        return shards.sample_key(self.cls.index, self.image_index)

    def seed(self, global_seed: int, attempt: int = 0) -> int:
        if attempt == 0:
            return seeds.derive(global_seed, "image", self.cls.key, self.image_index)
        return seeds.derive(global_seed, "image", self.cls.key, self.image_index, "attempt", attempt)


# --------------------------------------------------------------------------- how many

def listing_signature(root: Path) -> tuple[str, list[os.DirEntry]]:
    """A hash of the class folders' names and mtimes: it changes when a file is added, removed
    or renamed in any of them, without listing the files themselves."""
    entries = sorted((e for e in os.scandir(root) if e.is_dir()), key=lambda e: e.name)
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(f"{entry.name}\0{entry.stat().st_mtime_ns}\n".encode())
    return digest.hexdigest(), entries


def _count_files(folder: str) -> int:
    from imagenet_sd.datasets.readers import IMAGE_EXTENSIONS
    return sum(1 for e in os.scandir(folder) if e.name.endswith(IMAGE_EXTENSIONS) and e.is_file())


def listed_counts(root: Path, cache_dir: Path | None) -> dict[str, int]:
    """{class folder: images in it} of a real train folder, from the cache when its signature matches.

    ImageNet's train folder is 1.28M files: listing them costs seconds to minutes on a
    network file system, and every run of every process would pay it. The cache is
    one JSON per folder in `cache_dir`, written under a lock.
    """
    signature, entries = listing_signature(root)
    cache = None
    if cache_dir is not None:
        name = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        cache = cache_dir / "real-counts" / f"{name}.json"
        try:
            cached = json.loads(cache.read_text())
            if cached.get("signature") == signature:
                return cached["counts"]
        except (OSError, ValueError, AttributeError):
            pass
    counts = {e.name: n for e in entries if (n := _count_files(e.path))}
    if cache is not None:
        # A cache that cannot be written only costs the next run a listing; an unwritable
        # work folder is reported by the stage itself, naming its param.
        with contextlib.suppress(OSError), locked(cache):
            write_json(cache, {"root": str(root.resolve()), "signature": signature, "counts": counts})
    return counts


def real_counts(rows: list[ClassPrompt], train_root: Path | None, profile: str,
                cache_dir: Path | None = None, estimate: bool = False) -> dict[str, int]:
    """Real images per class key: from the real train folder, or the fallback (see module doc).
    `estimate` (a dry run, e.g. on a login node that does not mount the data): a train folder that is
    not there is said and counted as the fallback instead of stopping the estimate."""
    key = f"profiles.{profile}.data.train"
    if estimate and train_root is not None and not train_root.is_dir():
        print(f"note: could not check {key} = {str(train_root)!r} (no such folder here); the estimate counts "
              f"{FALLBACK_REAL_COUNT} real images per class (ImageNet's maximum)", file=sys.stderr)
        return {r.key: FALLBACK_REAL_COUNT for r in rows}
    if train_root is None:
        print(f"warning: {key} is not configured; counting {FALLBACK_REAL_COUNT} real images per class "
              "(ImageNet's maximum) for images per class = real x scale", file=sys.stderr)
        return {r.key: FALLBACK_REAL_COUNT for r in rows}
    found = listed_counts(require_dir(key, train_root), cache_dir)
    counts = {}
    for r in rows:
        if not r.wnid:
            counts[r.key] = FALLBACK_REAL_COUNT
        elif r.wnid in found:
            counts[r.key] = found[r.wnid]
        else:
            raise UserError(f"{key} = {str(train_root)!r} has no images of class {r.wnid} ({r.c.split(',')[0]}); "
                            f"add its folder {train_root / r.wnid} or set {key} to '' to use "
                            f"{FALLBACK_REAL_COUNT} per class")
    free_form = sum(1 for r in rows if not r.wnid)
    if free_form:
        print(f"warning: {free_form} free-form classes have no real folder; counting {FALLBACK_REAL_COUNT} "
              "real images for each", file=sys.stderr)
    return counts


def train_targets(real: dict[str, int], scale: float) -> dict[str, int]:
    """Training images a class: round(real x scale), at least 1 (what the paper trains on)."""
    # floor(x + 0.5), not round(): Python's round() sends halves to even (2.5 -> 2).
    return {k: max(1, math.floor(n * scale + 0.5)) for k, n in real.items()}


def overgenerated(target: int, overgenerate: float) -> int:
    """Images made beyond a class's `target` for a filter to choose among: ceil(target x overgenerate)."""
    # round() first: 0.1 x 30 is 3.0000000000000004 in floats, which ceil would make 4.
    return math.ceil(round(target * overgenerate, 9))


def images_per_class(real: dict[str, int], scale: float, holdout: int = 0, overgenerate: float = 0.0) -> dict[str, int]:
    """Images a class to make from the real counts (`train_targets`, then `made_from`)."""
    return made_from(train_targets(real, scale), holdout, overgenerate)


def made_from(targets: dict[str, int], holdout: int, overgenerate: float) -> dict[str, int]:
    """Images a class to make: its target, `overgenerate` x that more, and `holdout` more that
    training keeps out."""
    return {k: n + overgenerated(n, overgenerate) + holdout for k, n in targets.items()}


def overgenerate_for(params: Params) -> float:
    """`filter.overgenerate`, for every filter but `none`, which keeps every image: a filter that drops
    images chooses each class's target among these (filter/base.py's contract)."""
    return 0.0 if params.filter == kept.NONE else params.filtering.overgenerate


def targets_for(params: Params, rows: list[ClassPrompt], estimate: bool = False) -> dict[str, int]:
    """Training images a class, real x scale (the listing is cached in generate.work_dir); `estimate`:
    see real_counts."""
    real = real_counts(rows, params.data.train, params.profile, params.generate.work_dir, estimate)
    return train_targets(real, params.scale)


def counts_for(params: Params, rows: list[ClassPrompt], targets: dict[str, int] | None = None) -> dict[str, int]:
    """Images a class to make (sd-generate's, and the language-enhancement stage's one row an
    image): real x scale (`targets`, computed when not given), the filter's over-generation and
    the held-out ones. Image indices: 0 .. holdout-1 held out, then the training images;
    over-generated ones are indices beyond real x scale, so they are the images a larger `scale`
    would make (finished shards are reused)."""
    targets = targets_for(params, rows) if targets is None else targets
    return made_from(targets, params.train.holdout_per_class, overgenerate_for(params))


def init_for(shots: dict[str, tuple[str, ...]] | None, row: ClassPrompt, image_index: int) -> str | None:
    """Real guidance: image i of a class starts from its shot i mod K, so each of the K real images
    starts an equal share (+-1) of the class's images, as in He et al.'s code (800 / K images a shot)."""
    if shots is None:
        return None
    return shots[row.key][image_index % len(shots[row.key])]


def prompt_for(row: ClassPrompt, image_index: int, phrases: list[str],
               matched: dict[str, tuple[int, ...]] | None = None, sentences=None) -> str:
    """The prompt of one image; `matched` (prompt c_hc_bm): each class's scenes to draw b from, else all;
    `sentences` (prompt le, a language.Sentences): each image's sentence."""
    if SENTENCE_SLOT in row.prompt:
        return row.text(sentence=sentences.text(row, image_index))
    if BACKGROUND_SLOT not in row.prompt:
        return row.text()
    if matched is None:
        return row.text(phrases[backgrounds.scene_for(row.key, image_index, len(phrases))])
    return row.text(phrases[backgrounds.matched_scene_for(matched[row.key], row.key, image_index)])


# --------------------------------------------------------------------------- where

# Each image's use, written in its record: indices below train.holdout_per_class are held out, then
# come real x scale training images, then the filter's over-generated candidates (filter: clip).
SPLITS = ("holdout", "train", "overgenerated")


class Layout:
    """The shards of one dataset: shard k is derived from k and the per-class counts when asked for.

    `holdout` and `targets` (training images a class) decide each image's split (SPLITS); without
    `targets` every image from index `holdout` on is a training image.
    """

    def __init__(self, rows: list[ClassPrompt], counts: dict[str, int], phrases: list[str], per_class: int,
                 seed: int = 0, matched: dict[str, tuple[int, ...]] | None = None,
                 shots: dict[str, tuple[str, ...]] | None = None, sentences=None, holdout: int = 0,
                 targets: dict[str, int] | None = None):
        self.rows = sorted(rows, key=lambda r: r.index)          # logit order
        self.counts = np.array([counts[r.key] for r in self.rows], dtype=np.int64)
        self.phrases, self.per_class, self.seed = list(phrases), per_class, seed
        self.matched = matched          # prompt c_hc_bm: {class key: its matched scenes}; None: all scenes
        self.shots = shots              # real guidance: {class key: its K real images}; None: text-to-image
        self.sentences = sentences      # prompt le: language.Sentences, each image's sentence
        self.min_count = int(self.counts.min()) if len(self.counts) else 0
        self.holdout = holdout
        # the first index past each class's training images (its over-generated ones start there)
        self.train_end = self.counts if targets is None else np.array(
            [holdout + targets[r.key] for r in self.rows], dtype=np.int64)
        # shard k is full (b training images of every class) iff holdout <= k*b and (k+1)*b <= this
        self.full_below = min(self.min_count, int(self.train_end.min())) if len(self.rows) else 0
        # the counts sorted, and the sums of their first i: images of a shard in O(log classes)
        self.sorted_counts = np.sort(self.counts)
        self.sorted_sums = np.concatenate(([0], np.cumsum(self.sorted_counts)))
        self.tags: dict[int, list[str]] = {}        # block number: the tags of its shards (`tag`)

    def split(self, position: int, image_index: int) -> str:
        """The split of image `image_index` of the class at `position` (logit order)."""
        if image_index < self.holdout:
            return "holdout"
        return "train" if image_index < self.train_end[position] else "overgenerated"

    def all_train(self, k: int) -> bool:
        """Whether every image of shard k is a training image."""
        start, counts = k * self.per_class, self.class_counts(k)
        return self.holdout <= start and bool(np.all(self.train_end >= start + counts))

    @property
    def images(self) -> int:
        return int(self.counts.sum())

    def __len__(self) -> int:
        return math.ceil(int(self.counts.max(initial=0)) / self.per_class)

    def __getitem__(self, k: int) -> "Shard":
        if not 0 <= k < len(self):
            raise IndexError(k)
        return Shard(self, k)

    def __iter__(self):
        return (Shard(self, k) for k in range(len(self)))

    def class_counts(self, k: int) -> np.ndarray:
        """Images of each class (logit order) in shard k."""
        return np.clip(self.counts - k * self.per_class, 0, self.per_class)

    def shard_images(self, k: int) -> int:
        """sum(class_counts(k)), from the sorted counts: classes with at most k*b images give none,
        those with at least (k+1)*b give b, those between give their images past k*b."""
        b, classes = self.per_class, len(self.rows)
        if self.min_count >= (k + 1) * b:
            return b * classes
        start = k * b
        low = int(np.searchsorted(self.sorted_counts, start, side="right"))       # classes with <= start
        high = int(np.searchsorted(self.sorted_counts, start + b, side="left"))   # classes with < start + b
        between = int(self.sorted_sums[high] - self.sorted_sums[low]) - (high - low) * start
        return between + (classes - high) * b

    # --------------------------------------------------------------------- content tags (shard names)

    # Shards x classes that one block of `tag` computes at once (512 KiB of int64 a matrix).
    block_elements = 1 << 16

    def full(self, k: int) -> bool:
        """Whether shard k holds b training images of every class: its tag is FULL (O(1))."""
        return self.holdout <= k * self.per_class and (k + 1) * self.per_class <= self.full_below

    def tag(self, k: int) -> str:
        """Shard k's content tag (`Shard.tag`): FULL, or a hash of its per-class counts and, where it holds
        images outside training, of where the splits fall. The tags of the shards around k are computed
        together, a block at a time (`block_tags`), and kept: naming every shard of a plan costs a few
        vectorised passes over the (shards x classes) counts, not one numpy pass per shard."""
        if self.full(k):
            return FULL
        size = max(1, self.block_elements // max(1, len(self.rows)))
        block = k // size
        tags = self.tags.get(block)
        if tags is None:
            tags = self.tags[block] = self.block_tags(block * size, min(len(self), (block + 1) * size))
        return tags[k - block * size]

    def block_tags(self, first: int, stop: int) -> list[str]:
        """The tags of shards first .. stop-1. The bytes hashed are those the tag has always hashed
        (work-folder names of finished shards depend on them; tests/test_plan_names.py):
        class_counts(k) as little-endian int64, then, for a shard not all_train, the split bounds
        clip([holdout] x classes + train_end, k*b, (k+1)*b) likewise."""
        b, classes = self.per_class, len(self.rows)
        starts = np.arange(first, stop, dtype=np.int64) * b
        # class_counts(k), a row a shard
        counts = np.clip(self.counts[None, :] - starts[:, None], 0, b).astype("<i8", copy=False)
        train = (self.holdout <= starts) & np.all(self.train_end[None, :] >= starts[:, None] + counts, axis=1)
        full = train & (self.min_count >= starts + b)
        split = None
        if not train.all():
            holdouts = np.clip(np.int64(self.holdout), starts, starts + b)
            bounds = np.clip(self.train_end[None, :], starts[:, None], starts[:, None] + b)
            split = np.concatenate([counts, np.broadcast_to(holdouts[:, None], (len(starts), classes)), bounds],
                                   axis=1).astype("<i8", copy=False)
        tags = []
        for i in range(len(starts)):
            if full[i]:
                tags.append(FULL)
            elif train[i]:
                tags.append(hashlib.sha256(counts[i].tobytes()).hexdigest()[:10])
            else:
                tags.append(hashlib.sha256(split[i].tobytes()).hexdigest()[:10])
        return tags


class Shard:
    """Shard k of a layout. Cheap to make: its items are built only when read."""
    __slots__ = ("layout", "number", "__dict__")

    def __init__(self, layout: Layout, number: int):
        self.layout, self.number = layout, number

    @property
    def name(self) -> str:
        """Its name in the published dataset."""
        return shards.SHARD_PATTERN.format(self.number)

    @property
    def tag(self) -> str:
        """Its content tag (`Layout.tag`). Images outside training: their records say so, so where the splits
        fall is part of the contents."""
        return self.layout.tag(self.number)

    @property
    def file_name(self) -> str:
        """Its name in the work folder: the content tag keeps shard k of different scales apart."""
        return shards.work_name(self.number, self.tag)

    def __len__(self) -> int:
        return self.layout.shard_images(self.number)

    @cached_property
    def items(self) -> tuple[Item, ...]:
        lay, k, b = self.layout, self.number, self.layout.per_class
        items = [Item(cls=row, image_index=i, prompt=prompt_for(row, i, lay.phrases, lay.matched, lay.sentences),
                      init=init_for(lay.shots, row, i), split=lay.split(position, i))
                 for position, (row, n) in enumerate(zip(lay.rows, lay.class_counts(k)))
                 for i in range(k * b, k * b + int(n))]
        random.Random(seeds.derive(lay.seed, "shard order", k)).shuffle(items)
        return tuple(items)

    @property
    def keys(self) -> list[str]:
        return [it.key for it in self.items]

    def __repr__(self) -> str:
        return f"Shard({self.number}, {self.tag})"
