"""What a training head is (`train.head`): a `Head` subclass, one module a head, registered in
models/heads/__init__.py. Training, checkpoint loading and evaluation ask the head; none of them
branch on its name.

A head decides:
- `module`: what takes the place of the backbone's own linear classifier (`fc`), so the
  checkpoint's `fc.*` tensors are the head's;
- `from_params` / `from_checkpoint`: its settings, from params.yaml's train section or from a
  checkpoint's `fc.*` tensors (a head with no settings keeps the defaults);
- `crop_logits`: how a training step's crops become logits (default: the whole network on each
  crop size);
- `training`: what it trains beside the network (`HeadTraining`; default: nothing);
- `mixable`: whether Mixup and CutMix may mix the images it trains on.

Docs: docs/layout.md#a-training-head
"""
from __future__ import annotations

import abc
from typing import Callable, Protocol

import torch
from torch import nn
from torch.distributed.algorithms.join import Joinable

from imagenet_sd.core.params import TrainParams

Logits = tuple[torch.Tensor, torch.Tensor | None]     # (global crops' logits, local crops' logits or None)


class HeadTraining(Protocol):
    """A head's training state beside the network (t-ReX: its moving average and memory writer).

    `after_backward` runs every step between the backward pass and the optimiser step;
    `state_dict` / `load_state_dict` go into the resumable training state; `joinable`, if not
    None, takes part in DDP's Join (its collectives answered by ranks out of batches).
    """
    joinable: Joinable | None

    def after_backward(self, crops: list[torch.Tensor], labels: torch.Tensor, autocast) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Head(abc.ABC):
    """A classifier head on the backbone's pooled features."""
    # Whether a step's images may be mixed (train.mixup, train.cutmix): false for a head whose own
    # training files each crop under its one label (t-ReX's memory).
    mixable = True

    @classmethod
    def from_params(cls, tp: TrainParams) -> Head:
        """The head as params.yaml's train section sets it."""
        return cls()

    @classmethod
    def from_checkpoint(cls, fc: dict[str, torch.Tensor]) -> Head:
        """The head a checkpoint was trained with, from its `fc.*` tensors (keys without `fc.`)."""
        return cls()

    @abc.abstractmethod
    def module(self, fc: nn.Linear, num_classes: int) -> nn.Module:
        """What replaces the backbone's linear classifier `fc` (in_features -> its classes)."""

    def crop_logits(self, net: nn.Module, crops: list[torch.Tensor], global_crops: int) -> Logits:
        """Logits of the global crops (crop-major: all crop-1s, then all crop-2s) and of the local
        crops: the network once on the global crops, once on the local ones (another size, and
        BatchNorm statistics are then taken over crops of one size)."""
        global_logits = net(torch.cat(crops[:global_crops]))
        local_logits = net(torch.cat(crops[global_crops:])) if len(crops) > global_crops else None
        return global_logits, local_logits

    def training(self, net: nn.Module, average: Callable[[], nn.Module], rows: int,
                 device: torch.device) -> HeadTraining | None:
        """What this head trains beside `net`, or None. `average()` builds another network like `net`
        (for a moving average); `rows`: images a step on this rank."""
        return None
