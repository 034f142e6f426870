"""Figures for `dvc plots`: the sample grid of generated images (the paper's Fig. 2).

The grid is drawn from the shards themselves, after JPEG encoding, so it shows
exactly what training sees.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from imagenet_sd.core.io import replacing
from imagenet_sd.datasets import shards
from imagenet_sd.prompts.prompts import ClassPrompt

# The paper's Fig. 2 shows these classes; a sample grid of a class set that has them shows them first,
# so that every run's grid, and the report's Fig. 2 made of them, compare the same classes.
FIGURE2_CLASSES = {"n02086910": "papillon", "n01820546": "lorikeet", "n03947888": "pirate ship"}
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def pick_classes(rows: list[ClassPrompt], count: int) -> list[ClassPrompt]:
    """Fig. 2's classes, then classes spread evenly over the logit order (not just the first few, which
    are alike), `count` in all."""
    ordered = sorted(rows, key=lambda r: r.index)
    if len(ordered) <= count:
        return ordered
    first = [r for r in ordered if r.wnid in FIGURE2_CLASSES][:count]
    rest = [r for r in ordered if r not in first]
    fill = count - len(first)
    step = (len(rest) - 1) / (fill - 1) if fill > 1 else 0
    return first + [rest[round(i * step)] for i in range(fill)]


def collect(shard_dir: Path, keys: list[str], per_class: int) -> dict[str, list[Image.Image]]:
    """Up to `per_class` images of each class in `keys`, in shard order.

    Shards are ordered round-robin over classes, so this stops after the first
    few shards even for a full-size dataset.
    """
    found: dict[str, list[Image.Image]] = {k: [] for k in keys}
    for path in shards.list_shards(shard_dir):
        for _, jpeg, record in shards.iter_shard(path):
            images = found.get(record.get("class")) if record else None
            if images is not None and len(images) < per_class:
                with Image.open(io.BytesIO(jpeg)) as image:
                    images.append(image.convert("RGB"))
        if all(len(v) == per_class for v in found.values()):
            break
    return found


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:       # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def draw_grid(rows: list[tuple[str, list[Image.Image]]], columns: int, cell: int = 128,
              label_width: int = 160) -> Image.Image:
    """Rows of images, each row labelled on the left."""
    font, pad = _font(max(12, cell // 8)), 4
    grid = Image.new("RGB", (label_width + columns * (cell + pad), len(rows) * (cell + pad)), BACKGROUND)
    pen = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        top = r * (cell + pad)
        lines = _wrap(label, font, label_width - 2 * pad)
        line_height = font.getbbox("Ag")[3] + 2
        y = top + (cell - line_height * len(lines)) // 2
        for line in lines:
            pen.text((pad, y), line, fill=INK, font=font)
            y += line_height
        for c, image in enumerate(images[:columns]):
            grid.paste(image.resize((cell, cell), Image.Resampling.BICUBIC), (label_width + c * (cell + pad), top))
    return grid


def save_png(image: Image.Image, path: Path) -> None:
    """Write the PNG under a temporary name, then rename: never a half-written file."""
    with replacing(path) as tmp:
        image.save(tmp, format="PNG")


def sample_grid(shard_dir: Path, rows: list[ClassPrompt], out: Path, classes: int = 8,
                per_class: int = 6) -> Path:
    """Grid of up to `classes` classes x `per_class` generated images, labelled with the class name."""
    chosen = pick_classes(rows, classes)
    images = collect(shard_dir, [r.key for r in chosen], per_class)
    filled = [(r.c.split(",")[0].strip(), images[r.key]) for r in chosen if images[r.key]]
    if not filled:
        raise ValueError(f"{shard_dir}: no generated images of the classes to show")
    save_png(draw_grid(filled, columns=max(len(v) for _, v in filled)), out)
    return out
