"""Reading images: real image folders, and (in training) the synthetic shards."""
from __future__ import annotations

import io
import json
import multiprocessing
import random
import tarfile
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from imagenet_sd.core import seeds
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import shards
from imagenet_sd.prompts.prompts import ClassPrompt

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


# A batch is made inside one DataLoader worker from this many samples at random (still
# undecoded, ~50 kB each at 512 px). Shards are shuffled inside when written (plan.Layout),
# so a shard read front to back is already a random mix of classes; the buffer mixes the
# ends of consecutive shards and the classes of hand-made shards. 2,000 gives batches of
# 256 as varied as random draws (docs/benchmarks.md, "Shuffle").
SHUFFLE_BUFFER = 2000


class ShardDataset(IterableDataset):
    """The synthetic images, streamed from tar shards with the `webdataset` library: the
    training images, or (split "holdout") the first `holdout_per_class` of every class.

    webdataset reads the tars, groups `<key>.jpg` with `<key>.json` and shuffles samples
    in a buffer of `buffer_size`. Which shards a reader gets is decided here, from the
    seed, so that it is reproducible and exact: each epoch the shard order is shuffled
    (seed `seeds.derive(seed, "shards", epoch)`) and shard i goes to reader i mod R, where
    the R = processes x DataLoader workers readers are numbered rank x workers + worker.
    Every image is thus read exactly once per epoch across all processes (see `set_rank`).
    Call `set_epoch` before each epoch's iterator is made, and do not use persistent
    workers: they would keep the previous epoch's copy of the dataset.

    `decode` turns JPEG bytes into what `transform` takes (a PIL image by default);
    it returns None for an image it cannot read. Undecodable images and records whose
    label does not match the class set are skipped and counted in `skipped`, shared by
    all workers. A record that is not a JSON object is skipped and counted on its own; an
    unreadable tar ends the reading of its shard (counted once, with a warning).

    `kept` (the clip-filter stage's `kept.KeptSet`, training split only): images it does not
    keep are passed over before the shuffle buffer, one bit lookup each, and are not in
    `len()`; they are not counted as skipped.
    """

    def __init__(self, shard_paths: list[Path], keys: list[str], transform: Callable, seed: int,
                 holdout_per_class: int = 0, split: str = "train", buffer_size: int = SHUFFLE_BUFFER,
                 counts: Counts | None = None, decode: Callable[[bytes], object | None] | None = None,
                 kept=None):
        self.keys, self.transform, self.seed = list(keys), transform, seed
        self.decode = decode or _decode
        self.holdout_per_class, self.split = holdout_per_class, split
        self.buffer_size = buffer_size
        self.epoch = 0
        self.rank, self.world = 0, 1
        self.skipped = multiprocessing.Value("q", 0)
        counts = counts or count_samples(list(shard_paths), holdout_per_class)
        if split == "train":
            _check_training_images_left(counts, self.keys, holdout_per_class)
        # The clip-filter stage's kept set (kept.KeptSet; None: every image). Held-out images are never filtered.
        self.kept = kept if split == "train" else None
        side = 0 if split == "train" else 1

        def images(path: Path) -> int:
            return counts[0][path][side] - (self.kept.dropped_in(path.name) if self.kept is not None else 0)
        # Only shards holding images of this split are read.
        self.shard_paths = [p for p in shard_paths if images(p)]
        self.num_images = sum(images(p) for p in self.shard_paths)

    def __len__(self) -> int:
        """Images in the shards, skipped ones included: what one epoch reads."""
        return self.num_images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_rank(self, rank: int, world: int) -> None:
        """Read only this process's share of the shards (distributed training)."""
        self.rank, self.world = rank, world

    def __iter__(self):
        import webdataset as wds  # imported where used: the loader workers need it, evaluation does not

        paths, reader = self._shards_of_this_reader()
        if not paths:           # more readers than shards (the held-out split is often one shard)
            return iter(())
        rng = random.Random(seeds.derive(self.seed, "shuffle", self.epoch, reader))
        self._reading, self._reported = None, set()
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([str(p) for p in paths]),
            self._note_shard,
            wds.tarfile_to_samples(handler=self._unreadable_shard),
            wds.map(self._select),                 # (jpeg, label) of this split; bad records counted
            # Shuffled while still JPEG bytes: a buffer of augmented crops would be ~30x larger.
            wds.shuffle(self.buffer_size, initial=self.buffer_size, rng=rng),
            wds.map(self._decode_and_transform),
        )
        return iter(pipeline)

    def _shards_of_this_reader(self) -> tuple[list[Path], int]:
        order = list(self.shard_paths)
        random.Random(seeds.derive(self.seed, "shards", self.epoch)).shuffle(order)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = self.rank * workers + worker
        return order[reader::self.world * workers], reader

    def _note_shard(self, sources):
        """Remembers which shard is being read (stages are lazy: the one after asked for it)."""
        for source in sources:
            self._reading = source["url"]
            yield source

    def _unreadable_shard(self, exc: Exception) -> bool:
        """webdataset's handler: warn and count once per shard (a broken tar raises once in its
        member loop and again when the loop goes on), then go on with the next shard."""
        if self._reading not in self._reported:
            self._reported.add(self._reading)
            self._count_skip()
            tqdm.write(f"warning: {self._reading}: unreadable tar data ({type(exc).__name__}); rest of the shard "
                       "skipped")
        return True

    def _select(self, sample: dict) -> tuple[bytes, int] | None:
        record = _record(sample.get("json"))
        if record is not None and held_out(record.get("image_index"), self.holdout_per_class) != (
                self.split == "holdout"):
            return None                            # the other split's image
        label = self._label(record)
        if label is None or "jpg" not in sample:
            self._count_skip()
            return None
        index = record.get("image_index")
        if self.kept is not None and isinstance(index, int) and not self.kept.keeps(label, index):
            return None                            # left out by the filter: not an error, not counted
        return sample["jpg"], label

    def _decode_and_transform(self, item: tuple[bytes, int]):
        image = self.decode(item[0])
        if image is None:
            self._count_skip()
            return None
        return self.transform(image), item[1]

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


def _record(raw: bytes | None) -> dict | None:
    """A sample's JSON record; None when it is missing or not a JSON object (a bad record)."""
    try:
        record = json.loads(raw) if raw is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def batch_mix(label_batches: list[np.ndarray], class_counts: np.ndarray, seed: int = 0) -> dict[str, float]:
    """How random a loader's batches are, against batches of the same size drawn at random
    (with replacement, in proportion to `class_counts`), as ratios of means over the batches:

    - batch_distinct_classes_ratio: distinct classes in a batch;
    - batch_label_iqr_ratio: interquartile range of the labels in a batch. Neighbouring
      ImageNet labels are similar classes, so a loader that draws from a window of
      labels has a small spread even when its classes are distinct.
    """
    rng = np.random.default_rng(seed)
    p = np.asarray(class_counts, dtype=np.float64)
    uniform = [rng.choice(len(p), len(b), p=p / p.sum()) for b in label_batches]

    def distinct(batches):
        return np.mean([len(np.unique(b)) for b in batches])

    def spread(batches):
        return np.mean([np.subtract(*np.percentile(b, [75, 25])) for b in batches])

    return {"batch_distinct_classes_ratio": round(float(distinct(label_batches) / distinct(uniform)), 4),
            "batch_label_iqr_ratio": round(float(spread(label_batches) / spread(uniform)), 4)}


def read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageList(Dataset):
    """(transformed image, label) for a list of (image path, label); `read` opens a path."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable,
                 read: Callable[[Path], object] = read_rgb):
        self.samples, self.transform, self.read = samples, transform, read

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(self.read(path)), label


def folder_splits(root: Path, keys: list[str], key: str, holdout_per_class: int, train_transform: Callable,
                  holdout_transform: Callable, read: Callable[[Path], object] = read_rgb
                  ) -> tuple[ImageList, ImageList | None]:
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
    train = ImageList([(path, label) for label, k in enumerate(keys) for path in found[k][n:]], train_transform, read)
    holdout = ImageList([(path, label) for label, k in enumerate(keys) for path in found[k][:n]], holdout_transform)
    return train, holdout if n else None


def shard_splits(paths: list[Path], keys: list[str], seed: int, holdout_per_class: int, train_transform: Callable,
                 holdout_transform: Callable, index: dict | None = None,
                 decode: Callable[[bytes], object | None] | None = None,
                 kept=None) -> tuple[ShardDataset, ShardDataset | None]:
    """The synthetic images: (training images, held-out images or None), counted once: from
    sd-generate's `index` when given, else from the tar headers. `decode` is the training
    split's (the held-out images are always PIL images for a centre crop); so is `kept`
    (the clip-filter stage's kept set; None: every image)."""
    if index is not None:
        counts = index_counts(index, paths[0].parent, holdout_per_class)
    else:
        counts = count_samples(paths, holdout_per_class)
    train = ShardDataset(paths, keys, train_transform, seed, holdout_per_class, "train", counts=counts, decode=decode,
                         kept=kept)
    if not holdout_per_class:
        return train, None
    return train, ShardDataset(paths, keys, holdout_transform, seed, holdout_per_class, "holdout", counts=counts)
