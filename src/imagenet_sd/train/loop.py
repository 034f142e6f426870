"""The training loop: a classifier network (models/network.py, its head from models/heads/) trained
from random weights with the recipe of recipe.py, resumable from the state of state.py.

Read top to bottom: `train` builds the network, its head's training parts, optimiser and
loaders, restores a saved state, then runs `train_one_epoch` until the budget is spent,
scoring the held-out images and saving the state after each epoch. A step (`training_step`)
is the forward of every crop, the multi-crop loss, backward, the head's after-backward work
(t-ReX: its moving average and memory) and the optimiser step.

- Multi-crop (augmentation.py): `global_crops` + `local_crops` crops of every image, each
  carrying its image's label; how the crops become logits is the head's (`Head.crop_logits`).
  The crops are made in the loader workers, or (`augment_device`) on the GPU from the JPEG bytes.
- Held-out images: the first `holdout_per_class` images of every class are not trained on;
  their loss and top-1 (centre crop) are measured after every epoch, a check that the model
  learns more than its training images.
- Resume: each epoch reseeds the augmentation and loader randomness from (seed, epoch), and a
  run resumed mid-epoch reads (without training on) the batches it had done, so it ends with the
  same weights as an uninterrupted one (on CPU; GPU kernels are not bitwise deterministic).
- Several processes (`train.processes`, run under torchrun): DistributedDataParallel, nccl on
  GPUs and gloo on CPUs. `batch_size` is the batch of all processes together; each rank reads
  its own share of the shards (see readers.ShardDataset) or of a real folder (DistributedSampler),
  draws its augmentations from (seed, epoch, rank), and ranks with fewer batches are covered by
  DDP's `join`. Rank 0 alone shows progress, scores the held-out images and writes the state.
- Mixup / CutMix (`mixup`, `cutmix`; mixing.py) mix each step's crops after they are made; the
  loss learns their soft targets, while the head's own training and train top-1 keep the labels.
- The last BatchNorm of each residual block may start at zero (`zero_init_residual`);
  `sync_batchnorm` across GPUs under DDP; `channels_last` and `compile` are params.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from tqdm import tqdm

from imagenet_sd.core import distributed, seeds
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.params import TrainParams
from imagenet_sd.datasets import readers
from imagenet_sd.models import heads, network
from imagenet_sd.models.heads.base import Head, HeadTraining
from imagenet_sd.train import recipe, state
from imagenet_sd.train.augmentation import DeviceMultiCrop, collate_encoded
from imagenet_sd.train.mixing import Mixing
from imagenet_sd.train.state import EpochProgress, EpochStats

READ_EVERY_STEPS = 50      # steps between reads of the loss back to the host (and the divergence check)


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0
    skipped_on_device: int = 0      # images the device could not decode (augment_device: cuda)


def train(dataset: Dataset, num_classes: int, tp: TrainParams, seed: int, device: torch.device,
          state_path: Path | None = None, ctx: distributed.Context = distributed.SINGLE,
          holdout: Dataset | None = None, on_epoch: Callable[[EpochStats], None] = lambda stats: None,
          on_device: bool = False) -> TrainResult:
    """Train the network from random weights on `dataset` ((crops, label) samples, or with
    `on_device` ((JPEG bytes, draws), label) samples whose crops are made on `device`).

    With `state_path`, go on from the state saved there and save it as training goes.
    `holdout` ((image, label) samples) is scored after every epoch; `on_epoch` gets
    every epoch's stats on rank 0, restored epochs first.
    """
    torch.manual_seed(seeds.derive(seed, "train"))       # the same initial weights on every rank
    memory = torch.channels_last if tp.channels_last else torch.contiguous_format
    head = heads.get(tp.head).from_params(tp)
    net, model = build_network(head, num_classes, tp, device, ctx)
    head_training = head.training(net, lambda: network.build(tp.arch, head, num_classes, tp.zero_init_residual, tp.drop_path).to(device),
                                  tp.batch_size // ctx.world, device)
    optimizer = recipe.build_optimizer(net, tp)
    autocast, scaler = recipe.precision(recipe.autocast_dtype(tp.amp, device), device)
    augment = DeviceMultiCrop(dataset.transform.multicrop, device) if on_device else None
    mixing = Mixing.from_params(tp, num_classes)
    if isinstance(dataset, readers.ShardDataset):
        dataset.set_rank(ctx.rank, ctx.world)
    loader = make_loader(dataset, tp, seed, device, ctx, on_device)
    holdout_loader = None
    if holdout is not None and ctx.main:
        holdout_loader = DataLoader(holdout, batch_size=tp.batch_size // ctx.world, num_workers=tp.workers,
                                    pin_memory=device.type == "cuda")
    result, progress = TrainResult(model=net), None
    if state_path is not None and state_path.is_file():
        result.history, progress = state.load_state(state_path, net, optimizer, scaler, head_training)
        if progress is not None and not ctx.main:
            state.load_rank_buffers(state.rank_buffers_file(state_path, ctx.rank), net, len(result.history),
                                    progress.step)
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
            state.save_state(state_path, net, optimizer, scaler, result.history, p, head_training)
        else:
            state.save_rank_buffers(state.rank_buffers_file(state_path, ctx.rank), net, len(result.history), p.step)

    budget = recipe.Budget(tp.epochs, tp.max_steps, len(dataset))
    epoch = len(result.history) + 1
    while not budget.over(epoch, result.history[-1].steps if result.history else 0):
        # Randomness of this epoch from (seed, epoch, rank) alone: a resumed run draws the same.
        torch.manual_seed(seeds.derive(seed, "epoch", epoch, ctx.rank))           # augmentations without workers
        random.seed(seeds.derive(seed, "python", epoch, ctx.rank))               # timm's RandAugment, erasing
        np.random.seed(seeds.derive(seed, "numpy", epoch, ctx.rank) % 2**32)
        loader.generator.manual_seed(seeds.derive(seed, "loader", epoch, ctx.rank))  # shuffling, worker seeds
        if isinstance(dataset, readers.ShardDataset):
            dataset.set_epoch(epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        steps_before = result.history[-1].steps if result.history else 0
        stats = train_one_epoch(model, loader, optimizer, scaler, autocast, tp, epoch, budget, device,
                                ctx, progress, steps_before, checkpoint, augment, head_training, mixing, seed)
        progress = None
        if holdout_loader is not None:
            stats.holdout_loss, stats.holdout_top1 = score_holdout(net, holdout_loader, device, autocast, memory)
        result.history.append(stats)
        if ctx.main:
            if state_path is not None:
                state.save_state(state_path, net, optimizer, scaler, result.history, head_training=head_training)
            on_epoch(stats)
        ctx.barrier()       # no rank reads a state file another is still writing
        epoch += 1
    result.seconds = sum(s.seconds for s in result.history)
    result.skipped_on_device = augment.failed if augment is not None else 0
    return result


def train_one_epoch(model, loader, optimizer, scaler, autocast, tp: TrainParams, epoch: int, budget: recipe.Budget,
                    device: torch.device, ctx: distributed.Context = distributed.SINGLE,
                    restored: EpochProgress | None = None, steps_before: int = 0,
                    checkpoint: Callable[[EpochProgress], None] = lambda progress: None,
                    augment: DeviceMultiCrop | None = None,
                    head_training: HeadTraining | None = None, mixing: Mixing | None = None,
                    seed: int = 0) -> EpochStats:
    """One pass over this rank's data (cut short when a step budget runs out);
    `checkpoint(progress)` every `checkpoint_every_steps` steps.

    With `restored` (from a mid-epoch checkpoint), the batches of the steps it counts
    are read again, which replays the loader's randomness, but not trained on. With
    `augment`, batches are JPEG bytes and draws, made into crops on the device; with `mixing`,
    each step's crops are mixed and its targets soft.
    """
    model.train()
    stochastic = draws_in_forward(model)
    restored = restored or EpochProgress()
    # Rank 0 goes on from its saved sums; the other ranks' sums before the checkpoint are lost.
    p = EpochProgress(**{**asdict(restored), "step": 0, "seen": 0}) if ctx.main else EpochProgress()
    memory = torch.channels_last if tp.channels_last else torch.contiguous_format
    epochs = f"{tp.epochs}" if not tp.max_steps else f"~{math.ceil(tp.max_steps * tp.batch_size / budget.images)}"
    bar = tqdm(total=budget.images, desc=f"epoch {epoch}/{epochs}", unit="img", dynamic_ncols=True,
               disable=not ctx.main)
    sums = torch.zeros(2, dtype=torch.float64, device=device)   # loss x images, correct global crops
    # A rank that runs out of batches first keeps answering the others' gradient all-reduces
    # (and the head's own collectives).
    join = contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        joinable = head_training.joinable if head_training is not None else None
        join = Join([model, joinable], divide_by_initial_world_size=True) if joinable is not None else model.join()
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
            # The step's own randomness (mixing, drop path, dropout) from (seed, epoch, rank, step) alone: a
            # resumed run, which skips the steps it had done, draws what the uninterrupted run drew.
            step_seed = seeds.derive(seed, "step", epoch, ctx.rank, steps_before + p.step)
            targets = labels
            if mixing is not None:
                crops, targets = mixing(crops, labels, step_seed)
            # lr of this step: progress once this batch is done (all ranks together), so that
            # warmup never uses lr 0.
            p.lr = recipe.lr_at(budget.done(epoch, p.seen * ctx.world, steps_before + p.step), tp)
            for group in optimizer.param_groups:
                group["lr"] = p.lr
            # Forked: the loader's draws in this process (workers: 0) go on as if the step drew none. A network
            # that draws nothing in its forward (ResNet-50) skips the fork's state copies.
            with own_randomness(step_seed, device) if stochastic else contextlib.nullcontext():
                loss, global_logits = training_step(model, crops, labels, optimizer, scaler, autocast,
                                                    tp.label_smoothing, head_training, targets)
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


def training_step(model, crops: list[torch.Tensor], labels: torch.Tensor, optimizer, scaler, autocast,
                  label_smoothing: float, head_training: HeadTraining | None = None,
                  targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward every crop, multi-crop loss, backward, optimiser step; (loss, logits of the global crops).
    `targets`: what the loss learns (soft, after Mixup or CutMix); None: the labels."""
    with autocast:
        global_logits, local_logits = model(crops)
    loss = recipe.multicrop_loss(global_logits, local_logits, labels if targets is None else targets,
                                 label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if head_training is not None:
        head_training.after_backward(crops, labels, autocast)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), global_logits


# --------------------------------------------------------------------------- pieces

DROPOUTS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout)


def draws_in_forward(model: torch.nn.Module) -> bool:
    """Whether the network's training forward draws random numbers: dropout, or stochastic depth
    (timm's DropPath, `drop_prob`)."""
    return any((isinstance(m, DROPOUTS) and m.p > 0) or getattr(m, "drop_prob", 0) > 0 for m in model.modules())


@contextlib.contextmanager
def own_randomness(seed: int, device: torch.device):
    """Inside, torch draws from `seed` (on the CPU and `device`); after, the generators are as before."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield

class MultiCropNet(torch.nn.Module):
    """The network applied to a list of crops in one forward call, as its head makes logits of crops
    (`Head.crop_logits`). One call per step is what DistributedDataParallel expects; it wraps this module.
    """

    def __init__(self, net: torch.nn.Module, global_crops: int, head: Head):
        super().__init__()
        self.net, self.global_crops, self.head = net, global_crops, head

    def forward(self, crops: list[torch.Tensor]):
        return self.head.crop_logits(self.net, crops, self.global_crops)


def build_network(head: Head, num_classes: int, tp: TrainParams, device: torch.device, ctx: distributed.Context):
    """(the network, the module a step calls: the multi-crop wrapper, under DDP with several processes)."""
    memory = torch.channels_last if tp.channels_last else torch.contiguous_format
    net = network.build(tp.arch, head, num_classes, tp.zero_init_residual, tp.drop_path)
    if tp.sync_batchnorm and ctx.world > 1:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        elif ctx.main:
            print("note: train.sync_batchnorm needs CUDA; on the CPU each process keeps its own BatchNorm statistics")
    net = net.to(device, memory_format=memory)
    model = MultiCropNet(torch.compile(net) if tp.compile else net, tp.global_crops, head)
    if ctx.world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return net, model


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
