"""Tar shards in the WebDataset layout: `<key>.jpg` + `<key>.json` per image.

Millions of loose files make DVC slow (it hashes ~14k files/s); a few hundred
shards do not. Keys are `<class key>_<image index:06d>` with characters outside
[A-Za-z0-9-] replaced, because WebDataset splits a member name at its first dot.
A shard is written under a temporary name and renamed when complete, so a shard
that exists is whole. `sd-generate` also keeps a manifest beside each shard in
its work folder (keys, size, sha256), written after the shard: a shard with a
manifest that matches it is finished; anything else is redone.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from .io import atomic_write_text, file_sha256 as sha256, replacing

SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_FILE = "index.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9-]")


def sample_key(class_key: str, image_index: int) -> str:
    return f"{_UNSAFE.sub('-', class_key)}_{image_index:06d}"


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0          # fixed metadata: the same images give the same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


class _Hashing:
    """A write-only file that also hashes what goes through it (no second read of the shard)."""

    def __init__(self, f):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def write_shard(path: Path, samples: Iterable[tuple[str, bytes, dict]]) -> tuple[int, str]:
    """Write (key, jpeg bytes, record) samples to `path` atomically; return its size and sha256."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        out = _Hashing(f)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpeg, record in samples:
                _add(tar, f"{key}.jpg", jpeg)
                _add(tar, f"{key}.json", json.dumps(record, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())       # on disk before the rename says "finished"
    return out.size, out.digest.hexdigest()


def iter_shard(path: Path) -> Iterator[tuple[str, bytes, dict | None]]:
    """Yield (key, jpeg bytes, record) from one shard, in stored order.

    A sample whose record is not a JSON object comes with record None, so readers
    can skip and count it and still read the rest of the shard.
    """
    pending: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            parts = pending.setdefault(key, {})
            parts[ext] = tar.extractfile(member).read()
            if "jpg" in parts and "json" in parts:
                del pending[key]
                try:
                    record = json.loads(parts["json"])
                except ValueError:
                    record = None
                yield key, parts["jpg"], record if isinstance(record, dict) else None


def manifest_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def write_manifest(shard: Path, manifest: dict) -> None:
    """Written after the shard itself: a manifest means the shard was finished."""
    atomic_write_text(manifest_path(shard), json.dumps(manifest, indent=1) + "\n")


def read_manifest(shard: Path) -> dict | None:
    try:
        manifest = json.loads(manifest_path(shard).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_finished(shard: Path, keys: list[str] | None = None, *, check_hash: bool = True) -> bool:
    """True if `shard` exists and matches its manifest (and holds exactly `keys`, when given).

    Catches a missing manifest (killed before it was written), a truncated or
    altered shard (size or sha256), and a shard of another plan (keys).
    """
    manifest = read_manifest(shard)
    if manifest is None or (keys is not None and manifest.get("keys") != keys):
        return False
    try:
        if shard.stat().st_size != manifest.get("bytes"):
            return False
    except OSError:
        return False
    return not check_hash or sha256(shard) == manifest.get("sha256")


def list_shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.tar"))
