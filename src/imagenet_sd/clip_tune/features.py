"""CLIP image features for clip-tune: the frozen image tower, CLIP's own preprocessing, and the
per-shard feature cache that training streams from.

Cost and scale. CLIP's image embeddings of the synthetic images are cached per shard in
`clip_classifier.work_dir/<key>/shards/<shard sha256>.npz` (fp16), the key hashing the weights,
the image processor, device type and precision, library versions and the code that computes
them, not the classes, the filter or the recipe: a re-run, another experiment on the same
shards, or a change of recipe, filter or few-shot set runs no image through CLIP. A shard's
file is written when the shard is done, so a killed run resumes. Real images (test sets, K-shot
sets, transfer test splits) are cached per set, keyed by their paths, sizes and labels
(datasets/feature_cache.py). Training streams the shards' features a buffer of BUFFER_IMAGES at a
time in a seeded order, so memory does not grow with the dataset.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from imagenet_sd.core import seeds
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import replacing, write_json
from imagenet_sd.core.params import Params, writable_dir
from imagenet_sd.datasets import feature_cache, imagenet_scan, kept, shard_images
from imagenet_sd.datasets.imagenet_sets import TEST_SETS
from imagenet_sd.datasets.inference import forward_batches, loader
from imagenet_sd.datasets.transfer_sets import Split
from imagenet_sd.models import clip_model, probes

BUFFER_IMAGES = 1 << 18       # synthetic features shuffled together: 256 MiB of fp16 512-d rows
RECIPE_FILE = "recipe.json"

# The code that code_identity hashes (ImageTower, encode_shards) spells CLIP's model class and the
# shards' image reader `clip_filter.Clip` and `clip_filter.ShardImages`, as when they lived in
# filter/clip_filter.py. They live in models/clip_model.py and datasets/shard_images.py now; this
# name keeps that source, hence every user's feature cache key, byte for byte
# (tests/test_code_identity.py). Not for other code: import them from their modules.
clip_filter = SimpleNamespace(Clip=clip_model.Clip, ShardImages=shard_images.ShardImages)


class ImageTower(nn.Module):
    """CLIP's image embedding, unit length: what the head reads."""

    def __init__(self, clip: clip_filter.Clip):
        super().__init__()
        self.model = clip.model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # fp16 on a GPU (tensor cores); CPUs have no fast fp16 kernels.
        with torch.autocast(pixels.device.type, dtype=torch.float16, enabled=pixels.device.type == "cuda"):
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)


def threads_for(tower: ImageTower, batch_size: int):
    """probes.threads_for of a batch through the image tower (weights x images as its size): the
    embedded tiny CLIP's batches run 20x faster on one thread than on two busy cores
    (docs/he2023.md#what-classifier-tuning-costs)."""
    return probes.threads_for(batch_size * sum(w.numel() for w in tower.model.vision_model.parameters()))


class Preprocess:
    """CLIP's own image processor on one PIL image (He et al. extract with CLIP's preprocessing)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def code_identity() -> str:
    """The code that decides a feature (not the training or the reporting, which change freely)."""
    parts = (ImageTower, Preprocess, encode_shards, shard_images.ShardImages, shard_images._decode,
             shard_images.input_size)
    return hashlib.sha256("".join(inspect.getsource(p) for p in parts).encode()).hexdigest()[:16]


def features_recipe(model: str, fingerprint: str, processor, device: torch.device) -> dict:
    """What decides the image features, and nothing else (no class, filter or training setting)."""
    return {"model": model, "weights": fingerprint, "processor": json.loads(processor.to_json_string()),
            "device": device.type, "precision": clip_model.precision(device),
            "libraries": clip_model.library_versions(model), "code": code_identity(), **clip_model.backend_key(model)}


def features_folder(params: Params, recipe: dict) -> Path:
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    cp = params.clip_classifier
    folder = writable_dir(f"profiles.{params.profile}.clip_classifier.work_dir", cp.work_dir, cp.work_dir / key)
    write_json(folder / RECIPE_FILE, recipe)
    return folder


def shard_file(folder: Path, entry: dict) -> Path:
    """Named by the shard's sha256: the same bytes share their features in every experiment."""
    return folder / "shards" / f"{entry['sha256']}.npz"


def save_shard(path: Path, ids: list[np.ndarray], rows: list[np.ndarray], width: int) -> None:
    ids_ = np.concatenate(ids) if ids else np.zeros((0, 2), np.int64)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, labels=ids_[:, 0].astype(np.int32), indices=ids_[:, 1].astype(np.int64),
                 features=np.concatenate(rows) if rows else np.zeros((0, width), np.float16))


def encode_shards(tower: ImageTower, processor, keys: list[str], todo: list[dict], shards_dir: Path,
                  folder: Path, params: Params, device: torch.device) -> tuple[int, int, float]:
    """Image features of every shard of `todo` (index.json entries) into `folder`;
    (images encoded, images that do not decode, seconds)."""
    cp = params.clip_classifier
    dataset = clip_filter.ShardImages([shards_dir / e["file"] for e in todo], keys, processor, cp.encode_batch_size)
    batches = DataLoader(dataset, batch_size=None, num_workers=cp.workers, pin_memory=device.type == "cuda")
    entries = {e["file"]: e for e in todo}
    width = tower.model.visual_projection.out_features
    pending: dict[str, tuple[list, list]] = {}
    encoded = undecodable = 0
    bar = tqdm(total=sum(e["images"] for e in todo), unit="img", desc="clip-tune features", dynamic_ncols=True,
               smoothing=0.05)
    started = time.perf_counter()
    with torch.inference_mode(), threads_for(tower, cp.encode_batch_size):
        for batch in batches:
            if "error" in batch:
                raise UserError(f"{shards_dir / batch['file']}: unreadable tar shard ({batch['error'][:120]}); "
                                "re-hash the shards and redo broken ones: python stages/sd_generate.py --verify")
            ids, rows = pending.setdefault(batch["file"], ([], []))
            if len(batch["ids"]):
                ids.append(batch["ids"].numpy())
                rows.append(tower(batch["pixels"].to(device)).cpu().numpy().astype(np.float16))
            encoded, undecodable = encoded + len(batch["ids"]), undecodable + len(batch["bad"])
            bar.update(len(batch["ids"]) + len(batch["bad"]))
            if batch["last"]:
                save_shard(shard_file(folder, entries[batch["file"]]), *pending.pop(batch["file"]), width)
    bar.close()
    return encoded, undecodable, time.perf_counter() - started


def encode_images(tower: ImageTower, processor, samples: list[tuple[Path, int]], name: str, folder: Path,
                  params: Params, device: torch.device) -> tuple[np.ndarray, bool]:
    """Features of real images (float32, one row a sample), cached in `folder` under `name` and a key
    of the files (paths, sizes, labels); (features, whether they came from the cache)."""
    batch_size = params.clip_classifier.encode_batch_size

    def encode() -> np.ndarray:
        with threads_for(tower, batch_size):
            images = loader(samples, Preprocess(processor), batch_size, device)
            batches = forward_batches(tower, images, device, f"clip-tune {name}")
            return np.concatenate([out.numpy() for out, _ in batches])
    key = feature_cache.cache_key(folder.name, name, "images", "clip-processor", Split([], samples))
    return feature_cache.cached(folder / "images" / f"{name}-{key}.npz", encode)


class SyntheticSet:
    """The synthetic images' cached features for training: held-out images (index <
    holdout_per_class) and images the filter dropped left out, streamed in a seeded order a
    buffer of BUFFER_IMAGES at a time (memory flat at any dataset size). The held-out images'
    features are kept apart (`holdout`), for the per-epoch curve."""

    def __init__(self, files: list[Path], holdout_per_class: int, kept_set: kept.KeptSet | None):
        self.files, self.holdout_per_class, self.kept = files, holdout_per_class, kept_set
        self.counts, held_x, held_y = [], [], []
        for path in files:
            with np.load(path, allow_pickle=False) as stored:   # lazy: features are read only where needed
                labels, indices = stored["labels"], stored["indices"]
                self.counts.append(int(self._training(labels, indices).sum()))
                held = indices < holdout_per_class
                if held.any():
                    held_x.append(stored["features"][held])
                    held_y.append(labels[held])
        self.holdout = (_tensor(np.concatenate(held_x)), torch.from_numpy(np.concatenate(held_y)).long()) \
            if held_x else None

    def __len__(self) -> int:
        return sum(self.counts)

    def _training(self, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
        train = indices >= self.holdout_per_class
        return train & self.kept.keeps_all(labels, indices) if self.kept is not None else train

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        with np.load(path, allow_pickle=False) as stored:
            train = self._training(stored["labels"], stored["indices"])
            return stored["features"][train], stored["labels"][train].astype(np.int64)

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch: shards in a seeded order, each buffer shuffled by its own seed; ceil(len / batch_size) batches."""
        order = np.random.default_rng(seeds.derive(seed, "clip-tune", "shards", epoch)).permutation(len(self.files))
        xs, ys, buffered, buffer = [], [], 0, 0
        for position, i in enumerate(order):
            if self.counts[i]:
                x, y = self._read(self.files[i])
                xs.append(x)
                ys.append(y)
                buffered += len(y)
            if buffered and (buffered >= BUFFER_IMAGES or position == len(order) - 1):
                x, y = np.concatenate(xs), np.concatenate(ys)
                rng = np.random.default_rng(seeds.derive(seed, "clip-tune", "buffer", epoch, buffer))
                mix = rng.permutation(len(y))
                x, y, buffer = x[mix], y[mix], buffer + 1
                whole = len(y) if position == len(order) - 1 else len(y) - len(y) % batch_size
                for start in range(0, whole, batch_size):
                    yield _tensor(x[start:start + batch_size]), torch.from_numpy(y[start:start + batch_size])
                xs, ys, buffered = [x[whole:]], [y[whole:]], len(y) - whole   # the rest opens the next buffer


def _tensor(features: np.ndarray) -> torch.Tensor:
    """float32 rows made unit again (stored in fp16)."""
    return F.normalize(torch.from_numpy(features).float(), dim=-1)


@dataclass
class TestFeatures:
    """A test set's images (imagenet_scan.plan: labels, logit columns) and their features."""
    plan: imagenet_scan.EvalPlan
    features: torch.Tensor
    cached: bool


def encode_test_sets(scanned: dict[str, dict[str, list[Path]]], wnids: list[str], tower: ImageTower, processor,
              folder: Path, params: Params, device: torch.device) -> dict[str, TestFeatures]:
    """eval-imagenet's test sets (its discovery, labels and IN-R/IN-A class subsets), their images' features."""
    found = {}
    for name, by_wnid in scanned.items():
        plan = imagenet_scan.plan(TEST_SETS[name], by_wnid, wnids)
        if not plan.samples:
            print(f"clip-tune {name}: no images of the {len(wnids)} classes; nothing to score")
            continue
        features, hit = encode_images(tower, processor, plan.samples, name, folder, params, device)
        found[name] = TestFeatures(plan, torch.from_numpy(features), hit)
    return found
