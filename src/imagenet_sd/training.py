"""Training a ResNet-50 classifier from scratch on synthetic (or real) images.

The recipe is the "Bag of Tricks" ResNet-50 recipe (He et al., CVPR 2019) with the
paper's multi-crop augmentation (see augmentation.py):
- SGD, momentum 0.9, Nesterov; lr = `lr` x batch_size / 256 (linear scaling rule);
- linear warmup for `warmup_epochs`, then cosine decay to 0, updated every step;
- label smoothing; weight decay on conv and linear weights only (not on BatchNorm
  or biases); the last BatchNorm of each residual block starts at zero (each block
  starts as the identity, which stabilises the first steps);
- every crop carries its image's label and the loss is the mean over all crops;
  global crops go through the network together, local crops together (they have
  another size, and BatchNorm statistics are then taken over crops of one size).
Precision (`amp`), memory layout (`channels_last`) and `compile` are params.

Held-out images: the first `holdout_per_class` images of every class are not
trained on; their loss and top-1 (centre crop) are measured after every epoch, a
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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from tqdm import tqdm

from . import data, distributed, prompts, seeds, shards
from .publish import read_index
from .augmentation import MultiCrop
from .device import resolve
from .errors import UserError
from .evaluation import build_transform
from .io import atomic_write_text, replacing, write_json
from .params import Params, TrainParams, require_dir, writable_dir

GLOBAL_CROPS = 2
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


# --------------------------------------------------------------------------- pieces

def build_model(num_classes: int) -> torch.nn.Module:
    return torchvision.models.resnet50(weights=None, num_classes=num_classes, zero_init_residual=True)


def build_optimizer(model: torch.nn.Module, tp: TrainParams) -> torch.optim.SGD:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": tp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=peak_lr(tp), momentum=0.9, nesterov=True)


def peak_lr(tp: TrainParams) -> float:
    return tp.lr * tp.batch_size / 256


def lr_at(progress: float, tp: TrainParams) -> float:
    """Learning rate after `progress` epochs (fractional): linear warmup, then cosine to 0.

    Measured in epochs rather than steps so that it does not depend on how many
    batches the workers' partial batches make.
    """
    if progress < tp.warmup_epochs:
        return peak_lr(tp) * progress / tp.warmup_epochs
    decay = min(1.0, (progress - tp.warmup_epochs) / max(tp.epochs - tp.warmup_epochs, 1e-9))
    return peak_lr(tp) * 0.5 * (1 + math.cos(math.pi * decay))


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
                ctx: distributed.Context) -> DataLoader:
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
                      num_workers=tp.workers, pin_memory=device.type == "cuda", generator=generator)


def crop_logits(model: torch.nn.Module, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of the global crops (crop-major: all crop-1s, then all crop-2s) and of the local crops."""
    global_logits = model(torch.cat(crops[:GLOBAL_CROPS]))
    local_logits = model(torch.cat(crops[GLOBAL_CROPS:])) if len(crops) > GLOBAL_CROPS else None
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
    """The network applied to a list of crops in one forward call (global crops together, local together).

    One call per step is what DistributedDataParallel expects; it wraps this module.
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, crops: list[torch.Tensor]):
        return crop_logits(self.net, crops)


# --------------------------------------------------------------------------- the loop

def training_step(model, crops: list[torch.Tensor], labels: torch.Tensor, optimizer, scaler, autocast,
                  label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward every crop, multi-crop loss, backward, optimiser step; (loss, logits of the global crops)."""
    with autocast:
        global_logits, local_logits = model(crops)
    loss = multicrop_loss(global_logits, local_logits, labels, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
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


def train_one_epoch(model, loader, optimizer, scaler, autocast, tp: TrainParams, epoch: int,
                    images_per_epoch: int, device: torch.device,
                    ctx: distributed.Context = distributed.SINGLE, restored: EpochProgress | None = None,
                    checkpoint: Callable[[EpochProgress], None] = lambda progress: None) -> EpochStats:
    """One pass over this rank's data; `checkpoint(progress)` every `checkpoint_every_steps` steps.

    With `restored` (from a mid-epoch checkpoint), the batches of the steps it counts
    are read again, which replays the loader's randomness, but not trained on.
    """
    model.train()
    restored = restored or EpochProgress()
    # Rank 0 goes on from its saved sums; the other ranks' sums before the checkpoint are lost.
    p = EpochProgress(**{**asdict(restored), "step": 0, "seen": 0}) if ctx.main else EpochProgress()
    memory = torch.channels_last if tp.channels_last else torch.contiguous_format
    bar = tqdm(total=images_per_epoch, desc=f"epoch {epoch}/{tp.epochs}", unit="img", dynamic_ncols=True,
               disable=not ctx.main)
    sums = torch.zeros(2, dtype=torch.float64, device=device)   # loss x images, correct global crops
    # A rank that runs out of batches first keeps answering the others' gradient all-reduces.
    join = model.join() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
    with join:
        clock = time.perf_counter()
        for crops, labels in loader:
            p.step += 1
            p.seen += len(labels)
            bar.update(len(labels) * ctx.world)
            if p.step <= restored.step:
                clock = time.perf_counter()
                continue
            crops = [c.to(device, non_blocking=True, memory_format=memory) for c in crops]
            labels = labels.to(device, non_blocking=True)
            # lr of this step: progress once this batch is done (all ranks together), so that
            # warmup never uses lr 0.
            p.lr = lr_at(epoch - 1 + min(1.0, p.seen * ctx.world / images_per_epoch), tp)
            for group in optimizer.param_groups:
                group["lr"] = p.lr
            loss, global_logits = training_step(model, crops, labels, optimizer, scaler, autocast,
                                                tp.label_smoothing)
            # Summed on the device: reading a number back every step would stall the GPU's queue.
            sums += torch.stack([loss.double() * len(labels),
                                 (global_logits.argmax(1) == labels.repeat(GLOBAL_CROPS)).sum().double()])
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
    if ctx.world > 1:
        dist.all_reduce(totals)
    loss_sum, correct, counted, seen = totals.tolist()
    if seen == 0:
        raise UserError("the training set yielded no images; check the shards or image folder")
    counted = max(counted, 1)
    return EpochStats(epoch=epoch, loss=loss_sum / counted, train_top1=100.0 * correct / (GLOBAL_CROPS * counted),
                      lr=p.lr, images=int(seen), seconds=p.seconds)


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
               progress: EpochProgress | None = None) -> None:
    """Everything needed to go on: after the last finished epoch, or `progress` steps into the next."""
    state = {"epoch": len(history), "progress": asdict(progress) if progress else None,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "history": [asdict(h) for h in history]}
    atomic_save(state, path)


def atomic_save(obj, path: Path) -> None:
    """torch.save under a temporary name, then rename: a kill never leaves half a file."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def load_state(path: Path, model, optimizer, scaler) -> tuple[list[EpochStats], EpochProgress | None]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    progress = EpochProgress(**state["progress"]) if state.get("progress") else None
    return [EpochStats(**h) for h in state["history"]], progress


def train(dataset: Dataset, num_classes: int, tp: TrainParams, seed: int, device: torch.device,
          state_path: Path | None = None, ctx: distributed.Context = distributed.SINGLE,
          holdout: Dataset | None = None, on_epoch: Callable[[EpochStats], None] = lambda stats: None) -> TrainResult:
    """Train a ResNet-50 from random weights on `dataset` ((crops, label) samples).

    With `state_path`, go on from the state saved there and save it as training goes.
    `holdout` ((image, label) samples) is scored after every epoch; `on_epoch` gets
    every epoch's stats on rank 0, restored epochs first.
    """
    torch.manual_seed(seeds.derive(seed, "train"))       # the same initial weights on every rank
    memory = torch.channels_last if tp.channels_last else torch.contiguous_format
    net = build_model(num_classes).to(device, memory_format=memory)
    model = MultiCropNet(torch.compile(net) if tp.compile else net)
    if ctx.world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(net, tp)
    autocast, scaler = _amp(autocast_dtype(tp.amp, device), device)
    if isinstance(dataset, data.ShardDataset):
        dataset.set_rank(ctx.rank, ctx.world)
    loader = make_loader(dataset, tp, seed, device, ctx)
    holdout_loader = None
    if holdout is not None and ctx.main:
        holdout_loader = DataLoader(holdout, batch_size=tp.batch_size // ctx.world, num_workers=tp.workers,
                                    pin_memory=device.type == "cuda")
    result, progress = TrainResult(model=net), None
    if state_path is not None and state_path.is_file():
        result.history, progress = load_state(state_path, net, optimizer, scaler)
        if ctx.main:
            where = f"epoch {len(result.history)}" + (f" and step {progress.step}" if progress else "")
            print(f"resuming after {where} from {state_path}")
    if ctx.main:
        for stats in result.history:
            on_epoch(stats)

    def checkpoint(p: EpochProgress) -> None:
        if state_path is not None and ctx.main:
            save_state(state_path, net, optimizer, scaler, result.history, p)

    for epoch in range(len(result.history) + 1, tp.epochs + 1):
        # Randomness of this epoch from (seed, epoch, rank) alone: a resumed run draws the same.
        torch.manual_seed(seeds.derive(seed, "epoch", epoch, ctx.rank))           # augmentations without workers
        loader.generator.manual_seed(seeds.derive(seed, "loader", epoch, ctx.rank))  # shuffling, worker seeds
        if isinstance(dataset, data.ShardDataset):
            dataset.set_epoch(epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, scaler, autocast, tp, epoch, len(dataset), device,
                                ctx, progress, checkpoint)
        progress = None
        if holdout_loader is not None:
            stats.holdout_loss, stats.holdout_top1 = score_holdout(net, holdout_loader, device, autocast, memory)
        result.history.append(stats)
        if ctx.main:
            if state_path is not None:
                save_state(state_path, net, optimizer, scaler, result.history)
            on_epoch(stats)
        ctx.barrier()       # no rank reads a state file another is still writing
    result.seconds = sum(s.seconds for s in result.history)
    return result


# --------------------------------------------------------------------------- inputs and outputs

def open_training_set(params: Params, keys: list[str], shards_dir: Path) -> tuple[Dataset, Dataset | None]:
    """The training images `params.source` names and their held-out part, checked before anything is written."""
    tp = params.train
    multicrop = MultiCrop.from_params(tp)
    # Scored like the evaluation scores real images: resize by 256/224 of the crop, centre crop.
    centre = build_transform(round(tp.global_crop_size * 256 / 224), tp.global_crop_size)
    if params.source == "real":
        key = f"profiles.{params.profile}.data.train"
        if params.data.train is None:
            raise UserError(f"params.yaml: {key} is empty but source = 'real' needs the real train folder; "
                            "set it or use source: synthetic")
        return data.folder_splits(require_dir(key, params.data.train), keys, key, tp.holdout_per_class,
                                  multicrop, centre)
    index = read_index(shards_dir)
    paths = [shards_dir / entry["file"] for entry in index["shards"]]
    if not paths:
        raise UserError(f"no shards in {shards_dir}; run: dvc repro sd-generate")
    data.check_index_classes(index, keys, shards_dir)
    return data.shard_splits(paths, keys, params.seed, tp.holdout_per_class, multicrop, centre, index)


def save_checkpoint(path: Path, model: torch.nn.Module, rows: list[prompts.ClassPrompt], tp: TrainParams,
                    extra: dict) -> None:
    """The checkpoint evaluation reads; loadable into a plain torchvision or timm resnet50 (README)."""
    ordered = sorted(rows, key=lambda r: r.index)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    checkpoint = {"arch": "resnet50", "classes": [r.key for r in ordered], "wnids": [r.wnid for r in ordered],
                  "state_dict": state, "image_size": tp.global_crop_size,
                  # Plain types only, so torch.load(weights_only=True) and other tools read it.
                  "params": json.loads(json.dumps({**asdict(tp), **extra}, default=str))}
    atomic_save(checkpoint, path)


def open_log(folder: Path):
    """The DVCLive logger writing `folder`; it leaves dvc.yaml and experiments to the pipeline."""
    from dvclive import Live   # imports DVC: only the logging rank pays for it
    return Live(str(folder), save_dvc_exp=False, dvcyaml=False)


def log_epoch(live, stats: EpochStats) -> None:
    live.step = stats.epoch
    for name in LOGGED:
        value = getattr(stats, name)
        if value is not None:
            live.log_metric(name, round(value, 6))
    live.next_step()


def summary(result: TrainResult, params: Params, num_classes: int, skipped: int) -> dict:
    last = result.history[-1]
    images = sum(s.images for s in result.history)
    holdout = {} if last.holdout_top1 is None else {"holdout_loss": round(last.holdout_loss, 4),
                                                     "holdout_top1": round(last.holdout_top1, 2)}
    return {"epochs": len(result.history), "images": last.images, "loss": round(last.loss, 4),
            "train_top1": round(last.train_top1, 2), **holdout,
            "images_per_second": round(images / result.seconds, 1) if result.seconds else 0.0,
            "seconds": round(result.seconds, 1), "source": params.source, "classes": num_classes,
            "skipped": skipped}


def data_identity(params: Params, shards_dir: Path) -> str:
    """What the training images are, cheaply: the shards' index (sha256s inside) or the real folder."""
    if params.source == "real":
        return f"real:{params.data.train.resolve()}"
    index = shards_dir / shards.INDEX_FILE
    if index.is_file():
        return "shards:" + hashlib.sha256(index.read_bytes()).hexdigest()
    return "shards:" + ",".join(f"{p.name}:{p.stat().st_size}" for p in shards.list_shards(shards_dir))


def code_identity() -> str:
    """The training code itself: after an edit, a finished state must not pass for the new result."""
    here = Path(__file__).parent
    sources = b"".join((here / name).read_bytes() for name in ("training.py", "augmentation.py", "data.py"))
    return hashlib.sha256(sources).hexdigest()


# Params that do not change the weights, so a run may resume across a change of them.
NOT_IN_STATE_KEY = ("workers", "device", "work_dir", "checkpoint_every_steps", "compile")


def state_file(params: Params, keys: list[str], shards_dir: Path) -> Path:
    """train.work_dir/<key>/last.pt; the key leaves out what does not change the weights."""
    recipe = {k: v for k, v in asdict(params.train).items() if k not in NOT_IN_STATE_KEY}
    what = {"recipe": recipe, "seed": params.seed, "source": params.source, "classes": keys,
            "data": data_identity(params, shards_dir), "code": code_identity()}
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = writable_dir(f"profiles.{params.profile}.train.work_dir", params.train.work_dir,
                          params.train.work_dir / key)
    if int(os.environ.get("RANK", 0)) == 0:        # torchrun's other ranks would write the same file at once
        atomic_write_text(folder / "recipe.json", json.dumps(what, indent=1, default=str) + "\n")
    return folder / "last.pt"


def prepare(params: Params, prompts_path: Path, shards_dir: Path):
    """Everything checked before a step is taken (or a worker started): classes, device, data, work folder."""
    rows = prompts.read(prompts_path)
    keys = data.class_keys(rows)
    device = resolve(params.train.device, f"profiles.{params.profile}.train.device")
    autocast_dtype(params.train.amp, device, f"profiles.{params.profile}.train.amp")
    dataset, holdout = open_training_set(params, keys, shards_dir)
    return rows, keys, device, dataset, holdout, state_file(params, keys, shards_dir)


def run(params: Params, prompts_path: Path, shards_dir: Path, out: Path, metrics_path: Path,
        log_dir: Path) -> dict | None:
    """The train-resnet50 stage: validate inputs, train, write checkpoint, metrics and the DVCLive log.

    Under torchrun every rank trains; rank 0 writes and returns the metrics, the others None.
    """
    rows, keys, device, dataset, holdout, state_path = prepare(params, prompts_path, shards_dir)
    ctx = distributed.start("nccl" if device.type == "cuda" else "gloo")
    live = None
    try:
        device = ctx.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if ctx.main:
            held = f", {len(holdout)} held out" if holdout is not None else ""
            print(f"training ResNet-50 on {len(dataset)} {params.source} images{held} of {len(keys)} classes, "
                  f"{params.train.epochs} epochs, on {ctx.world} x {device.type}")
            live = open_log(log_dir)
        result = train(dataset, len(keys), params.train, params.seed, device, state_path, ctx, holdout,
                       on_epoch=lambda stats: log_epoch(live, stats))
        skipped = sum(ctx.all_gather(dataset.skipped.value if isinstance(dataset, data.ShardDataset) else 0))
        if not ctx.main:
            return None
        save_checkpoint(out, result.model, rows, params.train, {"seed": params.seed, "source": params.source})
        metrics = summary(result, params, len(keys), skipped)
        metrics["processes"] = ctx.world
        write_json(metrics_path, metrics)
        return metrics
    finally:
        if live is not None:
            live.end()
        distributed.stop()
