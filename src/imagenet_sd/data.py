"""Reading images: real image folders, and (in training) the synthetic shards."""
from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG", ".JPG", ".PNG")


def image_files(root: Path) -> dict[str, list[Path]]:
    """{class folder name: sorted image paths} for a folder of class folders.

    Covers ImageNet train/val (wnid folders), ImageNet-Sketch/R/A (wnid folders)
    and ImageNet-v2 (folders 0..999). Folders with no images are left out.
    """
    classes: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.suffix in IMAGE_EXTENSIONS and f.is_file())
        if files:
            classes[folder.name] = files
    return classes
