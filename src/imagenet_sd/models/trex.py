"""t-ReX's classifier head as a model (`train.head: trex`), after the CVPR 2023 authors' training
code (naver/trex, `trex.py`; Sariyildiz et al., "No reason for no supervision", ICLR 2023).

The ResNet-50's pooled 2048-d feature goes through a projector (L2-normalised input, three
Linear-BatchNorm-GELU layers of 2048, a bias-free Linear to 256) and is classified by cosine
similarity with class prototypes, divided by a temperature of 0.1. The prototypes are not
learnt: they are the L2-normalised per-class sums of a FIFO memory of projector outputs (its
entries written in training by module train.trex). The memory starts as random features with
random labels, as theirs, so every class has a prototype from the first step.

`TrexHead` is the ResNet's `fc`: the checkpoint is a torchvision resnet50 whose fc is this head
(memory included); evaluation classifies through `net.fc` as with the linear head, and
eval-transfer takes the pooled features by replacing `fc`.

Docs: docs/training.md#the-t-rex-head
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# naver/trex's defaults (trex.py, main.py): the model of its `memory_size=8192` runs.
FEATURES, HIDDEN, LAYERS, BOTTLENECK = 2048, 2048, 3, 256
TEMPERATURE = 0.1


class Projector(nn.Sequential):
    """L2-normalised input, LAYERS x (Linear, BatchNorm1d, GELU) of HIDDEN, a bias-free Linear to BOTTLENECK."""

    def __init__(self):
        layers, width = [], FEATURES
        for _ in range(LAYERS):
            layers += [nn.Linear(width, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.GELU()]
            width = HIDDEN
        super().__init__(*layers, nn.Linear(width, BOTTLENECK, bias=False))
        for layer in self:
            if isinstance(layer, nn.Linear):     # t-ReX's init of its head (truncated normal, std 0.02)
                nn.init.trunc_normal_(layer.weight, std=0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return super().forward(F.normalize(pooled, dim=1))


class TrexHead(nn.Module):
    """Pooled features -> logits: cosine with the memory's class prototypes / TEMPERATURE."""

    def __init__(self, num_classes: int, memory: int):
        super().__init__()
        self.num_classes = num_classes
        self.projector = Projector()
        self.register_buffer("memory", torch.randn(memory, BOTTLENECK))
        self.register_buffer("memory_labels", torch.randint(0, num_classes, (memory,)))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    def prototypes(self) -> torch.Tensor:
        sums = torch.zeros(self.num_classes, BOTTLENECK, device=self.memory.device).index_add_(
            0, self.memory_labels, self.memory)
        return F.normalize(sums, dim=1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        embedded = F.normalize(self.projector(pooled).float(), dim=1)
        return embedded @ self.prototypes().T / TEMPERATURE

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write entries in FIFO order from the pointer, wrapping around (of more entries than the
        memory holds, the last ones)."""
        count, size = len(features), len(self.memory)
        keep = min(count, size)
        positions = (self.pointer + count - keep + torch.arange(keep, device=features.device)) % size
        self.memory[positions] = features[count - keep:].float()
        self.memory_labels[positions] = labels[count - keep:]
        self.pointer.copy_((self.pointer + count) % size)


def pooled(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet's pooled features (its forward without `fc`)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)
