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

Matched scenes (prompt c_hc_bm): the places-backgrounds stage ranks, per class, the
365 scenes by their similarity to the class (module `matching`) and writes the
class's top `background_top_k` to `matched.tsv` (`write_matched`). Image i of class c
then gets scene `top_k_c[scene_for(c, i, k)]`: the same rule over the k scenes
instead of the 365, so each class cycles through its k scenes.
"""
from __future__ import annotations

import hashlib
import random
from functools import cache
from pathlib import Path

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import read_tsv, write_tsv
from imagenet_sd.core.paths import DATA
from imagenet_sd.prompts.prompts import MATCHED

CATEGORIES_FILE = DATA / "places365" / "categories_places365.txt"
NUM_SCENES = 365
COLUMNS = ["index", "category", "phrase"]
# matched.tsv: one row per (class, rank); `name` (the class's first lemma) is only there to be read by a person.
MATCHED_COLUMNS = ["class", "name", "rank", "scene", "phrase", "similarity"]
_RERUN = "run: dvc repro places-backgrounds"


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


# --------------------------------------------------------------------------- matched scenes (c_hc_bm)

def write_matched(path: Path, rows: list[tuple[str, str, int, int, str, float]]) -> None:
    """(class key, name, rank from 1, scene index, phrase, cosine similarity) rows; none: the header only."""
    write_tsv(path, MATCHED_COLUMNS, [[key, name, rank, scene, text, f"{similarity:.6f}"]
                                      for key, name, rank, scene, text, similarity in rows])


def read_matched(path: Path, class_keys: list[str], top_k: int, phrases: list[str]) -> dict[str, tuple[int, ...]]:
    """{class key: its scene indices, best first} from matched.tsv, checked against the classes, k and phrases.

    A table made for other classes, another `background_top_k` or another scene list
    is stale (made outside `dvc repro`): one line saying to run the stage again.
    """
    if not path.is_file():
        raise UserError(f"{path}: matched background table not found, which prompt = {MATCHED} needs; {_RERUN}")
    try:
        table = [(r["class"], int(r["rank"]), int(r["scene"]), r["phrase"]) for r in read_tsv(path)]
    except (KeyError, ValueError, IndexError):
        raise UserError(f"{path}: not a matched background table (columns {', '.join(MATCHED_COLUMNS)}); "
                        f"{_RERUN}") from None
    if not table:
        raise UserError(f"{path}: no matched backgrounds (the stage writes them only when prompt = {MATCHED}); "
                        f"{_RERUN}")
    found: dict[str, list[tuple[int, int, str]]] = {}
    for key, rank, scene, text in table:
        found.setdefault(key, []).append((rank, scene, text))
    extra = sorted(set(found) - set(class_keys))
    if extra:
        raise UserError(f"{path}: has scenes for class {extra[0]}, which the prompt table lacks; "
                        f"it was made for other classes; {_RERUN}")
    matched = {}
    for key in class_keys:
        entries = sorted(found.get(key, []))
        scenes = tuple(scene for _, scene, _ in entries)
        if not entries:
            problem = f"has no scenes for class {key}"
        elif len(entries) != top_k:
            problem = f"has {len(entries)} scenes for class {key}, but background_top_k = {top_k}"
        elif ([rank for rank, _, _ in entries] != list(range(1, top_k + 1)) or len(set(scenes)) != top_k
              or not all(0 <= scene < len(phrases) and phrases[scene] == text for _, scene, text in entries)):
            problem = f"does not match the background table for class {key} (ranks 1..k, distinct scenes, phrases)"
        else:
            matched[key] = scenes
            continue
        raise UserError(f"{path}: {problem}; it was made for other settings; {_RERUN}")
    return matched


def matched_scene_for(scenes: tuple[int, ...], class_key: str, image_index: int) -> int:
    """Index of the scene of image `image_index` of a class whose matched scenes are `scenes` (best first)."""
    return scenes[scene_for(class_key, image_index, len(scenes))]
