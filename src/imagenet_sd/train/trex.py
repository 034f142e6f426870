"""Training t-ReX's head (`train.head: trex`; the head itself: module models.trex), after naver/trex.

Each step the crops' logits come from the trunk per resolution and the head once over every
crop (`crop_logits`). After the backward pass an exponential moving average (momentum 0.999)
of the network takes this step's weights (`Ema`), embeds each image's first global crop, and
the memory takes those entries from every rank (`MemorySync`, a Join-aware all-gather, so ranks
with fewer batches keep answering it). The moving average lives beside the network, outside
DDP: every rank updates it from the same weights.

Docs: docs/training.md#the-t-rex-head
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from imagenet_sd.models.trex import BOTTLENECK, TrexHead, pooled

MOMENTUM = 0.999        # naver/trex's ema_momentum


def crop_logits(net: nn.Module, crops: list[torch.Tensor], global_crops: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(global crops' logits, local crops' logits): the trunk per resolution, then the head once over
    every crop, so the projector's BatchNorm sees them all together, as t-ReX's multi-crop wrapper."""
    parts = [torch.cat(crops[:global_crops])] + ([torch.cat(crops[global_crops:])] if len(crops) > global_crops else [])
    features = [pooled(net, part) for part in parts]
    logits = net.fc(torch.cat(features))
    first = len(features[0])
    return logits[:first], (logits[first:] if len(features) > 1 else None)


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
        return self.net.fc.projector(pooled(self.net, images)).float()


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
class TrexParts:
    """t-ReX's moving average and memory writer, beside the network (train-resnet50 calls `after_backward`)."""
    net: torch.nn.Module
    ema: Ema
    sync: MemorySync

    def after_backward(self, crops: list[torch.Tensor], labels: torch.Tensor, autocast) -> None:
        """The moving average takes the weights of this step (not yet updated), embeds the first
        global crops, and the memory takes them from every rank, as t-ReX does in its forward."""
        self.ema.update(self.net)
        with autocast:
            features = self.ema.embed(crops[0])
        self.sync.gather(features, labels)
