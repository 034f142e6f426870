"""The classifier network: a backbone (`arch`) whose own linear classifier a head (models/heads/) may
replace. Training (train/) builds it with `build`; checkpoint loading (evaluate/checkpoints.py)
with the same `build` and the head a checkpoint names, then loads its weights.

The one backbone is torchvision's ResNet-50 from random weights, its classifier `fc`: the
checkpoint keys are torchvision's, so a checkpoint with the linear head loads into a plain
torchvision or timm resnet50. `features` is the backbone's forward without its classifier, for
heads that run the trunk and the head separately.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from imagenet_sd.models.heads.base import Head

ARCHS = ("resnet50",)       # what a checkpoint's `arch` may be


def build(arch: str, head: Head, num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """`arch` from random weights, its classifier replaced by what `head` makes of it.

    `zero_init_residual`: each residual block's last BatchNorm starts at 0 (Goyal et al.).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")
    net = torchvision.models.resnet50(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    net.fc = head.module(net.fc, num_classes)
    return net


def features(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features: a torchvision ResNet's forward without `fc`."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)
