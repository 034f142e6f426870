"""The linear head (`train.head: linear`, the default): the backbone's own classifier, torchvision's
`fc`, trained with cross-entropy: the paper's "encoder and classifier". Its checkpoint is a plain
torchvision resnet50 (docs/training.md#using-the-trained-model-elsewhere).

Docs: docs/training.md#the-linear-head
"""
from __future__ import annotations

from torch import nn

from imagenet_sd.models.heads.base import Head


class Linear(Head):
    """torchvision's `fc`, kept as the backbone builds it."""

    def module(self, fc: nn.Linear, num_classes: int) -> nn.Module:
        return fc
