"""Does the generator copy its training images? The share of generated images nearer to a real one than
real images are to each other.

A generator trained on the real train split (the digits profile's) could pass every accuracy
target by drawing near copies of it. The bar: for every real train image, the distance to its
nearest other train image; the `PERCENTILE`th percentile of those. A generated image nearer than
that to some real train image counts as a near copy; `memorised_share` is their percentage.

Distances are Euclidean on pixels in [0, 1], RGB, at the generated images' stored size (at most
`SIDE` px a side; larger images are compared downsized). The check reads the real train folder
and at most `MAX_GENERATED` generated images (the dataset's first shards, a mix of every class):
its cost does not grow with the dataset. A real train split of more than `MAX_REAL` images
(ImageNet's) is not compared pixel to pixel, and the result says so.

Docs: docs/digits.md#memorisation
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from imagenet_sd.datasets import shards
from imagenet_sd.datasets.plan import listed_counts
from imagenet_sd.datasets.readers import _decode, image_files, read_rgb

PERCENTILE = 5
MAX_REAL = 20_000
MAX_GENERATED = 5_000
SIDE = 32


def _pixels(image, side: int) -> np.ndarray:
    from PIL import Image
    if image.size != (side, side):
        image = image.resize((side, side), Image.BILINEAR)
    return np.asarray(image.convert("RGB"), dtype=np.float32).ravel() / 255


def _readable(path: Path, side: int) -> np.ndarray | None:
    """A real image's pixels, or None for a file that is not a readable image (skipped, as training skips it)."""
    from PIL import UnidentifiedImageError
    try:
        return _pixels(read_rgb(path), side)
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def _nearest(queries: np.ndarray, pool: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """Distance of each query to its nearest pool vector, in chunks (memory flat in the pool's size)."""
    import torch
    pool_t = torch.from_numpy(pool)
    out = []
    for start in range(0, len(queries), 1024):
        d = torch.cdist(torch.from_numpy(queries[start:start + 1024]), pool_t)
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + start] = float("inf")
        out.append(d.min(dim=1).values.numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def check(train_root: Path | None, dataset: Path, cache_dir: Path | None = None) -> dict:
    """{"memorised_share", "threshold", "real_images", "generated_checked"} or {"skipped": why}."""
    if train_root is None or not train_root.is_dir():
        return {"skipped": "no real train folder configured (data.train)"}
    real_count = sum(listed_counts(train_root, cache_dir).values())
    if real_count > MAX_REAL:
        return {"skipped": f"the real train split has {real_count:,} images, over the {MAX_REAL:,} compared "
                           "pixel to pixel"}
    index = shards.read_index(dataset)
    side = min(index.get("stored_size") or index["resolution"], SIDE)
    real = [v for paths in image_files(train_root).values() for p in paths if (v := _readable(p, side)) is not None]
    if len(real) < 2:
        return {"skipped": f"fewer than 2 readable images in {train_root}"}
    real = np.stack(real)
    threshold = float(np.percentile(_nearest(real, real, exclude_self=True), PERCENTILE))
    generated = []
    for entry in index["shards"]:
        for _, jpeg, _ in shards.iter_shard(dataset / entry["file"]):
            image = _decode(jpeg)
            if image is not None:
                generated.append(_pixels(image, side))
            if len(generated) >= MAX_GENERATED:
                break
        if len(generated) >= MAX_GENERATED:
            break
    if not generated:
        return {"skipped": "no readable generated image"}
    nearest = _nearest(np.stack(generated), real)
    return {"memorised_share": round(100 * float((nearest < threshold).mean()), 2),
            "threshold": round(threshold, 4), "percentile": PERCENTILE, "real_images": len(real),
            "generated_checked": len(generated),
            "median_nearest_generated": round(float(np.median(nearest)), 4)}
