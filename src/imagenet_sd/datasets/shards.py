"""Tar shards in the WebDataset layout: `<key>.jpg` + `<key>.json` per image.

Millions of loose files make DVC slow (it hashes ~14k files/s); a few hundred
shards do not. Keys are `<label:05d>_<image index:07d>`: numbers only, because
WebDataset splits a member name at its first dot, USTAR names stop at 100
characters, and two class names must never map to one key. The class name
travels in the JSON record.

A shard is written under a temporary name and renamed when complete, so a shard
that exists is whole. `sd-generate` also keeps a manifest beside each shard in
its work folder (size, mtime, sha256, written once, after the shard): a shard
whose size and mtime match its manifest is finished, and only `verify` re-reads
its bytes; anything else is redone.
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

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import atomic_write_text, replacing
from imagenet_sd.core.io import file_sha256 as sha256

SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_FILE = "index.json"
_WORK_NAME = re.compile(r"shard-(\d+)\.([0-9a-z]+)\.tar")


def sample_key(label: int, image_index: int) -> str:
    return f"{label:05d}_{image_index:07d}"


def parse_key(key: str) -> tuple[int, int] | None:
    """(label, image index) of a sample key, None for a foreign one."""
    label, _, index = key.partition("_")
    return (int(label), int(index)) if label.isdigit() and index.isdigit() else None


def work_name(number: int, tag: str) -> str:
    """A shard's name in the work folder: `shard-000005.<content tag>.tar`."""
    return f"shard-{number:06d}.{tag}.tar"


def finished_in(folder: Path, verify: bool = False) -> dict[str, dict]:
    """{work-folder shard name: manifest} of every finished shard in `folder`, from one listing.

    Finished: the manifest exists and the shard's size and mtime are the ones it
    recorded (with `verify`, its sha256 too: a full read of every shard).
    """
    try:
        entries = {e.name: e for e in os.scandir(folder)}
    except FileNotFoundError:
        return {}
    finished = {}
    for name, entry in entries.items():
        if not _WORK_NAME.fullmatch(name) or manifest_path(Path(name)).name not in entries:
            continue
        manifest = read_manifest(Path(entry.path))
        if manifest is not None and matches(Path(entry.path), manifest, verify, entry.stat()):
            finished[name] = manifest
    return finished


def versions(finished) -> dict[int, list[str]]:
    """{shard number: work-folder names of its finished versions}, e.g. of other scales."""
    by_number: dict[int, list[str]] = {}
    for name in sorted(finished):
        by_number.setdefault(int(_WORK_NAME.fullmatch(name).group(1)), []).append(name)
    return by_number


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


def write_manifest(shard: Path, manifest: dict) -> dict:
    """Written after the shard itself, with its mtime: a manifest means the shard was finished."""
    manifest = dict(manifest, mtime_ns=shard.stat().st_mtime_ns)
    atomic_write_text(manifest_path(shard), json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(shard: Path) -> dict | None:
    try:
        manifest = json.loads(manifest_path(shard).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def matches(shard: Path, manifest: dict, verify: bool = False, stat: os.stat_result | None = None) -> bool:
    """True if `shard` is the file its manifest describes: size and mtime, and sha256 with `verify`.

    Catches a shard killed before its manifest, truncated, or rewritten since.
    """
    try:
        stat = stat or shard.stat()
    except OSError:
        return False
    if stat.st_size != manifest.get("bytes") or stat.st_mtime_ns != manifest.get("mtime_ns"):
        return False
    return not verify or sha256(shard) == manifest.get("sha256")


def is_finished(shard: Path, verify: bool = False) -> bool:
    manifest = read_manifest(shard)
    return manifest is not None and matches(shard, manifest, verify)


def list_shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.tar"))


def read_index(folder: Path) -> dict:
    """index.json of a published dataset, with a clear error when it is missing or damaged."""
    path = folder / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}: missing or not valid JSON; run: dvc repro sd-generate") from None
    if not isinstance(index, dict) or not {"classes", "counts", "shards"} <= set(index):
        raise UserError(f"{path}: not an index written by sd-generate; run: dvc repro sd-generate")
    return index
