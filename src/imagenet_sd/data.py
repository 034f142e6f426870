"""Reading images: real image folders, and (in training) the synthetic shards."""
from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import random
import tarfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from . import seeds, shards
from .errors import UserError
from .prompts import ClassPrompt

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG", ".JPG", ".PNG")


def image_files(root: Path) -> dict[str, list[Path]]:
    """{class folder name: sorted image paths} for a folder of class folders.

    Covers ImageNet train/val (wnid folders), ImageNet-Sketch/R/A (wnid folders)
    and ImageNet-v2 (folders 0..999). Folders with no images are left out.
    """
    classes: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.suffix in IMAGE_EXTENSIONS and f.is_file())
        if files:
            classes[folder.name] = files
    return classes


# --------------------------------------------------------------------------- training sets
# Both training sets yield (transform(image), label), label being the logit index of the
# class in the prompt table, so that models trained on either have the same output layer.

def class_keys(rows: list[ClassPrompt]) -> list[str]:
    """Class keys in logit order, from the prompt table."""
    ordered = sorted(rows, key=lambda r: r.index)
    if [r.index for r in ordered] != list(range(len(ordered))):
        raise UserError("prompt table: class indices are not 0..N-1; regenerate it: dvc repro wordnet-prompts")
    return [r.key for r in ordered]


def _decode(jpeg: bytes) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def held_out(image_index, holdout_per_class: int) -> bool:
    """The first `holdout_per_class` images of every class are kept out of training.

    The first ones, because they stay the same when `scale` grows (generation reuses
    them) and sd-generate puts them in the first shards, so scoring them reads few.
    """
    return isinstance(image_index, int) and image_index < holdout_per_class


def _member_index(name: str) -> tuple[str, int | None]:
    """(label part, image index) of a member named `<label>_<index>.jpg` (see shards.sample_key)."""
    stem = name.rsplit(".", 1)[0]
    cls, _, index = stem.rpartition("_")
    return cls, int(index) if index.isdigit() else None


Counts = tuple[dict[Path, tuple[int, int]], Counter, Counter]   # per shard (train, held out); per class both


def count_samples(shard_paths: list[Path], holdout_per_class: int = 0) -> Counts:
    """Images of each shard and class, (training, held out), from the tar headers.

    For shard folders without index.json (hand-made ones); sd-generate's output is
    counted from its index instead (`index_counts`), without opening a shard.
    """
    per_shard, trained, held = {}, Counter(), Counter()
    for path in tqdm(shard_paths, desc="counting images", unit="shard", disable=len(shard_paths) < 50):
        train = holdout = 0
        try:
            with tarfile.open(path, "r") as tar:
                for name in tar.getnames():
                    if name.endswith(".jpg"):
                        cls, index = _member_index(name)
                        if held_out(index, holdout_per_class):
                            holdout, held[cls] = holdout + 1, held[cls] + 1
                        else:
                            train, trained[cls] = train + 1, trained[cls] + 1
        except (tarfile.TarError, OSError):
            raise UserError(f"{path}: not a readable tar shard; delete it and run: dvc repro sd-generate") from None
        per_shard[path] = train, holdout
    return per_shard, trained, held


def index_counts(index: dict, folder: Path, holdout_per_class: int = 0) -> Counts:
    """The same counts from sd-generate's index.json alone: shard k holds image indices
    [k*b, (k+1)*b) of every class that has them (plan.Layout), held out = index < holdout."""
    b = index["images_per_class_per_shard"]
    counts = np.array([index["counts"][key] for key in index["classes"]], dtype=np.int64)
    per_shard = {}
    for k, entry in enumerate(index["shards"]):
        in_shard = np.clip(counts - k * b, 0, b)
        holdout = int(np.clip(np.minimum(in_shard, holdout_per_class - k * b), 0, None).sum())
        per_shard[folder / entry["file"]] = int(in_shard.sum()) - holdout, holdout
    held = np.minimum(counts, holdout_per_class)
    labels = [shards.sample_key(label, 0).partition("_")[0] for label in range(len(counts))]
    return per_shard, Counter(dict(zip(labels, (counts - held).tolist()))), Counter(dict(zip(labels, held.tolist())))


def _check_training_images_left(counts: Counts, keys: list[str], holdout_per_class: int) -> None:
    _, trained, held = counts
    for label, key in enumerate(keys):
        part = shards.sample_key(label, 0).partition("_")[0]
        if held[part] and not trained[part]:
            raise UserError(f"class {key!r} has only {held[part]} synthetic images and train.holdout_per_class = "
                            f"{holdout_per_class} keeps them all out of training; lower holdout_per_class or "
                            "raise scale in params.yaml")


def check_index_classes(index: dict, keys: list[str], folder: Path) -> None:
    """Fail early when the shards were made for another class set than the prompt table's."""
    if index["classes"] != keys:
        raise UserError(f"{folder / shards.INDEX_FILE}: the shards hold {len(index['classes'])} classes that do not "
                        f"match the prompt table ({len(keys)} classes); regenerate: dvc repro sd-generate")


def _shuffled(items: Iterable, rng: random.Random, size: int) -> Iterator:
    """Items in random order, holding at most `size` of them in memory."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(IterableDataset):
    """The synthetic images, streamed from tar shards: the training images, or (split
    "holdout") the first `holdout_per_class` of every class, kept out of training.

    Each epoch the shard order is shuffled (seed `seeds.derive(seed, "shards", epoch)`)
    and shard i goes to reader i mod R, where the R = processes x DataLoader workers
    readers are numbered rank x workers + worker, so that every image is read exactly
    once per epoch across all processes (see `set_rank`). A batch is made inside one worker, and a shard may hold few
    classes, so each worker draws from `open_shards` shards at once through a shuffle
    buffer. Call `set_epoch` before each epoch's iterator is made, and do not use
    persistent workers: they would keep the previous epoch's copy of the dataset.

    Undecodable images and records whose label does not match the class set are
    skipped and counted in `skipped`, shared by all workers. A record that is not
    JSON object is skipped and counted on its own; an unreadable tar ends the reading
    of its shard (counted once, with a warning).
    """

    def __init__(self, shard_paths: list[Path], keys: list[str], transform: Callable, seed: int,
                 holdout_per_class: int = 0, split: str = "train", buffer_size: int = 1000, open_shards: int = 4,
                 counts: Counts | None = None):
        self.keys, self.transform, self.seed = list(keys), transform, seed
        self.holdout_per_class, self.split = holdout_per_class, split
        self.buffer_size, self.open_shards = buffer_size, open_shards
        self.epoch = 0
        self.rank, self.world = 0, 1
        self.skipped = multiprocessing.Value("q", 0)
        counts = counts or count_samples(list(shard_paths), holdout_per_class)
        if split == "train":
            _check_training_images_left(counts, self.keys, holdout_per_class)
        side = 0 if split == "train" else 1
        # Only shards holding images of this split are read.
        self.shard_paths = [p for p in shard_paths if counts[0][p][side]]
        self.num_images = sum(counts[0][p][side] for p in self.shard_paths)

    def __len__(self) -> int:
        """Images in the shards, skipped ones included: what one epoch reads."""
        return self.num_images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_rank(self, rank: int, world: int) -> None:
        """Read only this process's share of the shards (distributed training)."""
        self.rank, self.world = rank, world

    def __iter__(self):
        paths, worker = self._shards_of_this_worker()
        rng = random.Random(seeds.derive(self.seed, "shuffle", self.epoch, worker))
        for jpeg, record in _shuffled(self._records(paths, rng), rng, self.buffer_size):
            if self._other_split(record):
                continue
            label = self._label(record)
            image = _decode(jpeg) if label is not None else None
            if image is None:
                self._count_skip()
                continue
            yield self.transform(image), label

    def _shards_of_this_worker(self) -> tuple[list[Path], int]:
        order = list(self.shard_paths)
        random.Random(seeds.derive(self.seed, "shards", self.epoch)).shuffle(order)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = self.rank * workers + worker
        return order[reader::self.world * workers], reader

    def _records(self, paths: list[Path], rng: random.Random) -> Iterator[tuple[bytes, dict]]:
        """(jpeg, record) of every shard in `paths`, drawn at random from `open_shards` open shards."""
        waiting = iter(paths)
        live = [self._shard_records(p) for p in itertools.islice(waiting, self.open_shards)]
        while live:
            i = rng.randrange(len(live))
            item = next(live[i], None)
            if item is not None:
                yield item
                continue
            following = next(waiting, None)
            if following is None:
                live.pop(i)
            else:
                live[i] = self._shard_records(following)

    def _shard_records(self, path: Path) -> Iterator[tuple[bytes, dict]]:
        try:
            for _, jpeg, record in shards.iter_shard(path):
                yield jpeg, record
        except (tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            self._count_skip()
            tqdm.write(f"warning: {path}: unreadable record ({type(exc).__name__}); rest of the shard skipped")

    def _other_split(self, record: dict | None) -> bool:
        if record is None:
            return False        # a bad record: counted as skipped in the split it is found in
        return held_out(record.get("image_index"), self.holdout_per_class) != (self.split == "holdout")

    def _label(self, record: dict | None) -> int | None:
        if record is None:
            return None
        label = record.get("label")
        if isinstance(label, int) and 0 <= label < len(self.keys) and self.keys[label] == record.get("class"):
            return label
        return None

    def _count_skip(self) -> None:
        with self.skipped.get_lock():
            self.skipped.value += 1


class ImageList(Dataset):
    """(transformed image, label) for a list of (image path, label)."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def folder_splits(root: Path, keys: list[str], key: str, holdout_per_class: int, train_transform: Callable,
                  holdout_transform: Callable) -> tuple[ImageList, ImageList | None]:
    """Real images from a folder of class folders named by class key (wnid), e.g. ImageNet train:
    (training images, held-out images or None), labelled with the class's logit index.

    Only the classes in `keys` are used; folders of other classes are ignored, so the
    ImageNet-1k train folder serves ImageNet-100. The first `holdout_per_class` files
    of each class (sorted by name) are held out. `key` names the param, for errors.
    """
    found = image_files(root)
    missing = [k for k in keys if k not in found]
    if missing:
        raise UserError(f"params.yaml: {key} = {str(root)!r} has no image folder for class {missing[0]!r} "
                        f"({len(missing)} of {len(keys)} classes missing); add folders named by class wnid "
                        "or use source: synthetic")
    too_few = next((k for k in keys if len(found[k]) <= holdout_per_class), None)
    if too_few is not None:
        raise UserError(f"{root / too_few} has {len(found[too_few])} images and train.holdout_per_class = "
                        f"{holdout_per_class} keeps them all out of training; lower holdout_per_class")
    n = holdout_per_class
    train = ImageList([(path, label) for label, k in enumerate(keys) for path in found[k][n:]], train_transform)
    holdout = ImageList([(path, label) for label, k in enumerate(keys) for path in found[k][:n]], holdout_transform)
    return train, holdout if n else None


def shard_splits(paths: list[Path], keys: list[str], seed: int, holdout_per_class: int, train_transform: Callable,
                 holdout_transform: Callable, index: dict | None = None) -> tuple[ShardDataset, ShardDataset | None]:
    """The synthetic images: (training images, held-out images or None), counted once: from
    sd-generate's `index` when given, else from the tar headers."""
    if index is not None:
        counts = index_counts(index, paths[0].parent, holdout_per_class)
    else:
        counts = count_samples(paths, holdout_per_class)
    train = ShardDataset(paths, keys, train_transform, seed, holdout_per_class, "train", counts=counts)
    if not holdout_per_class:
        return train, None
    return train, ShardDataset(paths, keys, holdout_transform, seed, holdout_per_class, "holdout", counts=counts)
