"""The paper's reported numbers (Tables 1 and 2), as data: data/paper/table1.tsv and table2.tsv; and the
ViT-B numbers the vit-b group is compared with (data/paper/vit_b.tsv, from Deliberate Practice's Table 1).

One source for every comparison with the paper. The files carry their source in their
header comments; cells are percent, '-' where a column does not apply (a real-data
row has no guidance).
"""
from __future__ import annotations

from pathlib import Path

from imagenet_sd.core.paths import DATA
from imagenet_sd.datasets.imagenet_sets import TEST_SETS as ALL_TEST_SETS

FOLDER = DATA / "paper"
TEXT_COLUMNS = ("training_data", "relative_size", "guidance", "prompt_or_model",
                "setting", "source", "images", "iterations", "match", "note")

# Table 1's test sets (metrics key, the paper's name; * a class subset, scored on its shared classes)
# in the paper's order, from datasets/imagenet_sets.py, and Table 2's datasets (metrics keys); Fig. 1 groups
# the transfer datasets as Sec. 5.3 does: eight small-scale, two long-tail, and ImageNet-CoG's five
# levels (module cog names them cog_l1..cog_l5).
TEST_SETS = tuple((t.name, t.label + ("*" if t.classes else "")) for t in ALL_TEST_SETS.values() if t.in_paper)
SMALL_SCALE = ("aircraft", "cars", "dtd", "eurosat", "flowers", "pets", "food", "sun397")
LONG_TAIL = ("inat2018", "inat2019")
TRANSFER = SMALL_SCALE + LONG_TAIL
COG_LEVELS = tuple(f"cog_l{i}" for i in range(1, 6))


def table(number: int, folder: Path = FOLDER) -> list[dict]:
    """Rows of Table `number` (1 or 2) as dicts: `row` an int, scores floats, the rest as written."""
    return rows(f"table{number}", folder)


def rows(name: str, folder: Path = FOLDER) -> list[dict]:
    """Rows of data/paper/<name>.tsv as dicts: `row` an int, scores floats ('-': None), the rest as written."""
    lines = [line for line in (folder / f"{name}.tsv").read_text().splitlines()
             if line and not line.startswith("#")]
    header = lines[0].split("\t")
    found = []
    for line in lines[1:]:
        cells = dict(zip(header, line.split("\t")))
        found.append({key: int(value) if key == "row" else value if key in TEXT_COLUMNS
                      else None if value == "-" else float(value) for key, value in cells.items()})
    return found
