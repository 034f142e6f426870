"""eval-transfer: linear probes on the frozen encoder (the paper's Sec. 5.3 protocol).

For each dataset in `profiles.<profile>.transfer.datasets` ({name: root}, root
holding `train/<class>/` and `test/<class>/` image folders):

1. features = the ResNet-50's pooled 2048-d output (its `fc` removed), computed
   once per (checkpoint bytes, dataset, split, preprocessing, file list) and
   cached as .npz under the --cache folder, so that re-running the probe or
   adding a dataset does not recompute the others;
2. a multinomial logistic regression on standardised features; its inverse
   regularisation C is picked from `C_GRID` on a seeded, stratified 80/20 split
   of train (seed = seeds.derive(seed, "transfer", name)), then refit on all of train;
3. top-1 and mean per-class accuracy on test, in percent.

Preprocessing is eval-imagenet's (`profiles.<profile>.evaluate.resize` / `.crop`,
bilinear resize, centre crop, ImageNet normalisation), so both evaluations see
images the same way; batch size and device come from the transfer block.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

from . import device as device_module
from .data import image_files
from .errors import UserError
from .evaluation import INTERPOLATION, build_transform, forward_batches, load_checkpoint, loader
from .io import file_sha256, replacing, write_json, write_tsv
from .seeds import derive

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
VAL_FRACTION = 0.2
LAYOUT = "<root>/train/<class>/ and <root>/test/<class>/ image folders"
RESERVED = ("average_top1", "note")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_ITER = 2000
SMALL_PROBE = 50_000_000   # train features x classes under which the probe runs single-threaded


# --------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class Split:
    classes: list[str]              # class names, label = position
    samples: list[tuple[Path, int]]


def scan_dataset(profile: str, name: str, root: Path) -> dict[str, Split]:
    """{'train': Split, 'test': Split}; UserError if the layout is not there."""
    key = f"profiles.{profile}.transfer.datasets.{name}"
    if name in RESERVED or not SAFE_NAME.fullmatch(name):
        raise UserError(f"params.yaml: {key}: {name!r} cannot name a dataset (it names a cache folder and "
                        f"a metrics key); use letters, digits, '.', '_', '-', not {' or '.join(RESERVED)}")
    if not root.is_dir():
        raise UserError(f"params.yaml: {key} = {str(root)!r}: no such folder; expected {LAYOUT}")
    found = {}
    for split in ("train", "test"):
        folders = image_files(root / split) if (root / split).is_dir() else {}
        if not folders:
            raise UserError(f"params.yaml: {key} = {str(root)!r}: no class folders with images in "
                            f"{split}/; expected {LAYOUT}")
        found[split] = folders
    unknown = sorted(set(found["test"]) - set(found["train"]))
    if unknown:
        raise UserError(f"params.yaml: {key} = {str(root)!r}: test class {unknown[0]!r} has no train/ "
                        f"folder; train/ and test/ must hold the same classes")
    names = sorted(found["train"])
    label = {c: i for i, c in enumerate(names)}
    return {split: Split(names, [(p, label[c]) for c, files in sorted(folders.items()) for p in files])
            for split, folders in found.items()}


def validate(params) -> dict[str, dict[str, Split]]:
    return {name: scan_dataset(params.profile, name, root)
            for name, root in params.transfer.datasets.items()}


# --------------------------------------------------------------------------- features

def cache_key(model_digest: str, name: str, split: str, preprocessing: str, split_data: Split) -> str:
    # The file list (with sizes) is part of the key so that editing a dataset
    # folder invalidates its features instead of silently reusing stale ones.
    files = [f"{p}:{p.stat().st_size}:{y}" for p, y in split_data.samples]
    text = json.dumps([model_digest, name, split, preprocessing, files])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def encoder_of(model: nn.Module) -> nn.Module:
    """The classifier without its head: outputs the 2048-d pooled feature."""
    model.fc = nn.Identity()
    return model.eval()


def extract(encoder: nn.Module, split_data: Split, transform, batch_size: int,
            device: torch.device, desc: str) -> np.ndarray:
    data = loader(split_data.samples, transform, batch_size, device)
    return np.concatenate([out.numpy() for out, _ in forward_batches(encoder, data, device, desc)])


def cached(path: Path, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
    """Features from `path` if present, else computed and stored atomically; (features, was_cached)."""
    if path.is_file():
        try:
            with np.load(path) as stored:
                return stored["features"], True
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache file is recomputed, not an error
    features = compute().astype(np.float32)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, features=features)     # a file object: np.savez would add .npz to a name
    return features, False


# --------------------------------------------------------------------------- probe

def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices): `fraction` of each class held out, at least one kept to fit."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(int(round(fraction * len(members))), len(members) - 1)
        val.extend(members[:n_val])
        fit.extend(members[n_val:])
    return np.sort(np.array(fit, dtype=int)), np.sort(np.array(val, dtype=int))


def fit_probe(x: np.ndarray, y: np.ndarray, c: float) -> Callable[[np.ndarray], np.ndarray]:
    """Standardise, then multinomial logistic regression; returns a predict function."""
    scaler = StandardScaler().fit(x)
    if len(np.unique(y)) == 1:  # lbfgs refuses one class; the probe then predicts it
        only = y[0]
        return lambda q: np.full(len(q), only)
    clf = LogisticRegression(C=c, max_iter=MAX_ITER).fit(scaler.transform(x), y)
    return lambda q: clf.predict(scaler.transform(q))


def choose_c(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """C with the best held-out accuracy (smallest C on ties: the most regularised)."""
    fit, val = stratified_split(y, VAL_FRACTION, seed)
    if len(val) == 0 or len(np.unique(y[fit])) == 1:  # nothing to validate on, or to discriminate
        return 1.0
    scaler = StandardScaler().fit(x[fit])
    fit_x, val_x = scaler.transform(x[fit]), scaler.transform(x[val])
    # Warm start along the ascending grid: each fit starts from the previous
    # solution, which saves most lbfgs iterations at the weakly regularised end.
    clf = LogisticRegression(max_iter=MAX_ITER, warm_start=True)
    scores = [float(np.mean(clf.set_params(C=c).fit(fit_x, y[fit]).predict(val_x) == y[val]))
              for c in C_GRID]
    return C_GRID[int(np.argmax(scores))]


def accuracies(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(top-1, mean per-class accuracy), percent."""
    per_class = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    return 100.0 * float(np.mean(pred == y)), 100.0 * float(np.mean(per_class))


def probe(train_x, train_y, test_x, test_y, seed: int) -> dict:
    # Small probes gain nothing from BLAS threads, and OpenBLAS threads spin-waiting
    # for a core that another process holds make them 10-100x slower; large ones
    # (the paper's datasets) keep all threads.
    small = train_x.size * len(np.unique(train_y)) < SMALL_PROBE
    with threadpool_limits(limits=1 if small else None, user_api="blas"):
        c = choose_c(train_x, train_y, seed)
        top1, per_class = accuracies(fit_probe(train_x, train_y, c)(test_x), test_y)
    return {"top1": round(top1, 2), "mean_per_class": round(per_class, 2), "C": c}


# --------------------------------------------------------------------------- stage

def dataset_features(encoder, model_digest: str, name: str, splits: dict[str, Split], params,
                     cache_dir: Path, device: torch.device) -> dict[str, np.ndarray]:
    resize, crop = params.evaluate.resize, params.evaluate.crop
    preprocessing = f"resize{resize}-{INTERPOLATION}-crop{crop}-imagenet-norm"
    transform = build_transform(resize, crop)
    features = {}
    for split, split_data in splits.items():
        key = cache_key(model_digest, name, split, preprocessing, split_data)
        features[split], hit = cached(
            cache_dir / name / f"{split}-{key}.npz",
            lambda: extract(encoder, split_data, transform, params.transfer.batch_size, device,
                            f"{name}/{split}"))
        if hit:
            print(f"{name}/{split}: {len(split_data.samples)} features from cache")
    return features


def run(params, model_path: Path, metrics_path: Path, plot_path: Path, cache_dir: Path) -> dict:
    scanned = validate(params)
    loaded = load_checkpoint(model_path)
    device = device_module.resolve(params.transfer.device, f"profiles.{params.profile}.transfer.device")
    metrics: dict = {}
    if scanned:
        encoder = encoder_of(loaded.model)
        digest = file_sha256(model_path)
        for name, splits in scanned.items():
            feats = dataset_features(encoder, digest, name, splits, params, cache_dir, device)
            train_y = np.array([y for _, y in splits["train"].samples])
            test_y = np.array([y for _, y in splits["test"].samples])
            result = probe(feats["train"], train_y, feats["test"], test_y,
                           derive(params.seed, "transfer", name))
            metrics[name] = {**result, "classes": len(splits["train"].classes),
                             "train_images": len(train_y), "test_images": len(test_y)}
        metrics["average_top1"] = round(float(np.mean([metrics[n]["top1"] for n in scanned])), 2)
    else:
        metrics = {"average_top1": None,
                   "note": f"no transfer dataset configured (profiles.{params.profile}.transfer.datasets)"}
        print(metrics["note"])
    write_json(metrics_path, metrics)
    write_tsv(plot_path, ["dataset", "top1"], [[n, metrics[n]["top1"]] for n in scanned])
    print(summary_table(metrics, list(scanned)))
    return metrics


def summary_table(metrics: dict, names: list[str]) -> str:
    lines = [f"{'dataset':<24} {'top1':>7} {'mean/cls':>8} {'C':>7} {'classes':>7} {'train':>7} {'test':>7}"]
    for n in names:
        m = metrics[n]
        lines.append(f"{n:<24} {m['top1']:>7.2f} {m['mean_per_class']:>8.2f} {m['C']:>7g} "
                     f"{m['classes']:>7} {m['train_images']:>7} {m['test_images']:>7}")
    if names:
        lines.append(f"{'average':<24} {metrics['average_top1']:>7.2f}")
    return "\n".join(lines)
