"""Places365 scenes as backgrounds `b` for the prompt "c, h_c inside b".

Phrase rule for a category `/x/name[/qualifier]`: drop the leading letter folder,
underscores become spaces, and a qualifier goes in front of the name:
`/a/airfield` -> "airfield", `/c/church/indoor` -> "indoor church",
`/s/stadium/baseball` -> "baseball stadium", `/b/bakery/shop` -> "shop bakery".

Scene rule: image i of class c gets scene `permutation_c[i mod 365]`, where
`permutation_c` is a shuffle of the 365 scenes seeded by the class key alone.
So every class cycles through all 365 scenes (counts differ by at most one
between scenes), each class starts at a different scene, and (class, i) always
maps to the same scene whatever the dataset size, scale, seed or process count.
"""
from __future__ import annotations

import hashlib
import random
from functools import cache
from pathlib import Path

from .errors import UserError
from .io import read_tsv, write_tsv

CATEGORIES_FILE = Path(__file__).resolve().parents[2] / "data" / "places365" / "categories_places365.txt"
NUM_SCENES = 365
COLUMNS = ["index", "category", "phrase"]


def phrase(category: str) -> str:
    parts = [p for p in category.strip().split("/") if p]
    if len(parts) < 2 or len(parts[0]) != 1:
        raise ValueError(f"not a Places365 category: {category!r}")
    name, qualifier = parts[1], parts[2:]
    return " ".join(qualifier + [name]).replace("_", " ")


def read_categories(path: Path = CATEGORIES_FILE) -> list[str]:
    """Categories in index order from the official `/x/name index` file."""
    pairs = [line.split() for line in path.read_text().splitlines() if line.strip()]
    categories = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
    if [int(i) for _, i in sorted(pairs, key=lambda p: int(p[1]))] != list(range(len(pairs))):
        raise UserError(f"{path}: indices are not 0..{len(pairs) - 1}; use the official Places365 list")
    return categories


def build(path: Path = CATEGORIES_FILE) -> list[tuple[int, str, str]]:
    return [(i, category, phrase(category)) for i, category in enumerate(read_categories(path))]


def write(path: Path, rows: list[tuple[int, str, str]]) -> None:
    write_tsv(path, COLUMNS, [list(r) for r in rows])


def read_phrases(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: background table not found; run: dvc repro places-backgrounds")
    return [row["phrase"] for row in read_tsv(path)]


@cache
def _permutation(class_key: str, num_scenes: int) -> tuple[int, ...]:
    # Seeded by a hash of the class key (not Python's salted hash()), so it is the
    # same in every process and on every machine.
    seed = int.from_bytes(hashlib.sha256(f"places365/{class_key}".encode()).digest()[:8], "big")
    order = list(range(num_scenes))
    random.Random(seed).shuffle(order)
    return tuple(order)


def scene_for(class_key: str, image_index: int, num_scenes: int = NUM_SCENES) -> int:
    """Index of the scene used as background for image `image_index` of a class."""
    return _permutation(class_key, num_scenes)[image_index % num_scenes]
