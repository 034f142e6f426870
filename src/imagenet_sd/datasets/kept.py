"""Which synthetic images train-resnet50 reads: the kept set the clip-filter stage writes.

Representation, chosen for 64M images (ImageNet-1K-SD at 50x):

- one bit per image, 1 = kept, in class-major order: image i of class c is bit
  `offsets[c] + i`, `offsets` being the running sum of index.json's per-class counts
  (held-out images included). Packed eight to a byte (`np.packbits`) it is 8 MB at 64M
  images, one numpy buffer that forked DataLoader workers share without copying (a
  Python set of keys costs ~100 bytes an entry, GBs at this scale, and is copied into
  each worker page by page as reference counts are touched). A lookup is an add, a
  shift and a mask, whatever the size;
- beside it, `kept.json`: what decided it (filter, rule, threshold, model), the sha256 of
  the index.json of the shards it was computed from (a kept set is refused for other
  shards), counts per class, and the dropped training images of each shard, so the
  loader knows an epoch's length without opening a tar.

`filter: none` writes kept.json alone, saying so: `read` returns None and nothing is
looked up. Held-out images (image index < holdout_per_class) are always kept: they are
the fixed yardstick `holdout_top1` measures every run with, so a filter must not change
them (the clip-filter stage still reports how many its rule would have dropped).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import replacing, write_json
from imagenet_sd.datasets import shards

KEPT_FILE = "kept.json"
BITS_FILE = "kept.npy"
NONE = "none"


def index_sha256(shards_dir: Path) -> str:
    """The identity of a published shard set: its index.json lists every shard's sha256."""
    return hashlib.sha256((shards_dir / shards.INDEX_FILE).read_bytes()).hexdigest()


def offsets(index: dict) -> np.ndarray:
    """Bit of image 0 of each class, plus the total at the end (class-major, index.json's class order)."""
    counts = np.array([index["counts"][key] for key in index["classes"]], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(counts)])


@dataclass
class KeptSet:
    """The kept images of one shard set, answering `keeps(label, image_index)` in constant time."""
    offsets: np.ndarray          # int64, classes + 1
    bits: np.ndarray             # uint8, packed, big-endian bit order (np.packbits' default)
    dropped_per_shard: dict[str, int]   # training images left out, by shard file name

    def keeps(self, label: int, image_index: int) -> bool:
        position = int(self.offsets[label]) + image_index
        if image_index < 0 or position >= self.offsets[label + 1]:
            return True          # not an image of the index: the loader's own checks decide about it
        return bool(self.bits[position >> 3] & (0x80 >> (position & 7)))

    def keeps_all(self, labels: np.ndarray, image_indices: np.ndarray) -> np.ndarray:
        """`keeps` of many images at once (bool, one an image), for readers of whole shards."""
        labels, image_indices = labels.astype(np.int64), image_indices.astype(np.int64)
        positions = self.offsets[labels] + image_indices
        inside = (image_indices >= 0) & (positions < self.offsets[labels + 1])
        positions = np.where(inside, positions, 0)
        bit = (self.bits[positions >> 3] >> (7 - (positions & 7))) & 1
        return ~inside | bit.astype(bool)

    def dropped_in(self, shard_file: str) -> int:
        return self.dropped_per_shard.get(shard_file, 0)


def write_everything(folder: Path, shards_dir: Path) -> dict:
    """kept.json of `filter: none`: every image kept, no bitmap."""
    meta = {"filter": NONE, "index_sha256": index_sha256(shards_dir)}
    _replace(folder, meta, None)
    return meta


def write(folder: Path, shards_dir: Path, kept: np.ndarray, meta: dict) -> dict:
    """kept.json (with `meta`: rule, counts, dropped per shard, ...) and the packed bitmap of `kept` (bool, one an image)."""
    bits = np.packbits(kept.astype(bool))
    meta = {**meta, "index_sha256": index_sha256(shards_dir), "images": int(len(kept)),
            "bits_sha256": hashlib.sha256(bits.tobytes()).hexdigest()}
    _replace(folder, meta, bits)
    return meta


def _replace(folder: Path, meta: dict, bits: np.ndarray | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BITS_FILE).unlink(missing_ok=True)     # a stale bitmap must not outlive its kept.json
    if bits is not None:
        with replacing(folder / BITS_FILE) as tmp, open(tmp, "wb") as f:
            np.save(f, bits, allow_pickle=False)
    write_json(folder / KEPT_FILE, meta)


def read(folder: Path, shards_dir: Path) -> KeptSet | None:
    """The kept set of `folder` for the shards in `shards_dir`; None when everything is kept."""
    path = folder / KEPT_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}: missing or not valid JSON; run: dvc repro clip-filter") from None
    if meta.get("filter") == NONE:
        return None
    if meta.get("index_sha256") != index_sha256(shards_dir):
        raise UserError(f"{path} was computed for other shards than those in {shards_dir}; run: dvc repro clip-filter")
    try:
        bits = np.load(folder / BITS_FILE, allow_pickle=False)
    except (OSError, ValueError):
        raise UserError(f"{folder / BITS_FILE}: missing or damaged; run: dvc repro clip-filter") from None
    index = json.loads((shards_dir / shards.INDEX_FILE).read_text())
    starts = offsets(index)
    if bits.dtype != np.uint8 or len(bits) != (int(starts[-1]) + 7) // 8:
        raise UserError(f"{folder / BITS_FILE}: does not have one bit per image of {shards_dir}; "
                        "run: dvc repro clip-filter")
    return KeptSet(offsets=starts, bits=bits, dropped_per_shard=dict(meta.get("dropped_per_shard", {})))


def identity(folder: Path | None) -> str:
    """What the kept set is, for train-resnet50's state key (kept.json holds the bitmap's sha256);
    "none" for every image, with or without a kept.json saying so."""
    try:
        text = (folder / KEPT_FILE).read_text() if folder is not None else None
        everything = text is None or json.loads(text).get("filter") == NONE
    except (OSError, ValueError):
        return NONE          # read() refuses it before training starts
    return NONE if everything else hashlib.sha256(text.encode()).hexdigest()
