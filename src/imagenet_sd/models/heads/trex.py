"""t-ReX's classifier head (`train.head: trex`), after the CVPR 2023 authors' training code
(naver/trex, `trex.py`; Sariyildiz et al., "No reason for no supervision", ICLR 2023).

The model: the backbone's pooled feature goes through a projector (L2-normalised input, three
Linear-BatchNorm-GELU layers of 2048, a bias-free Linear to 256) and is classified by cosine
similarity with class prototypes, divided by a temperature of 0.1. The prototypes are not
learnt: they are the L2-normalised per-class sums of a FIFO memory of projector outputs. The
memory starts as random features with random labels, as theirs, so every class has a
prototype from the first step. `TrexHead` is the network's `fc`: the checkpoint is a
torchvision resnet50 whose fc is this head (memory included); evaluation classifies through
`net.fc` as with the linear head, and eval-transfer takes the pooled features by replacing `fc`.

Its training: each step the crops' logits come from the trunk per resolution and the head once
over every crop (`Trex.crop_logits`). After the backward pass an exponential moving average
(momentum 0.999) of the network takes this step's weights (`Ema`), embeds each image's first
global crop, and the memory takes those entries from every rank (`MemorySync`, a Join-aware
all-gather, so ranks with fewer batches keep answering it). The moving average lives beside
the network, outside DDP: every rank updates it from the same weights.

Docs: docs/training.md#the-t-rex-head
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from imagenet_sd.core.params import TrainParams
from imagenet_sd.models import network
from imagenet_sd.models.heads.base import Head, Logits

# naver/trex's defaults (trex.py, main.py): the model of its `memory_size=8192` runs.
FEATURES, HIDDEN, LAYERS, BOTTLENECK = 2048, 2048, 3, 256
TEMPERATURE = 0.1
MOMENTUM = 0.999        # naver/trex's ema_momentum


class Projector(nn.Sequential):
    """L2-normalised input, LAYERS x (Linear, BatchNorm1d, GELU) of HIDDEN, a bias-free Linear to BOTTLENECK."""

    def __init__(self, features: int = FEATURES):
        layers, width = [], features
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

    def __init__(self, num_classes: int, memory: int, features: int = FEATURES):
        super().__init__()
        self.num_classes = num_classes
        self.projector = Projector(features)
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


@dataclass(frozen=True)
class Trex(Head):
    """t-ReX's head with a memory of `memory` entries (`train.trex_memory`)."""
    memory: int
    mixable = False          # the memory files each crop's features under its one label

    @classmethod
    def from_params(cls, tp: TrainParams) -> Trex:
        return cls(tp.trex_memory)

    @classmethod
    def from_checkpoint(cls, fc: dict[str, torch.Tensor]) -> Trex:
        memory = fc.get("memory")
        return cls(len(memory) if isinstance(memory, torch.Tensor) else 1)

    def module(self, fc: nn.Linear, num_classes: int) -> nn.Module:
        return TrexHead(num_classes, self.memory, fc.in_features)

    def crop_logits(self, net: nn.Module, crops: list[torch.Tensor], global_crops: int) -> Logits:
        """The trunk per resolution, then the head once over every crop, so the projector's
        BatchNorm sees them all together, as t-ReX's multi-crop wrapper."""
        parts = [torch.cat(crops[:global_crops])] + ([torch.cat(crops[global_crops:])] if len(crops) > global_crops else [])
        features = [network.features(net, part) for part in parts]
        logits = net.fc(torch.cat(features))
        first = len(features[0])
        return logits[:first], (logits[first:] if len(features) > 1 else None)

    def training(self, net: nn.Module, average: Callable[[], nn.Module], rows: int,
                 device: torch.device) -> TrexTraining:
        ema = Ema(average(), net)
        return TrexTraining(net, ema, MemorySync(net.fc, ema, rows, device))


# --------------------------------------------------------------------------- training

class Ema(nn.Module):
    """The moving average of the network (weights only; its BatchNorm statistics are its own and
    never used: it runs in training mode), which writes the memory. `average` is a second network
    of the same architecture with plain BatchNorm (not SyncBatchNorm: its forward must not wait
    on other ranks), started from `net`'s weights."""

    def __init__(self, average: nn.Module, net: nn.Module):
        super().__init__()
        average.load_state_dict(net.state_dict())
        self.net = average.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        for average, current in zip(self.net.parameters(), net.parameters()):
            average.mul_(MOMENTUM).add_(current.detach(), alpha=1 - MOMENTUM)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        self.net.train()
        return self.net.fc.projector(network.features(self.net, images)).float()


class MemorySync(Joinable):
    """Every rank's memory entries of a step to every rank (all-gather of fixed-size blocks, label
    -1 padding), and the Join hooks that let a rank out of batches answer the others' gathers
    and, at the end, take the moving average from the last rank to finish."""

    def __init__(self, head: TrexHead, ema: Ema, rows: int, device: torch.device):
        super().__init__()
        self.head, self.ema, self.rows, self.device = head, ema, rows, device

    def gather(self, features: torch.Tensor | None, labels: torch.Tensor | None) -> None:
        block = torch.zeros(self.rows, BOTTLENECK + 1, device=self.device)
        block[:, -1] = -1
        if features is not None:
            block[:len(features), :-1] = features
            block[:len(features), -1] = labels.float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            Join.notify_join_context(self)
            blocks = [torch.empty_like(block) for _ in range(dist.get_world_size())]
            dist.all_gather(blocks, block)
            block = torch.cat(blocks)
        valid = block[:, -1] >= 0
        self.head.push(block[valid, :-1], block[valid, -1].long())

    def join_hook(self, **kwargs) -> JoinHook:
        sync = self

        class Hook(JoinHook):
            def main_hook(self) -> None:
                sync.gather(None, None)

            def post_hook(self, is_last_joiner: bool) -> None:
                source = torch.tensor(dist.get_rank() if is_last_joiner else -1, device=sync.device)
                dist.all_reduce(source, op=dist.ReduceOp.MAX)
                for tensor in list(sync.ema.net.parameters()) + list(sync.head.buffers()):
                    dist.broadcast(tensor.data, int(source))
        return Hook()

    @property
    def join_device(self) -> torch.device:
        return self.device

    @property
    def join_process_group(self):
        return dist.group.WORLD


@dataclass
class TrexTraining:
    """t-ReX's moving average and memory writer beside the network (a `HeadTraining`); the memory
    is the network's, so the training state adds the moving average only."""
    net: nn.Module
    ema: Ema
    sync: MemorySync

    @property
    def joinable(self) -> MemorySync:
        return self.sync

    def after_backward(self, crops: list[torch.Tensor], labels: torch.Tensor, autocast) -> None:
        """The moving average takes the weights of this step (not yet updated), embeds the first
        global crops, and the memory takes them from every rank, as t-ReX does in its forward."""
        self.ema.update(self.net)
        with autocast:
            features = self.ema.embed(crops[0])
        self.sync.gather(features, labels)

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
