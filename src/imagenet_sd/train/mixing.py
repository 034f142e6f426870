"""Mixup (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) as DeiT trains with them
(timm's `Mixup`, mode "batch"): every step mixes each image with the batch read backwards, by
Mixup or, where both are on, by one of the two with p 0.5; every crop of the step gets the same
mixing, and the targets are the two labels weighted by what each image keeps (CutMix: the box's
area as cut, after clipping). Label smoothing is the loss's (recipe.multicrop_loss).

The draws come from a NumPy generator seeded by the step's own seed (the loop derives it from
seed, epoch, rank and step), so a run resumed mid-epoch mixes its next step as an uninterrupted
run does, without replaying earlier steps.

Docs: docs/training.md#the-vit-b-recipe
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from imagenet_sd.core.params import TrainParams


class Mixing:
    """(crops, labels) of a step -> (mixed crops, soft targets (B, classes))."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int):
        self.mixup, self.cutmix, self.num_classes = mixup, cutmix, num_classes

    @classmethod
    def from_params(cls, tp: TrainParams, num_classes: int) -> "Mixing | None":
        """The mixing `tp` asks for; None when Mixup and CutMix are both off."""
        if not (tp.mixup or tp.cutmix):
            return None
        return cls(tp.mixup, tp.cutmix, num_classes)

    def __call__(self, crops: list[torch.Tensor], labels: torch.Tensor, seed: int
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`seed`: the step's; the same seed mixes the same way."""
        rng = np.random.default_rng(seed)
        use_cutmix = bool(self.cutmix) and (not self.mixup or rng.random() < 0.5)
        lam = float(rng.beta(self.cutmix, self.cutmix) if use_cutmix else rng.beta(self.mixup, self.mixup))
        if use_cutmix:
            box = _box(lam, rng)
            crops = [_paste(c, box) for c in crops]
            top, bottom, left, right = _pixels(box, crops[0].shape[-1])
            lam = 1 - (bottom - top) * (right - left) / crops[0].shape[-1] ** 2
        else:
            crops = [c.mul(lam).add_(c.flip(0), alpha=1 - lam) for c in crops]
        one_hot = F.one_hot(labels, self.num_classes).float()
        return crops, one_hot.mul(lam).add_(one_hot.flip(0), alpha=1 - lam)


def _box(lam: float, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """CutMix's box as fractions of the crop (top, bottom, left, right): sides sqrt(1 - lam) of the
    crop's, centred at a uniform point, clipped to the crop."""
    side = math.sqrt(1 - lam)
    cy, cx = rng.random(), rng.random()
    return (max(cy - side / 2, 0.0), min(cy + side / 2, 1.0), max(cx - side / 2, 0.0), min(cx + side / 2, 1.0))


def _pixels(box: tuple[float, float, float, float], size: int) -> tuple[int, int, int, int]:
    return tuple(round(v * size) for v in box)


def _paste(crops: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    """`crops` (B, C, s, s) with the box of each replaced by the same box of the batch read backwards."""
    top, bottom, left, right = _pixels(box, crops.shape[-1])
    mixed = crops.clone()
    mixed[..., top:bottom, left:right] = crops.flip(0)[..., top:bottom, left:right]
    return mixed
