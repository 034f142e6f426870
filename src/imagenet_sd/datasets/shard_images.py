"""The synthetic shards' images for CLIP: decoded (at a reduced JPEG scale when CLIP's input allows)
and preprocessed by CLIP's image processor in the loader workers, a batch of one shard at a time.
Read by clip-filter (which scores them) and clip-tune (which embeds them).

`input_size`, `_decode` and `ShardImages` key clip-filter's score cache and clip-tune's feature
cache by their source (the stages' `code_identity`): an edit to one re-scores and re-encodes every
user's images (docs/caching.md).
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from imagenet_sd.datasets import shards


def input_size(processor) -> int:
    """The largest side the image processor resizes or crops to (0: unknown)."""
    sides = [sizes.get(name) for sizes in (getattr(processor, "size", None), getattr(processor, "crop_size", None))
             if sizes is not None for name in ("shortest_edge", "height", "width")]
    return max((side for side in sides if isinstance(side, int)), default=0)


def _decode(jpeg: bytes, side: int) -> Image.Image | None:
    """The image, decoded by JPEG's DCT scaling at 1/2, 1/4 or 1/8 when that stays at least `side`
    a side (PIL's draft): less work than a full decode, and a smaller image to resize (measured
    in README "CLIP filtering")."""
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            if side:
                image.draft("RGB", (side, side))
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


class ShardImages(IterableDataset):
    """The images of the given shards, preprocessed for CLIP in the loader workers, as batches
    of one shard (whole shards go to worker i mod workers). Each batch is a dict: shard file,
    labels, image indices, pixels, the (labels, indices) of images that do not decode, and
    `last` on a shard's final batch. A record that is not an image of the class set (bad
    JSON, wrong label) is passed over, as training passes it over."""

    def __init__(self, paths: list[Path], keys: list[str], processor, batch_size: int):
        self.paths, self.keys, self.processor, self.batch_size = paths, keys, processor, batch_size
        self.side = input_size(processor)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for path in self.paths[worker::workers]:
            try:
                yield from self._batches(path)
            except (tarfile.TarError, OSError) as exc:
                # Handed to the main process as data: an exception raised in a worker comes back as a traceback.
                yield {"file": path.name, "error": f"{type(exc).__name__}: {exc}"}

    def _identify(self, record: dict | None) -> tuple[int, int] | None:
        if not isinstance(record, dict):
            return None
        label, index = record.get("label"), record.get("image_index")
        if (isinstance(label, int) and 0 <= label < len(self.keys) and self.keys[label] == record.get("class")
                and isinstance(index, int) and index >= 0):
            return label, index
        return None

    def _batches(self, path: Path):
        images, ids, bad = [], [], []
        for _, jpeg, record in shards.iter_shard(path):
            identified = self._identify(record)
            if identified is None:
                continue
            image = _decode(jpeg, self.side)
            if image is None:
                bad.append(identified)
                continue
            images.append(image)
            ids.append(identified)
            if len(images) == self.batch_size:
                yield self._batch(path, images, ids, bad, last=False)
                images, ids, bad = [], [], []
        yield self._batch(path, images, ids, bad, last=True)

    def _batch(self, path: Path, images, ids, bad, last: bool) -> dict:
        pixels = (self.processor(images=images, return_tensors="pt")["pixel_values"] if images
                  else torch.zeros(0))
        return {"file": path.name, "ids": torch.tensor(ids, dtype=torch.int64).reshape(-1, 2), "pixels": pixels,
                "bad": torch.tensor(bad, dtype=torch.int64).reshape(-1, 2), "last": last}
