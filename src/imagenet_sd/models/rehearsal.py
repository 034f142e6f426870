"""The rehearsal generator: a stand-in for Stable Diffusion that makes an image in microseconds.

Select it with `generate.model: rehearsal` (the `rehearsal` profile does). It
draws a small smooth picture (a seeded 4x4 grid of colours, upsampled) from
each image's seed, so it is deterministic per (class, index, seed) like SD, and
goes through exactly the same plan, shards, work folder, locks, resume, publish,
index, DVC outputs and training loader. Only the pixels differ: they carry no
class information, so a model trained on them learns nothing. Its purpose is to
run the whole storage path at the real image counts (1.28M to 64M) on a CPU and
measure what scale costs (`scripts/rehearse_scale.py`).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

NAME = "rehearsal"
GRID = 4


def is_rehearsal(model: str) -> bool:
    return model == NAME


def draw(seeds: list[int], resolution: int) -> list[Image.Image]:
    """One image per seed: a GRID x GRID colour grid from the seed, bilinearly upsampled."""
    images = []
    for seed in seeds:
        cells = np.random.default_rng(seed).integers(0, 256, (GRID, GRID, 3), dtype=np.uint8)
        images.append(Image.fromarray(cells).resize((resolution, resolution), Image.Resampling.BILINEAR))
    return images


def draw_from(seeds: list[int], starts: list[Image.Image], strength: float, resolution: int) -> list[Image.Image]:
    """Real guidance's stand-in: each start (a real image at `resolution`) blended with its seed's
    colour grid, `strength` of the way to the grid (1: the grid alone, as without guidance)."""
    return [Image.blend(start, grid, strength) for start, grid in zip(starts, draw(seeds, resolution))]


class Pipeline:
    """What generation needs of a pipeline: draw a batch (from real images with real guidance),
    tell truncated prompts (none here)."""

    def draw(self, prompts: list[str], seeds: list[int], *, guidance: float, steps: int,
             resolution: int) -> tuple[list[Image.Image], list[bool]]:
        return draw(seeds, resolution), [False] * len(seeds)

    def draw_from(self, prompts: list[str], seeds: list[int], starts: list[Image.Image], *, strength: float,
                  guidance: float, steps: int, resolution: int) -> tuple[list[Image.Image], list[bool]]:
        return draw_from(seeds, starts, strength, resolution), [False] * len(seeds)

    def truncated_prompts(self, prompts: list[str]) -> list[str]:
        return []
