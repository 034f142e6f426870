"""A cosine classifier head (`train.head: cosine`): logits are a learned scale times the cosine of
the L2-normalised pooled feature with each class's L2-normalised weight vector (Gidaris and
Komodakis, "Dynamic few-shot visual learning without forgetting", CVPR 2018; Chen et al.'s
Baseline++, ICLR 2019). Normalising both sides takes the feature's and the weights' norms out of
the logits, so no class wins by a larger weight vector; the scale (start SCALE, learned, without
weight decay as a 0-d parameter) sets how peaked the softmax can get.

The weights start as torchvision's `fc` weights (its init, no extra random draws), trained like
the linear head's under the same multi-crop cross-entropy; no settings, no extra training state.

Docs: docs/training.md#the-cosine-head
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagenet_sd.models.heads.base import Head

SCALE = 10.0        # Gidaris and Komodakis' initial scale


class CosineClassifier(nn.Module):
    """Pooled features -> scale x cos(feature, class weight)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.scale = nn.Parameter(torch.tensor(SCALE))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(pooled, dim=1) @ F.normalize(self.weight, dim=1).T


class Cosine(Head):
    """The cosine classifier in `fc`'s place, started from `fc`'s weights."""

    def module(self, fc: nn.Linear, num_classes: int) -> nn.Module:
        return CosineClassifier(fc.weight)
