"""Tar shards in the WebDataset layout: `<key>.jpg` + `<key>.json` per image.

Millions of loose files make DVC slow (it hashes ~14k files/s); a few hundred
shards do not. Keys are `<class key>_<image index:06d>` with characters outside
[A-Za-z0-9-] replaced, because WebDataset splits a member name at its first dot.
A shard is written under a temporary name and renamed when complete, so a shard
that exists is whole.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

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


def write_shard(path: Path, samples: Iterable[tuple[str, bytes, dict]]) -> int:
    """Write (key, jpeg bytes, record) samples to `path` atomically; return its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpeg, record in samples:
                _add(tar, f"{key}.jpg", jpeg)
                _add(tar, f"{key}.json", json.dumps(record, sort_keys=True).encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def iter_shard(path: Path) -> Iterator[tuple[str, bytes, dict]]:
    """Yield (key, jpeg bytes, record) from one shard, in stored order."""
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
                yield key, parts["jpg"], json.loads(parts["json"])


def list_shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.tar"))
