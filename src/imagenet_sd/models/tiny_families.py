"""Builds every family's tiny random-weight model (models/families/: each family's `tiny`).

Each is its family's diffusers pipeline with the real architecture's component classes (UNet with
SDXL's text-time conditioning, SD3's MMDiT, PixArt's DiT with adaLN-single, FLUX's double- and
single-stream transformer; their two or three text encoders; a 4- or 16-channel KL autoencoder that
downsamples by 8) at a size that draws 64 px images on two CPU cores. Like the tiny SD (module
embedded, which is the `sd` family's), they exist so that every family runs through sd-generate,
the shards and training without downloads; their images are noise.

Weights come from fixed seeds (each family's Tiny.seed), so every build is the same bytes.
Schedulers are the real checkpoints' configs where data/ ships them (families' folders in data/,
SOURCE.md there), else the family's scheduler class (module tiny_parts).

Build: `python -m imagenet_sd.models.tiny_families models` (the embedded-assets stage runs it)
-> models/tiny-sd, models/tiny-sdxl, models/tiny-sd3, models/tiny-pixart-sigma, models/tiny-flux.
"""
from __future__ import annotations

import sys
from pathlib import Path

from imagenet_sd.models import embedded, families

MARKER = embedded.MARKER             # the same marker file as the tiny SD: "an embedded model, version N"
FOLDERS = {name: f.tiny.folder for name, f in families.FAMILIES.items() if f.tiny is not None}


def assemble(family: str, workdir: Path):
    """The tiny pipeline of `family` (random weights from its seed), not yet saved."""
    import torch
    tiny = families.FAMILIES[family].tiny
    if tiny.seed is not None:
        torch.manual_seed(tiny.seed)
    return tiny.assemble(workdir)


def version(family: str) -> int:
    return families.FAMILIES[family].tiny.version


def is_current(family: str, out_dir: Path) -> bool:
    return embedded.is_current(out_dir, MARKER, version(family))


def build(family: str, out_dir: Path) -> bool:
    """Build the tiny `family` pipeline into `out_dir` unless it is there and current; True if built."""
    return embedded.build_folder(
        out_dir, lambda work, folder: assemble(family, work).save_pretrained(folder, safe_serialization=True),
        MARKER, version(family))


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else Path("models")
    for family, folder in FOLDERS.items():
        embedded.build_command([str(root / folder)], root / folder, lambda out, f=family: build(f, out),
                               f"tiny {family}", version(family))


if __name__ == "__main__":
    main(sys.argv[1:])
