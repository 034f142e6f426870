"""Class sets: which classes a synthetic clone has, and the index of each logit.

The lists live once, in `data/classes/` (sources in `data/classes/SOURCES.md`):
- imagenet1k: the 1000 ILSVRC-2012 wnids, standard class-index order (= sorted wnids).
- imagenet100: the 100 wnids of the CMC subset. Index = sorted wnid order, which is
  what torchvision's ImageFolder gives on an ImageNet-100 folder.
- digits: the ten digits 0-9 as WordNet synsets (zero.n.02, one.n.01 ... nine.n.01); index = the
  digit, which is also sorted wnid order. The digits profile's classes (docs/digits.md).
- custom: a file of your own, one class a line, in file order (see `read_custom`).
- the class subsets of ImageNet-style test sets (ImageNet-R's, ImageNet-A's: `subset_wnids`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.paths import DATA

CLASSES_DIR = DATA / "classes"
WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class ClassSpec:
    index: int                      # logit index of the class in its set
    wnid: str | None                # WordNet noun id, or None for a free-form class
    name: str | None = None         # free-form classes: the class name `c`
    description: str | None = None  # free-form classes: the description `d_c`
    hypernym: str | None = None     # free-form classes: optional `h_c`

    @property
    def key(self) -> str:
        """Stable identifier used in shards, checkpoints and metrics."""
        return self.wnid if self.wnid else self.name


def _wnids(filename: str) -> list[str]:
    return [line.split("\t")[0].strip() for line in (CLASSES_DIR / filename).read_text().splitlines()
            if line.strip()]


@cache
def imagenet1k_wnids() -> tuple[str, ...]:
    return tuple(_wnids("imagenet1k.tsv"))


@cache
def imagenet100_wnids() -> tuple[str, ...]:
    return tuple(sorted(_wnids("imagenet100.txt")))


@cache
def digits_wnids() -> tuple[str, ...]:
    return tuple(_wnids("digits.txt"))


@cache
def subset_wnids(filename: str) -> frozenset[str]:
    """A class subset of ImageNet-1K listed in data/classes/: the classes of a test set that covers
    only some (ImageNet-R's and ImageNet-A's 200; datasets/imagenet_sets.py names the file)."""
    return frozenset(_wnids(filename))


def read_custom(path: Path) -> list[ClassSpec]:
    """Parse a custom class file.

    Each non-empty line not starting with '#' is either a WordNet id
    (`n02086910`) or a free-form class `name<TAB>description[<TAB>hypernym]`,
    the paper's "applicability beyond ImageNet". Both forms may be mixed.
    """
    specs: list[ClassSpec] = []
    seen: set[str] = set()
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in line.split("\t")]
        where = f"{path}:{lineno}"
        if len(cells) == 1 and WNID.match(cells[0]):
            spec = ClassSpec(index=len(specs), wnid=cells[0])
        elif len(cells) in (2, 3) and all(cells):
            spec = ClassSpec(index=len(specs), wnid=None, name=cells[0], description=cells[1],
                             hypernym=cells[2] if len(cells) == 3 else None)
        else:
            raise UserError(f"{where}: expected a WordNet id like n02086910, or "
                            f"'name<TAB>description[<TAB>hypernym]'; got {line.strip()!r}")
        if spec.key in seen:
            raise UserError(f"{where}: class {spec.key!r} is listed twice; keep one line per class")
        seen.add(spec.key)
        specs.append(spec)
    if not specs:
        raise UserError(f"{path}: no classes in the file; add one class a line")
    return specs


def load_class_set(name: str, custom_file: Path | None = None) -> list[ClassSpec]:
    if name == "imagenet1k":
        wnids = imagenet1k_wnids()
    elif name == "imagenet100":
        wnids = imagenet100_wnids()
    elif name == "digits":
        wnids = digits_wnids()
    elif name == "custom":
        if custom_file is None or not custom_file.is_file():
            raise UserError(f"params.yaml: custom_classes = {str(custom_file)!r}: no such file; "
                            "create it or point custom_classes at an existing one")
        return read_custom(custom_file)
    else:
        raise UserError(f"params.yaml: classes = {name!r} is not valid; allowed: imagenet100 | imagenet1k | digits | custom")
    return [ClassSpec(index=i, wnid=w) for i, w in enumerate(wnids)]
