"""Features of a fixed list of images, cached as .npz files: eval-transfer's encoder features
(evaluate/transfer.py) and clip-tune's CLIP features of real images (clip_tune/features.py).

A file is named by `cache_key`: the model's digest, the set's name, the split, the
preprocessing and the files (path, size and label of each), so editing a dataset folder
gives new files rather than stale features. No code is hashed (docs/caching.md#transfer-feature-cache).
`cached` reads a file, or computes and writes it atomically; a damaged file is computed again.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from imagenet_sd.core.io import replacing
from imagenet_sd.datasets.transfer_sets import Split


def cache_key(model_digest: str, name: str, split: str, preprocessing: str, split_data: Split) -> str:
    # The file list (with sizes) is part of the key so that editing a dataset
    # folder invalidates its features instead of silently reusing stale ones.
    files = [f"{p}:{p.stat().st_size}:{y}" for p, y in split_data.samples]
    text = json.dumps([model_digest, name, split, preprocessing, files])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


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
