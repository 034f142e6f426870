"""K-shot subsets of the real train folder, and their images as starting points (He et al., ICLR 2023).

He et al.'s few-shot setting gives a classifier K real images a class (K = 1, 2, 4, 8, 16)
beside the synthetic ones, and their real guidance (RG) starts each synthetic image from one
of them. The few-shot stage draws the K images of every class here and writes them to
data/fewshot/shots.tsv (`write`); sd-generate (with `init_strength` > 0) and the classifier
tuning read that table (`load`, `read`).

Which images. In class c's folder `<data.train>/<folder>/` (folder: its wnid; its key for a
free-form class), every image file f gets the rank `seeds.derive(seed, "shots", c, f.name)`,
and the K-shot set is the K files of lowest rank, in rank order (shot 0 first). Hence:
- reproducible: the same seed and folder give the same set on every machine, whatever order
  the file system lists in;
- nested: the K-shot set is a prefix of the 2K-shot set (1 in 2 in 4 in 8 in 16), so runs
  with different K differ by the added shots only;
- stable: adding or removing other images of a class changes its set only if a new image ranks
  among its K (a shuffle of the sorted listing would redraw every class that changed at all).
To use a K-shot folder of your own, point data.train at it with shots = K: a folder of exactly
K images a class yields all of them (in rank order).

Cost. ImageNet's train folder is 1.28M files. A draw lists only the folders of the classes
asked for, and reads (for its sha256) only the K chosen files of each; its result is cached in
the work folder, keyed by root, seed and K and checked against the folders' listing signature
(`plan.listing_signature`: names and mtimes of the class folders), so drawing again from an
unchanged folder lists nothing but the class folders.
"""
from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from imagenet_sd.core import seeds
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import file_sha256, read_tsv, write_json, write_tsv
from imagenet_sd.core.locks import locked
from imagenet_sd.core.params import require_dir
from imagenet_sd.datasets.plan import listing_signature
from imagenet_sd.prompts.prompts import ClassPrompt

COLUMNS = ["class", "shot", "path", "bytes", "sha256"]
_RERUN = "run: dvc repro few-shot"


@dataclass(frozen=True)
class Shot:
    """One real image of a K-shot subset."""
    key: str            # class key (wnid, or the name of a free-form class)
    shot: int           # 0 .. K-1, in rank order
    path: str           # relative to data.train, with "/" separators
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShotTable:
    """What sd-generate needs of shots.tsv: each class's shots in order, and the table's identity."""
    paths: dict[str, tuple[str, ...]]
    digest: str         # sha256 of shots.tsv: in the work key of real-guided images


# --------------------------------------------------------------------------- drawing

def rank(seed: int, key: str, name: str) -> int:
    """The rank of file `name` in class `key`: its K-shot set is the K lowest."""
    return seeds.derive(seed, "shots", key, name)


def _folder(row: ClassPrompt) -> str:
    return row.wnid or row.key


def _draw_class(root: Path, row: ClassPrompt, shots: int, seed: int, key: str) -> list[list]:
    """[path, bytes, sha256] of the class's K shots, in rank order."""
    from imagenet_sd.datasets.readers import IMAGE_EXTENSIONS
    folder = root / _folder(row)
    name = row.c.split(",")[0]
    if not folder.is_dir():
        raise UserError(f"{key} = {str(root)!r} has no folder for class {row.key} ({name}); add {folder} with at "
                        f"least {shots} images, or set shots: 0")
    files = [e for e in os.scandir(folder) if e.name.endswith(IMAGE_EXTENSIONS) and e.is_file()]
    if len(files) < shots:
        raise UserError(f"{key}: class {row.key} ({name}) has {len(files)} images in {folder}, fewer than "
                        f"shots = {shots}; add images there or set shots to {len(files)} or less")
    chosen = heapq.nsmallest(shots, files, key=lambda e: (rank(seed, row.key, e.name), e.name))
    return [[f"{_folder(row)}/{e.name}", e.stat().st_size, file_sha256(e.path)] for e in chosen]


def _cache_file(cache_dir: Path, root: Path, seed: int, shots: int) -> Path:
    name = hashlib.sha256(f"{root.resolve()}\0{seed}\0{shots}".encode()).hexdigest()[:16]
    return cache_dir / "real-shots" / f"{name}.json"


def _cached(cache: Path | None, signature: str) -> dict[str, list[list]]:
    if cache is None:
        return {}
    try:
        content = json.loads(cache.read_text())
        return content["classes"] if content.get("signature") == signature else {}
    except (OSError, ValueError, KeyError, AttributeError):
        return {}


def draw(rows: list[ClassPrompt], root: Path | None, shots: int, seed: int, key: str,
         cache_dir: Path | None = None) -> list[Shot]:
    """The K-shot subset (K = `shots`) of every class of `rows`, drawn from `root` (see the module doc).

    `key` names the root's param in errors (profiles.<profile>.data.train). `cache_dir`:
    where draws are cached (None: no cache). shots 0 is the zero-shot setting: no images.
    """
    if shots == 0:
        return []
    if root is None:
        raise UserError(f"params.yaml: shots = {shots} needs real images, but {key} is '' (not configured); "
                        "point it at a folder of class folders (ImageNet train, or your own K-shot folder), "
                        "or set shots: 0")
    require_dir(key, root)
    signature, _ = listing_signature(root)
    cache = _cache_file(cache_dir, root, seed, shots) if cache_dir is not None else None
    known = _cached(cache, signature)
    drawn = {r.key: known.get(r.key) or _draw_class(root, r, shots, seed, key) for r in rows}
    if cache is not None and any(k not in known for k in drawn):
        # A cache that cannot be written costs the next draw a listing, nothing else.
        with contextlib.suppress(OSError), locked(cache):
            write_json(cache, {"root": str(root.resolve()), "seed": seed, "shots": shots, "signature": signature,
                               "classes": {**known, **drawn}})
    return [Shot(r.key, i, path, size, sha) for r in sorted(rows, key=lambda r: r.index)
            for i, (path, size, sha) in enumerate(drawn[r.key])]


# --------------------------------------------------------------------------- the table

def write(path: Path, table: list[Shot]) -> None:
    """shots.tsv: one row a shot; none (shots 0): the header only."""
    write_tsv(path, COLUMNS, [[s.key, s.shot, s.path, s.bytes, s.sha256] for s in table])


def _rows(path: Path) -> list[Shot]:
    if not path.is_file():
        raise UserError(f"{path}: K-shot table not found; {_RERUN}")
    try:
        return [Shot(r["class"], int(r["shot"]), r["path"], int(r["bytes"]), r["sha256"]) for r in read_tsv(path)]
    except (KeyError, ValueError, IndexError):
        raise UserError(f"{path}: not a K-shot table (columns {', '.join(COLUMNS)}); {_RERUN}") from None


def _by_class(path: Path) -> dict[str, list[Shot]]:
    """shots.tsv's rows grouped by class, each class's in shot order."""
    found: dict[str, list[Shot]] = {}
    for s in _rows(path):
        found.setdefault(s.key, []).append(s)
    return {key: sorted(shots, key=lambda s: s.shot) for key, shots in found.items()}


def read(path: Path, root: Path | None = None) -> dict[str, list[Path]]:
    """{class key: its K image paths, in shot order} of shots.tsv; paths relative to data.train,
    or under `root` when given. A table of shots 0 gives {}."""
    return {key: [root / s.path if root is not None else Path(s.path) for s in shots]
            for key, shots in _by_class(path).items()}


def load(path: Path, class_keys: list[str], shots: int) -> ShotTable:
    """shots.tsv for generation, checked: K = `shots` shots 0..K-1 for each class of `class_keys`, no other.

    A table made for other classes or another K is stale (made outside `dvc repro`):
    one line saying to run the few-shot stage again.
    """
    found = _by_class(path)
    extra = sorted(set(found) - set(class_keys))
    if extra:
        raise UserError(f"{path}: has shots of class {extra[0]}, which the prompt table lacks; {_RERUN}")
    paths = {}
    for key in class_keys:
        entries = found.get(key, [])
        if [s.shot for s in entries] != list(range(shots)):
            raise UserError(f"{path}: has {len(entries)} shots of class {key}, but shots = {shots}; {_RERUN}")
        paths[key] = tuple(s.path for s in entries)
    return ShotTable(paths=paths, digest=file_sha256(path))


# --------------------------------------------------------------------------- real guidance

def init_image(path: Path, size: int) -> Image.Image:
    """A real image as a generation start: RGB, its shorter side resized to `size` (bicubic, as
    He et al.'s src/glide/glide_fsl.py), then centre-cropped to `size` x `size`.

    JPEGs are decoded at the smallest scale of at least `size` (Pillow's draft mode), which
    keeps small sizes cheap (the rehearsal's 32 px).
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))
            image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: cannot read this real image ({type(exc).__name__}); replace it, "
                        f"or draw the K-shot subset again ({_RERUN})") from None
    width, height = image.size
    scale = size / min(width, height)
    width, height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))
