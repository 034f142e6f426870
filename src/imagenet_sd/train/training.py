"""Training a ResNet-50 classifier from scratch on synthetic (or real) images.

The recipe, every part a param (docs/training.md#training-recipe); the paper profile has the
defaults of the authors' public multi-crop training code (naver/trex):
- SGD, momentum 0.9, `nesterov` or not; lr = `lr` x batch_size / 256 (linear scaling);
- linear warmup for `warmup_epochs`, then cosine decay to `min_lr`, updated every step;
  with `max_steps` the same shape spans a fixed budget of steps instead of `epochs`;
- `label_smoothing`; weight decay on conv and linear weights only (not on BatchNorm
  or biases); the last BatchNorm of each residual block starts at zero (each block
  starts as the identity, which stabilises the first steps); `sync_batchnorm` across
  GPUs under DDP;
- multi-crop (augmentation.py): `global_crops` + `local_crops` crops of every image,
  each carrying its image's label; the loss is the mean over all crops; global crops
  go through the network together, local crops together (they have another size, and
  BatchNorm statistics are then taken over crops of one size). The crops are made in
  the loader workers, or (`augment_device`) on the GPU from the JPEG bytes.
Precision (`amp`), memory layout (`channels_last`) and `compile` are params.

Held-out images: the first `holdout_per_class` images of every class are not
trained on (sd-generate makes them in addition to real x scale, so training sees
exactly real x scale images a class); their loss and top-1 (centre crop) are measured after every epoch, a
check that the model learns more than its training images.

Resume: after every epoch, and every `checkpoint_every_steps` steps, the whole
training state (model, optimiser, grad scaler, epoch, step, history) is saved
atomically to `train.work_dir/<key>/last.pt`, the key hashing what decides the
weights (recipe, seed, source, classes, the data, the training code). A killed run starts again
from there. Each epoch reseeds the augmentation and loader randomness from
(seed, epoch), and a run resumed mid-epoch reads (without training on) the
batches it had done, so it ends with the same weights as an uninterrupted one
(on CPU; GPU kernels are not bitwise deterministic). The final model is a
normal DVC output written from it.

Logging: rank 0 logs every epoch with DVCLive into the stage's log folder. DVC
deletes that folder before a run, so a resumed run first logs the epochs of
the saved history again: the log is always complete.

Several processes (`train.processes`, run under torchrun): DistributedDataParallel,
nccl on GPUs and gloo on CPUs. `batch_size` is the batch of all processes
together; each rank reads its own share of the shards (see data.ShardDataset) or
of a real folder (DistributedSampler), draws its augmentations from (seed, epoch,
rank), and ranks with fewer batches are covered by DDP's `join`. Rank 0 alone
shows progress, scores the held-out images and writes state, log, checkpoint and
metrics.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from tqdm import tqdm

from imagenet_sd.core import distributed, seeds
from imagenet_sd.core.device import resolve
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import atomic_write_text, replacing, write_json
from imagenet_sd.core.params import Params, TrainParams, require_dir, writable_dir
from imagenet_sd.datasets import data, kept, shards, transforms
from imagenet_sd.datasets.shards import read_index
from imagenet_sd.datasets.transforms import build_transform
from imagenet_sd.models import trex as trex_head
from imagenet_sd.prompts import prompts
from imagenet_sd.train import augmentation, trex
from imagenet_sd.train.augmentation import (
    DeviceMultiCrop,
    DrawCrops,
    MultiCrop,
    collate_encoded,
    encoded_jpeg,
    read_encoded,
)

# What the training log (DVCLive) records each epoch: EpochStats fields, None ones left out.
LOGGED = ("loss", "train_top1", "holdout_loss", "holdout_top1", "lr", "images_per_second")


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_top1: float        # percent, on the global crops, in train mode (augmented)
    lr: float                # at the last step of the epoch
    images: int
    seconds: float
    steps: int = 0           # optimiser steps since the start of training, at the end of this epoch
    holdout_loss: float | None = None    # held-out images, centre crop, eval mode, no label smoothing
    holdout_top1: float | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


@dataclass
class EpochProgress:
    """Sums over the steps done in an epoch; a mid-epoch checkpoint saves rank 0's."""
    step: int = 0
    seen: int = 0            # images this rank trained on (they decide the lr)
    counted: int = 0         # images whose loss is in loss_sum (fewer than seen after a resume under DDP)
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0
    lr: float = 0.0


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0
    skipped_on_device: int = 0      # images the device could not decode (augment_device: cuda)


# --------------------------------------------------------------------------- pieces

def build_model(num_classes: int, zero_init_residual: bool = False, head: str = "linear",
                memory: int = 0) -> torch.nn.Module:
    """torchvision's ResNet-50 from random weights; `head: trex` replaces its fc by t-ReX's head (module trex)."""
    net = torchvision.models.resnet50(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if head == "trex":
        net.fc = trex_head.TrexHead(num_classes, memory)
    return net


def build_optimizer(model: torch.nn.Module, tp: TrainParams) -> torch.optim.SGD:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": tp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=peak_lr(tp), momentum=0.9, nesterov=tp.nesterov)


def peak_lr(tp: TrainParams) -> float:
    return tp.lr * tp.batch_size / 256


def lr_at(done: float, tp: TrainParams) -> float:
    """Learning rate when the fraction `done` of the run is done: linear warmup over the first
    warmup_epochs / epochs of it, then cosine to `min_lr`.

    `done` counts images over epochs x images (not steps: the workers' partial batches
    would change the count), or steps over `max_steps` with a step budget.
    """
    warmup = tp.warmup_epochs / tp.epochs
    if done < warmup:
        return peak_lr(tp) * done / warmup
    decay = min(1.0, (done - warmup) / max(1 - warmup, 1e-9))
    return tp.min_lr + (peak_lr(tp) - tp.min_lr) * 0.5 * (1 + math.cos(math.pi * decay))


def autocast_dtype(amp: str, device: torch.device, key: str = "train.amp") -> torch.dtype | None:
    """The autocast dtype the `amp` param means on `device`; None: plain float32."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"params.yaml: {key} = 'fp16' needs a CUDA device (its loss scaling is CUDA's); "
                        "use bf16 or none on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def _amp(dtype: torch.dtype | None, device: torch.device) -> tuple[torch.autocast, torch.amp.GradScaler]:
    autocast = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    # float16 needs loss scaling against underflowing gradients; bfloat16 does not.
    return autocast, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def make_loader(dataset: Dataset, tp: TrainParams, seed: int, device: torch.device,
                ctx: distributed.Context, on_device: bool = False) -> DataLoader:
    """This rank's loader: its share of the batch, and of a folder dataset's images."""
    # The generator fixes the shuffling of a folder dataset and the workers' random augmentations.
    generator = torch.Generator().manual_seed(seeds.derive(seed, "loader"))
    sampler = None
    if ctx.world > 1 and not isinstance(dataset, IterableDataset):
        # Pads the last round with up to world-1 repeated images, so every rank has as many.
        sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                     seed=seeds.derive(seed, "sampler") % 2**31)
    return DataLoader(dataset, batch_size=tp.batch_size // ctx.world, sampler=sampler,
                      shuffle=sampler is None and not isinstance(dataset, IterableDataset),
                      num_workers=tp.workers, pin_memory=device.type == "cuda", generator=generator,
                      collate_fn=collate_encoded if on_device else None)


def crop_logits(model: torch.nn.Module, crops: list[torch.Tensor],
                global_crops: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of the global crops (crop-major: all crop-1s, then all crop-2s) and of the local crops."""
    global_logits = model(torch.cat(crops[:global_crops]))
    local_logits = model(torch.cat(crops[global_crops:])) if len(crops) > global_crops else None
    return global_logits, local_logits


def multicrop_loss(global_logits: torch.Tensor, local_logits: torch.Tensor | None, labels: torch.Tensor,
                   label_smoothing: float) -> torch.Tensor:
    """Cross-entropy averaged over every crop of every image, each crop labelled with its image's class."""
    total = F.cross_entropy(global_logits.float(), labels.repeat(global_logits.shape[0] // len(labels)),
                            reduction="sum", label_smoothing=label_smoothing)
    crops = global_logits.shape[0]
    if local_logits is not None:
        total = total + F.cross_entropy(local_logits.float(), labels.repeat(local_logits.shape[0] // len(labels)),
                                        reduction="sum", label_smoothing=label_smoothing)
        crops += local_logits.shape[0]
    return total / crops


class MultiCropNet(torch.nn.Module):
    """The network applied to a list of crops in one forward call (global crops together, local together;
    with t-ReX's head, its head once over every crop).

    One call per step is what DistributedDataParallel expects; it wraps this module.
    """

    def __init__(self, net: torch.nn.Module, global_crops: int):
        super().__init__()
        self.net, self.global_crops = net, global_crops
        self.trex = isinstance(getattr(net, "fc", None), trex_head.TrexHead)

    def forward(self, crops: list[torch.Tensor]):
        if self.trex:
            return trex.crop_logits(self.net, crops, self.global_crops)
        return crop_logits(self.net, crops, self.global_crops)


# --------------------------------------------------------------------------- the loop

def trex_parts_for(net: torch.nn.Module, num_classes: int, tp: TrainParams, device: torch.device,
                   ctx: distributed.Context) -> trex.TrexParts | None:
    """With `head: trex`, the moving average (started from `net`) and the memory writer; else None."""
    if tp.head != "trex":
        return None
    average = build_model(num_classes, tp.zero_init_residual, tp.head, tp.trex_memory).to(device)
    ema = trex.Ema(average, net)
    return trex.TrexParts(net, ema, trex.MemorySync(net.fc, ema, tp.batch_size // ctx.world, device))


def training_step(model, crops: list[torch.Tensor], labels: torch.Tensor, optimizer, scaler, autocast,
                  label_smoothing: float, trex_parts: trex.TrexParts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward every crop, multi-crop loss, backward, optimiser step; (loss, logits of the global crops)."""
    with autocast:
        global_logits, local_logits = model(crops)
    loss = multicrop_loss(global_logits, local_logits, labels, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if trex_parts is not None:
        trex_parts.after_backward(crops, labels, autocast)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), global_logits


READ_EVERY_STEPS = 50      # steps between reads of the loss back to the host (and the divergence check)


def read_sums(p: EpochProgress, sums: torch.Tensor, epoch: int, tp: TrainParams) -> None:
    """Move the device-side sums into `p` (one host sync); a loss that is no longer finite stops the run.

    The check comes at most READ_EVERY_STEPS steps late, always before a checkpoint is saved,
    so the saved state is from before the divergence.
    """
    loss_sum, correct = sums.tolist()
    sums.zero_()
    if not math.isfinite(loss_sum):
        raise UserError(f"training loss became {loss_sum} in epoch {epoch} (by step {p.step}); lower train.lr "
                        f"(now {tp.lr}) or raise train.warmup_epochs in params.yaml")
    p.loss_sum += loss_sum
    p.correct += int(correct)


@dataclass
class Budget:
    """How long the run is: `epochs` passes over `images` images, or `max_steps` steps."""
    epochs: int
    max_steps: int
    images: int              # per epoch, all ranks together

    def done(self, epoch: int, seen_all_ranks: int, steps: int) -> float:
        """Fraction of the run done after `steps` steps in all, `seen_all_ranks` images into `epoch`."""
        if self.max_steps:
            return min(1.0, steps / self.max_steps)
        return (epoch - 1 + min(1.0, seen_all_ranks / self.images)) / self.epochs

    def over(self, epoch: int, steps: int) -> bool:
        """Whether the run ends before `epoch` begins (`steps` steps done)."""
        return steps >= self.max_steps if self.max_steps else epoch > self.epochs


def on_device(inputs, labels: torch.Tensor, augment: DeviceMultiCrop | None, device: torch.device,
              memory: torch.memory_format) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A loader batch as (crops, labels) on `device`: the crops made there with `augment`
    (from JPEG bytes and draws), else moved there from the loader's workers."""
    if augment is not None:
        inputs, decoded = augment(*inputs)
        if len(decoded) < len(labels):       # an image the device could not decode
            labels = labels[decoded]
    crops = [c.to(device, non_blocking=True, memory_format=memory) for c in inputs]
    return crops, labels.to(device, non_blocking=True)


def train_one_epoch(model, loader, optimizer, scaler, autocast, tp: TrainParams, epoch: int, budget: Budget,
                    device: torch.device, ctx: distributed.Context = distributed.SINGLE,
                    restored: EpochProgress | None = None, steps_before: int = 0,
                    checkpoint: Callable[[EpochProgress], None] = lambda progress: None,
                    augment: DeviceMultiCrop | None = None, trex_parts: trex.TrexParts | None = None) -> EpochStats:
    """One pass over this rank's data (cut short when a step budget runs out);
    `checkpoint(progress)` every `checkpoint_every_steps` steps.

    With `restored` (from a mid-epoch checkpoint), the batches of the steps it counts
    are read again, which replays the loader's randomness, but not trained on. With
    `augment`, batches are JPEG bytes and draws, made into crops on the device.
    """
    model.train()
    restored = restored or EpochProgress()
    # Rank 0 goes on from its saved sums; the other ranks' sums before the checkpoint are lost.
    p = EpochProgress(**{**asdict(restored), "step": 0, "seen": 0}) if ctx.main else EpochProgress()
    memory = torch.channels_last if tp.channels_last else torch.contiguous_format
    epochs = f"{tp.epochs}" if not tp.max_steps else f"~{math.ceil(tp.max_steps * tp.batch_size / budget.images)}"
    bar = tqdm(total=budget.images, desc=f"epoch {epoch}/{epochs}", unit="img", dynamic_ncols=True,
               disable=not ctx.main)
    sums = torch.zeros(2, dtype=torch.float64, device=device)   # loss x images, correct global crops
    # A rank that runs out of batches first keeps answering the others' gradient all-reduces.
    join = contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        join = (Join([model, trex_parts.sync], divide_by_initial_world_size=True) if trex_parts is not None
                else model.join())
    with join:
        clock = time.perf_counter()
        for inputs, labels in loader:
            if tp.max_steps and steps_before + p.step >= tp.max_steps:
                break
            p.step += 1
            p.seen += len(labels)
            bar.update(len(labels) * ctx.world)
            if p.step <= restored.step:
                clock = time.perf_counter()
                continue
            crops, labels = on_device(inputs, labels, augment, device, memory)
            # lr of this step: progress once this batch is done (all ranks together), so that
            # warmup never uses lr 0.
            p.lr = lr_at(budget.done(epoch, p.seen * ctx.world, steps_before + p.step), tp)
            for group in optimizer.param_groups:
                group["lr"] = p.lr
            loss, global_logits = training_step(model, crops, labels, optimizer, scaler, autocast,
                                                tp.label_smoothing, trex_parts)
            # Summed on the device: reading a number back every step would stall the GPU's queue.
            sums += torch.stack([loss.double() * len(labels),
                                 (global_logits.argmax(1) == labels.repeat(tp.global_crops)).sum().double()])
            p.counted += len(labels)
            now = time.perf_counter()
            p.seconds, clock = p.seconds + now - clock, now
            checkpoint_due = bool(tp.checkpoint_every_steps) and p.step % tp.checkpoint_every_steps == 0
            if checkpoint_due or p.step % READ_EVERY_STEPS == 0:
                read_sums(p, sums, epoch, tp)       # before a checkpoint: never save a diverged state
                bar.set_postfix(loss=f"{p.loss_sum / max(p.counted, 1):.3f}", lr=f"{p.lr:.3g}")
            if checkpoint_due:
                checkpoint(p)
    read_sums(p, sums, epoch, tp)
    bar.close()
    totals = torch.tensor([p.loss_sum, p.correct, p.counted, p.seen], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")
    steps = torch.tensor([p.step], device=totals.device)
    if ctx.world > 1:
        dist.all_reduce(totals)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)   # ranks with fewer batches joined the others' steps
    loss_sum, correct, counted, seen = totals.tolist()
    if seen == 0:
        raise UserError("the training set yielded no images; check the shards or image folder")
    counted = max(counted, 1)
    return EpochStats(epoch=epoch, loss=loss_sum / counted,
                      train_top1=100.0 * correct / (tp.global_crops * counted), lr=p.lr, images=int(seen),
                      seconds=p.seconds, steps=steps_before + int(steps.item()))


@torch.no_grad()
def score_holdout(net: torch.nn.Module, loader: DataLoader, device: torch.device, autocast,
                  memory: torch.memory_format) -> tuple[float, float]:
    """Mean cross-entropy and top-1 (percent) of `net` on the held-out images, in eval mode."""
    net.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True, memory_format=memory)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = net(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    net.train()
    if count == 0:
        raise UserError("no held-out image could be read; check the shards, or set train.holdout_per_class: 0")
    return loss_sum / count, 100.0 * correct / count


def save_state(path: Path, model, optimizer, scaler, history: list[EpochStats],
               progress: EpochProgress | None = None, ema: torch.nn.Module | None = None) -> None:
    """Everything needed to go on: after the last finished epoch, or `progress` steps into the next
    (with t-ReX's head, its moving average too; the memory is the network's)."""
    state = {"epoch": len(history), "progress": asdict(progress) if progress else None,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "history": [asdict(h) for h in history]}
    if ema is not None:
        state["ema"] = ema.state_dict()
    atomic_save(state, path)


def atomic_save(obj, path: Path) -> None:
    """torch.save under a temporary name, then rename: a kill never leaves half a file."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


# Mid-epoch, the processes' BatchNorm running statistics differ: each updates them from its own
# crops, and under DDP's join the next step's forward copies the highest rank's to all. A
# mid-epoch checkpoint therefore also keeps every other rank's own (a few hundred kB), and
# a resumed rank takes its own back, so the run goes on exactly as it would have. At the end
# of an epoch DDP makes all ranks' models equal, so the state alone is enough.

def rank_buffers_file(state_path: Path, rank: int) -> Path:
    return state_path.with_name(f"buffers-rank{rank}.pt")


def save_rank_buffers(path: Path, net: torch.nn.Module, epoch: int, step: int) -> None:
    atomic_save({"epoch": epoch, "step": step, "buffers": dict(net.named_buffers())}, path)


def load_rank_buffers(path: Path, net: torch.nn.Module, epoch: int, step: int) -> None:
    """This rank's statistics saved with the mid-epoch state (epoch, step), when they are there."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        saved = None
    if saved is None or (saved["epoch"], saved["step"]) != (epoch, step):
        print(f"note: {path} is not from the saved step; this rank goes on with rank 0's BatchNorm statistics, "
              "so the resumed run can differ slightly from an uninterrupted one")
        return
    buffers = dict(net.named_buffers())
    with torch.no_grad():
        for name, value in saved["buffers"].items():
            buffers[name].copy_(value)


def load_state(path: Path, model, optimizer, scaler,
               ema: torch.nn.Module | None = None) -> tuple[list[EpochStats], EpochProgress | None]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    progress = EpochProgress(**state["progress"]) if state.get("progress") else None
    return [EpochStats(**h) for h in state["history"]], progress


def build_network(num_classes: int, tp: TrainParams, device: torch.device, ctx: distributed.Context):
    """(the ResNet-50, the module a step calls: the multi-crop wrapper, under DDP with several processes)."""
    memory = torch.channels_last if tp.channels_last else torch.contiguous_format
    net = build_model(num_classes, tp.zero_init_residual, tp.head, tp.trex_memory)
    if tp.sync_batchnorm and ctx.world > 1:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        elif ctx.main:
            print("note: train.sync_batchnorm needs CUDA; on the CPU each process keeps its own BatchNorm statistics")
    net = net.to(device, memory_format=memory)
    model = MultiCropNet(torch.compile(net) if tp.compile else net, tp.global_crops)
    if ctx.world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return net, model


def train(dataset: Dataset, num_classes: int, tp: TrainParams, seed: int, device: torch.device,
          state_path: Path | None = None, ctx: distributed.Context = distributed.SINGLE,
          holdout: Dataset | None = None, on_epoch: Callable[[EpochStats], None] = lambda stats: None,
          on_device: bool = False) -> TrainResult:
    """Train a ResNet-50 from random weights on `dataset` ((crops, label) samples, or with
    `on_device` ((JPEG bytes, draws), label) samples whose crops are made on `device`).

    With `state_path`, go on from the state saved there and save it as training goes.
    `holdout` ((image, label) samples) is scored after every epoch; `on_epoch` gets
    every epoch's stats on rank 0, restored epochs first.
    """
    torch.manual_seed(seeds.derive(seed, "train"))       # the same initial weights on every rank
    memory = torch.channels_last if tp.channels_last else torch.contiguous_format
    net, model = build_network(num_classes, tp, device, ctx)
    trex_parts = trex_parts_for(net, num_classes, tp, device, ctx)
    ema_module = trex_parts.ema if trex_parts is not None else None
    optimizer = build_optimizer(net, tp)
    autocast, scaler = _amp(autocast_dtype(tp.amp, device), device)
    augment = DeviceMultiCrop(dataset.transform.multicrop, device) if on_device else None
    if isinstance(dataset, data.ShardDataset):
        dataset.set_rank(ctx.rank, ctx.world)
    loader = make_loader(dataset, tp, seed, device, ctx, on_device)
    holdout_loader = None
    if holdout is not None and ctx.main:
        holdout_loader = DataLoader(holdout, batch_size=tp.batch_size // ctx.world, num_workers=tp.workers,
                                    pin_memory=device.type == "cuda")
    result, progress = TrainResult(model=net), None
    if state_path is not None and state_path.is_file():
        result.history, progress = load_state(state_path, net, optimizer, scaler, ema_module)
        if progress is not None and not ctx.main:
            load_rank_buffers(rank_buffers_file(state_path, ctx.rank), net, len(result.history), progress.step)
        if ctx.main:
            where = f"epoch {len(result.history)}" + (f" and step {progress.step}" if progress else "")
            print(f"resuming after {where} from {state_path}")
    if ctx.main:
        for stats in result.history:
            on_epoch(stats)

    def checkpoint(p: EpochProgress) -> None:
        if state_path is None:
            return
        if ctx.main:
            save_state(state_path, net, optimizer, scaler, result.history, p, ema_module)
        else:
            save_rank_buffers(rank_buffers_file(state_path, ctx.rank), net, len(result.history), p.step)

    budget = Budget(tp.epochs, tp.max_steps, len(dataset))
    epoch = len(result.history) + 1
    while not budget.over(epoch, result.history[-1].steps if result.history else 0):
        # Randomness of this epoch from (seed, epoch, rank) alone: a resumed run draws the same.
        torch.manual_seed(seeds.derive(seed, "epoch", epoch, ctx.rank))           # augmentations without workers
        loader.generator.manual_seed(seeds.derive(seed, "loader", epoch, ctx.rank))  # shuffling, worker seeds
        if isinstance(dataset, data.ShardDataset):
            dataset.set_epoch(epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        steps_before = result.history[-1].steps if result.history else 0
        stats = train_one_epoch(model, loader, optimizer, scaler, autocast, tp, epoch, budget, device,
                                ctx, progress, steps_before, checkpoint, augment, trex_parts)
        progress = None
        if holdout_loader is not None:
            stats.holdout_loss, stats.holdout_top1 = score_holdout(net, holdout_loader, device, autocast, memory)
        result.history.append(stats)
        if ctx.main:
            if state_path is not None:
                save_state(state_path, net, optimizer, scaler, result.history, ema=ema_module)
            on_epoch(stats)
        ctx.barrier()       # no rank reads a state file another is still writing
        epoch += 1
    result.seconds = sum(s.seconds for s in result.history)
    result.skipped_on_device = augment.failed if augment is not None else 0
    return result


# --------------------------------------------------------------------------- inputs and outputs

def augment_on_device(tp: TrainParams, device: torch.device, key: str = "train.augment_device") -> bool:
    """Whether `augment_device` puts decoding and multi-crop on the training device."""
    if tp.augment_device == "cuda" and device.type != "cuda":
        raise UserError(f"params.yaml: {key} = 'cuda' but training runs on {device.type}; set it to auto or cpu")
    return tp.augment_device == "cuda" or (tp.augment_device == "auto" and device.type == "cuda")


def open_training_set(params: Params, keys: list[str], shards_dir: Path,
                      on_device: bool = False, kept_dir: Path | None = None) -> tuple[Dataset, Dataset | None]:
    """The training images `params.source` names and their held-out part, checked before anything is written.

    `on_device`: the training samples are (JPEG bytes, draws) for `DeviceMultiCrop`.
    `kept_dir`: the clip-filter stage's output; synthetic images it leaves out are not trained
    on (None: every image). Real images are never filtered.
    """
    tp = params.train
    multicrop = MultiCrop.from_params(tp)
    transform = DrawCrops(multicrop) if on_device else multicrop
    # Scored like the evaluation scores real images: resize by 256/224 of the crop, centre crop.
    centre = build_transform(round(tp.global_crop_size * 256 / 224), tp.global_crop_size)
    if params.source == "real":
        key = f"profiles.{params.profile}.data.train"
        if params.data.train is None:
            raise UserError(f"params.yaml: {key} is empty but source = 'real' needs the real train folder; "
                            "set it or use source: synthetic")
        return data.folder_splits(require_dir(key, params.data.train), keys, key, tp.holdout_per_class,
                                  transform, centre, read=read_encoded if on_device else data.read_rgb)
    index = read_index(shards_dir)
    paths = [shards_dir / entry["file"] for entry in index["shards"]]
    if not paths:
        raise UserError(f"no shards in {shards_dir}; run: dvc repro sd-generate")
    data.check_index_classes(index, keys, shards_dir)
    held = index.get("holdout_per_class", 0)
    if held != tp.holdout_per_class:
        raise UserError(f"{shards_dir / shards.INDEX_FILE}: the shards were made with {held} held-out images a "
                        f"class, but profiles.{params.profile}.train.holdout_per_class = {tp.holdout_per_class}; "
                        "regenerate them: dvc repro sd-generate")
    filtered = kept.read(kept_dir, shards_dir) if kept_dir is not None else None
    return data.shard_splits(paths, keys, params.seed, tp.holdout_per_class, transform, centre, index,
                             decode=encoded_jpeg if on_device else None, kept=filtered)


def save_checkpoint(path: Path, model: torch.nn.Module, rows: list[prompts.ClassPrompt], tp: TrainParams,
                    extra: dict) -> None:
    """The checkpoint evaluation reads; loadable into a plain torchvision or timm resnet50 (docs/training.md#using-the-trained-model-elsewhere)."""
    ordered = sorted(rows, key=lambda r: r.index)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    checkpoint = {"arch": "resnet50", "head": tp.head, "classes": [r.key for r in ordered],
                  "wnids": [r.wnid for r in ordered], "state_dict": state, "image_size": tp.global_crop_size,
                  # Plain types only, so torch.load(weights_only=True) and other tools read it.
                  "params": json.loads(json.dumps({**asdict(tp), **extra}, default=str))}
    atomic_save(checkpoint, path)


def open_log(folder: Path):
    """The DVCLive logger writing `folder`; it leaves dvc.yaml and experiments to the pipeline."""
    from dvclive import Live  # imports DVC: only the logging rank pays for it
    return Live(str(folder), save_dvc_exp=False, dvcyaml=False)


def log_epoch(live, stats: EpochStats) -> None:
    live.step = stats.epoch
    for name in LOGGED:
        value = getattr(stats, name)
        if value is not None:
            live.log_metric(name, round(value, 6))
    live.next_step()


def summary(result: TrainResult, params: Params, num_classes: int, skipped: int, train_images: int,
            holdout_images: int) -> dict:
    """metrics/train.json. train_images: the training set (real x scale a class for synthetic
    images); images: what the last epoch read (fewer when a step budget ends it)."""
    last = result.history[-1]
    images = sum(s.images for s in result.history)
    holdout = {} if last.holdout_top1 is None else {"holdout_loss": round(last.holdout_loss, 4),
                                                     "holdout_top1": round(last.holdout_top1, 2)}
    return {"epochs": len(result.history), "steps": last.steps, "train_images": train_images,
            "holdout_images": holdout_images, "images": last.images, "loss": round(last.loss, 4),
            "train_top1": round(last.train_top1, 2), **holdout,
            "images_per_second": round(images / result.seconds, 1) if result.seconds else 0.0,
            "seconds": round(result.seconds, 1), "source": params.source, "classes": num_classes,
            "head": params.train.head, "zero_init_residual": params.train.zero_init_residual,
            "skipped": skipped}


def data_identity(params: Params, shards_dir: Path, kept_dir: Path | None = None) -> str:
    """What the training images are, cheaply: the shards' index (sha256s inside) and the
    filter's kept set, or the real folder."""
    if params.source == "real":
        return f"real:{params.data.train.resolve()}"
    # A kept set that drops nothing leaves the key as it was before filtering existed.
    filtered = "" if kept.identity(kept_dir) == kept.NONE else f";kept:{kept.identity(kept_dir)}"
    index = shards_dir / shards.INDEX_FILE
    if index.is_file():
        return "shards:" + hashlib.sha256(index.read_bytes()).hexdigest() + filtered
    return "shards:" + ",".join(f"{p.name}:{p.stat().st_size}" for p in shards.list_shards(shards_dir)) + filtered


def code_identity() -> str:
    """The training code itself: after an edit, a finished state must not pass for the new result."""
    modules = (sys.modules[__name__], augmentation, trex, trex_head, data, kept, transforms)
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()


# Params that do not change the weights, so a run may resume across a change of them.
NOT_IN_STATE_KEY = ("workers", "device", "work_dir", "checkpoint_every_steps", "compile")


def world_size(params: Params) -> int:
    """The DDP processes of this training run: a Slurm job's tasks (`launcher: slurm`, in the job and
    in the stage that submits it), torchrun's WORLD_SIZE, or `train.processes`. Per-process BatchNorm
    makes it decide the weights, so it is in the state's key whatever launched the processes."""
    if params.launcher == "slurm":
        return params.slurm.tasks
    return int(os.environ.get("WORLD_SIZE", params.train.processes))


def state_file(params: Params, keys: list[str], shards_dir: Path, kept_dir: Path | None = None) -> Path:
    """train.work_dir/<key>/last.pt; the key leaves out what does not change the weights."""
    recipe = {k: v for k, v in asdict(params.train).items() if k not in NOT_IN_STATE_KEY}
    recipe["processes"] = world_size(params)     # the processes it trains on, however they are launched
    what = {"recipe": recipe, "seed": params.seed, "source": params.source, "classes": keys,
            "data": data_identity(params, shards_dir, kept_dir), "code": code_identity()}
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = writable_dir(f"profiles.{params.profile}.train.work_dir", params.train.work_dir,
                          params.train.work_dir / key)
    if int(os.environ.get("RANK", 0)) == 0:        # torchrun's other ranks would write the same file at once
        atomic_write_text(folder / "recipe.json", json.dumps(what, indent=1, default=str) + "\n")
    return folder / "last.pt"


def prepare(params: Params, prompts_path: Path, shards_dir: Path, kept_dir: Path | None = None):
    """Everything checked before a step is taken (or a worker started): classes, device, data, work folder."""
    rows = prompts.read(prompts_path)
    keys = data.class_keys(rows)
    key = f"profiles.{params.profile}.train"
    device = resolve(params.train.device, f"{key}.device")
    autocast_dtype(params.train.amp, device, f"{key}.amp")
    on_device = augment_on_device(params.train, device, f"{key}.augment_device")
    dataset, holdout = open_training_set(params, keys, shards_dir, on_device, kept_dir)
    return rows, keys, device, on_device, dataset, holdout, state_file(params, keys, shards_dir, kept_dir)


HEADLINE = ("epochs", "steps", "train_images", "images", "loss", "train_top1", "holdout_loss", "holdout_top1",
            "images_per_second")     # metrics/train.json; the rest (source, classes, counts) in the details


def run(params: Params, prompts_path: Path, shards_dir: Path, out: Path, metrics_path: Path,
        log_dir: Path, details_path: Path | None = None, kept_dir: Path | None = None) -> dict | None:
    """The train-resnet50 stage: validate inputs, train, write checkpoint, metrics and the DVCLive log.

    Under torchrun every rank trains; rank 0 writes and returns the metrics, the others None.
    `kept_dir`: the clip-filter stage's kept set (None: train on every synthetic image).
    """
    rows, keys, device, on_device, dataset, holdout, state_path = prepare(params, prompts_path, shards_dir, kept_dir)
    ctx = distributed.start("nccl" if device.type == "cuda" else "gloo")
    live = None
    try:
        device = ctx.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if ctx.main:
            held = f", {len(holdout)} held out" if holdout is not None else ""
            length = (f"{params.train.max_steps} steps" if params.train.max_steps
                      else f"{params.train.epochs} epochs")
            where = "on the device" if on_device else "in the loader workers"
            print(f"training ResNet-50 on {len(dataset)} {params.source} images{held} of {len(keys)} classes, "
                  f"{length}, on {ctx.world} x {device.type}; multi-crop {where}")
            live = open_log(log_dir)
        result = train(dataset, len(keys), params.train, params.seed, device, state_path, ctx, holdout,
                       on_epoch=lambda stats: log_epoch(live, stats), on_device=on_device)
        in_loader = dataset.skipped.value if isinstance(dataset, data.ShardDataset) else 0
        skipped = sum(ctx.all_gather(in_loader + result.skipped_on_device))
        if not ctx.main:
            return None
        save_checkpoint(out, result.model, rows, params.train, {"seed": params.seed, "source": params.source})
        metrics = summary(result, params, len(keys), skipped, len(dataset), len(holdout) if holdout is not None else 0)
        metrics["processes"] = ctx.world
        write_json(metrics_path, {k: metrics[k] for k in HEADLINE if k in metrics})
        if details_path is not None:
            write_json(details_path, metrics)
        return metrics
    finally:
        if live is not None:
            live.end()
        distributed.stop()
