"""Fixture datasets: tiny stand-ins for ImageNet and a transfer set, in their real layouts.

Built by setup into `data/fixtures/` so the embedded profile runs the whole
pipeline with no download. Images are small, deterministic and class-dependent
(a colour and a shape per class) so that a model could in principle learn them;
they are NOT real photos and accuracies measured on them mean nothing.

    python -m imagenet_sd.datasets.fixtures data/fixtures
"""
from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imagenet_sd.core.seeds import derive
from imagenet_sd.datasets.imagenet_sets import TEST_SETS
from imagenet_sd.prompts import classes

VERSION = "2"   # bump when the layout or content changes; setup rebuilds
SIZE = 80
TRANSFER_CLASSES = ("banded", "dotted", "striped", "zigzagged", "checkered")
COG_CONCEPTS, COG_TRAIN, COG_TEST = 3, 6, 2     # per level; the real benchmark: 1,000, 732-1,300, 50


def _image(class_key: str, i: int) -> Image.Image:
    rng = np.random.default_rng(derive(0, "fixture", class_key, i))
    base = np.random.default_rng(derive(0, "fixture-class", class_key)).integers(0, 256, 3)
    pixels = np.clip(base + rng.normal(0, 25, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    shape = derive(0, "fixture-shape", class_key) % 3
    x, y = rng.integers(10, SIZE - 40, 2)
    box = [int(x), int(y), int(x) + 30, int(y) + 30]
    colour = tuple(int(255 - c) for c in base)
    [draw.ellipse, draw.rectangle, lambda b, fill: draw.polygon(
        [(b[0], b[3]), ((b[0] + b[2]) // 2, b[1]), (b[2], b[3])], fill=fill)][shape](box, fill=colour)
    return img


def _write_folder(root: Path, folder_name: str, class_key: str, count: int, start: int = 0) -> None:
    folder = root / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        _image(class_key, i).save(folder / f"{class_key}_{i:04d}.JPEG", quality=90)


def build(out: Path) -> None:
    """Write every fixture set under `out` (replaced if it exists)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    in100 = classes.imagenet100_wnids()
    in1k = classes.imagenet1k_wnids()
    # A few ImageNet-1K classes outside ImageNet-100, so evaluation must filter.
    outside = [w for w in in1k if w not in set(in100)][:3]
    for k, wnid in enumerate(in100):
        # 3 to 5 train images: keeps ImageNet's class imbalance in miniature.
        _write_folder(tmp / "imagenet" / "train", wnid, wnid, 3 + k % 3)
    for wnid in list(in100) + outside:
        _write_folder(tmp / "imagenet" / "val", wnid, wnid, 1, start=100)
        _write_folder(tmp / "imagenet-v2", str(in1k.index(wnid)), wnid, 1, start=200)
        _write_folder(tmp / "imagenet-sketch", wnid, wnid, 1, start=300)
    for name, subset in (("imagenet-r", classes.subset_wnids(TEST_SETS["r"].classes)),
                         ("imagenet-a", classes.subset_wnids(TEST_SETS["a"].classes))):
        shared = [w for w in in100 if w in subset]
        others = sorted(subset - set(in100))[:3]
        for wnid in shared + others:
            _write_folder(tmp / name, wnid, wnid, 1, start=400)
    for name in TRANSFER_CLASSES:
        key = f"transfer-{name}"
        _write_folder(tmp / "transfer" / "textures" / "train", name, key, 8)
        _write_folder(tmp / "transfer" / "textures" / "test", name, key, 4, start=8)
    _write_cog(tmp / "cog")
    (tmp / "VERSION").write_text(VERSION + "\n")
    (tmp / "README.md").write_text(
        "Fixture data built by `python -m imagenet_sd.datasets.fixtures`; synthetic shapes, not real images.\n"
        "Layouts: imagenet/{train,val}/<wnid>/, imagenet-v2/<class index>/, "
        "imagenet-{sketch,r,a}/<wnid>/, transfer/<name>/{train,test}/<class>/,\n"
        "cog/ (ImageNet-CoG's two pickle files and images/<wnid>/; made-up wnids n99LLLKKK).\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _write_cog(root: Path) -> None:
    """ImageNet-CoG in miniature: its two files, in the official format, and the images they name."""
    levels, concepts = [], {}
    for level in range(1, 6):
        wnids = [f"n99{level:03d}{k:03d}" for k in range(COG_CONCEPTS)]
        levels.append(wnids)
        for wnid in wnids:
            _write_folder(root / "images", wnid, wnid, COG_TRAIN + COG_TEST)
            files = [f"{wnid}/{wnid}_{i:04d}.JPEG" for i in range(COG_TRAIN + COG_TEST)]
            # The official lists are numpy string arrays, some paths with a leading '/'.
            concepts[wnid] = {"train": np.array(["/" + f for f in files[:COG_TRAIN]]),
                              "test": np.array(files[COG_TRAIN:])}
    for name, content in (("cog_levels_mapping_file.pkl", levels), ("cog_concepts_split_file.pkl", concepts)):
        with open(root / name, "wb") as f:
            pickle.dump(content, f)


def is_current(out: Path) -> bool:
    return (out / "VERSION").is_file() and (out / "VERSION").read_text().strip() == VERSION


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "data/fixtures")
    if is_current(target):
        print(f"fixtures already built in {target}")
    else:
        build(target)
        print(f"built fixtures in {target}")
