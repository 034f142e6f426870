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
Mixed precision is used on CUDA only.

Resume: after every epoch the whole training state (model, optimiser, grad scaler,
epoch, curve) is saved atomically to `train.work_dir/<key>/last.pt`, the key
hashing what decides the weights (recipe, seed, source, classes, the data). A
killed run starts again from the last finished epoch. Each epoch reseeds the
augmentation and loader randomness from (seed, epoch), so a resumed run ends
with the same weights as an uninterrupted one (on CPU; GPU kernels are not
bitwise deterministic). The final model is a normal DVC output written from it.

Several processes (`train.processes`, run under torchrun): DistributedDataParallel,
nccl on GPUs and gloo on CPUs. `batch_size` is the batch of all processes
together; each rank reads its own share of the shards (see data.ShardDataset) or
of a real folder (DistributedSampler), draws its augmentations from (seed, epoch,
rank), and ranks with fewer batches are covered by DDP's `join`. Rank 0 alone
shows progress and writes the state, curve, checkpoint and metrics.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from tqdm import tqdm

from . import data, distributed, prompts, seeds, shards
from .augmentation import MultiCrop
from .device import resolve
from .errors import UserError
from .io import replacing, write_json, write_tsv
from .params import Params, TrainParams, require_dir

CURVE_COLUMNS = ["epoch", "loss", "train_top1", "lr", "images_per_second"]
GLOBAL_CROPS = 2


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_top1: float        # percent, on the global crops, in train mode (augmented)
    lr: float                # at the last step of the epoch
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def row(self) -> list:
        return [self.epoch, f"{self.loss:.4f}", f"{self.train_top1:.2f}", f"{self.lr:.6g}",
                f"{self.images_per_second:.1f}"]


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


def _amp(device: torch.device) -> tuple[torch.autocast, torch.amp.GradScaler]:
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=on_cuda)
    # float16 needs loss scaling against underflowing gradients; bfloat16 does not.
    scaler = torch.amp.GradScaler("cuda", enabled=on_cuda and dtype == torch.float16)
    return autocast, scaler


def crop_logits(model: torch.nn.Module, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of the global crops (crop-major: all crop-1s, then all crop-2s) and of the local crops."""
    global_logits = model(torch.cat(crops[:GLOBAL_CROPS]))
    local_logits = model(torch.cat(crops[GLOBAL_CROPS:])) if len(crops) > GLOBAL_CROPS else None
    return global_logits, local_logits


def multicrop_loss(global_logits: torch.Tensor, local_logits: torch.Tensor | None, labels: torch.Tensor,
                   label_smoothing: float) -> torch.Tensor:
    """Cross-entropy averaged over every crop of every image, each crop labelled with its image's class."""
    total = F.cross_entropy(global_logits.float(), labels.repeat(GLOBAL_CROPS), reduction="sum",
                            label_smoothing=label_smoothing)
    crops = global_logits.shape[0]
    if local_logits is not None:
        total = total + F.cross_entropy(local_logits.float(), labels.repeat(local_logits.shape[0] // len(labels)),
                                        reduction="sum", label_smoothing=label_smoothing)
        crops += local_logits.shape[0]
    return total / crops


# --------------------------------------------------------------------------- the loop

def train_one_epoch(model, loader, optimizer, scaler, autocast, tp: TrainParams, epoch: int,
                    images_per_epoch: int, device: torch.device,
                    ctx: distributed.Context = distributed.SINGLE) -> EpochStats:
    model.train()
    loss_sum, correct, seen, lr = 0.0, 0, 0, 0.0
    start = time.perf_counter()
    bar = tqdm(total=images_per_epoch, desc=f"epoch {epoch}/{tp.epochs}", unit="img", dynamic_ncols=True,
               disable=not ctx.main)
    # A rank that runs out of batches first keeps answering the others' gradient all-reduces.
    join = model.join() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
    with join:
        for crops, labels in loader:
            crops = [c.to(device, non_blocking=True) for c in crops]
            labels = labels.to(device, non_blocking=True)
            # lr of this step: progress once this batch is done (all ranks together), so that
            # warmup never uses lr 0.
            lr = lr_at(epoch - 1 + min(1.0, (seen + len(labels)) * ctx.world / images_per_epoch), tp)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                global_logits, local_logits = model(crops)
            loss = multicrop_loss(global_logits, local_logits, labels, tp.label_smoothing)
            if not torch.isfinite(loss):
                raise UserError(f"training loss became {loss.item()} in epoch {epoch}; lower train.lr "
                                f"(now {tp.lr}) or raise train.warmup_epochs in params.yaml")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.item() * len(labels)
            correct += (global_logits.argmax(1) == labels.repeat(GLOBAL_CROPS)).sum().item()
            seen += len(labels)
            bar.update(len(labels) * ctx.world)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
    bar.close()
    totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")
    if ctx.world > 1:
        dist.all_reduce(totals)
    loss_sum, correct, seen = totals.tolist()
    if seen == 0:
        raise UserError("the training set yielded no images; check the shards or image folder")
    return EpochStats(epoch=epoch, loss=loss_sum / seen, train_top1=100.0 * correct / (GLOBAL_CROPS * seen),
                      lr=lr, images=int(seen), seconds=time.perf_counter() - start)


def save_state(path: Path, model, optimizer, scaler, history: list[EpochStats]) -> None:
    """Everything needed to go on after the last finished epoch; written under a temporary name, then renamed."""
    state = {"epoch": history[-1].epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "history": [asdict(h) for h in history]}
    atomic_save(state, path)


def atomic_save(obj, path: Path) -> None:
    """torch.save under a temporary name, then rename: a kill never leaves half a file."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def load_state(path: Path, model, optimizer, scaler) -> list[EpochStats]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return [EpochStats(**h) for h in state["history"]]


class MultiCropNet(torch.nn.Module):
    """The network applied to a list of crops in one forward call (global crops together, local together).

    One call per step is what DistributedDataParallel expects; it wraps this module.
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, crops: list[torch.Tensor]):
        return crop_logits(self.net, crops)


def train(dataset: Dataset, num_classes: int, tp: TrainParams, seed: int, device: torch.device,
          curve_path: Path | None = None, state_path: Path | None = None,
          ctx: distributed.Context = distributed.SINGLE) -> TrainResult:
    """Train a ResNet-50 from random weights on `dataset` ((crops, label) samples).

    With `state_path`, go on from the state saved there and save it after every epoch.
    """
    torch.manual_seed(seeds.derive(seed, "train"))       # the same initial weights on every rank
    net = build_model(num_classes).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    model = MultiCropNet(net)
    if ctx.world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(net, tp)
    autocast, scaler = _amp(device)
    if isinstance(dataset, data.ShardDataset):
        dataset.set_rank(ctx.rank, ctx.world)
    loader = make_loader(dataset, tp, seed, device, ctx)
    result = TrainResult(model=net)
    if state_path is not None and state_path.is_file():
        result.history = load_state(state_path, net, optimizer, scaler)
        if ctx.main:
            print(f"resuming after epoch {len(result.history)} from {state_path}")
    first_epoch = len(result.history) + 1
    for epoch in range(first_epoch, tp.epochs + 1):
        # Randomness of this epoch from (seed, epoch, rank) alone: a resumed run draws the same.
        torch.manual_seed(seeds.derive(seed, "epoch", epoch, ctx.rank))           # augmentations without workers
        loader.generator.manual_seed(seeds.derive(seed, "loader", epoch, ctx.rank))  # shuffling, worker seeds
        if isinstance(dataset, data.ShardDataset):
            dataset.set_epoch(epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, scaler, autocast, tp, epoch, len(dataset), device, ctx)
        result.history.append(stats)
        if state_path is not None and ctx.main:
            save_state(state_path, net, optimizer, scaler, result.history)
        if curve_path is not None and ctx.main:       # every epoch, to watch a long run
            write_tsv(curve_path, CURVE_COLUMNS, [s.row() for s in result.history])
        ctx.barrier()       # no rank reads a state file another is still writing
    if curve_path is not None and ctx.main and first_epoch > tp.epochs:    # all restored: no epoch wrote it
        write_tsv(curve_path, CURVE_COLUMNS, [s.row() for s in result.history])
    result.seconds = sum(s.seconds for s in result.history)
    return result


# --------------------------------------------------------------------------- inputs and outputs

def open_training_set(params: Params, keys: list[str], shards_dir: Path) -> Dataset:
    """The dataset `params.source` names, checked before anything is trained or written."""
    transform = MultiCrop.from_params(params.train)
    if params.source == "real":
        key = f"profiles.{params.profile}.data.train"
        if params.data.train is None:
            raise UserError(f"params.yaml: {key} is empty but source = 'real' needs the real train folder; "
                            "set it or use source: synthetic")
        return data.FolderDataset(require_dir(key, params.data.train), keys, transform, key)
    paths = shards.list_shards(shards_dir)
    if not paths:
        raise UserError(f"no shards in {shards_dir}; run: dvc repro sd-generate")
    data.check_shard_classes(paths, keys)
    return data.ShardDataset(paths, keys, transform, params.seed)


def save_checkpoint(path: Path, model: torch.nn.Module, rows: list[prompts.ClassPrompt], tp: TrainParams,
                    extra: dict) -> None:
    """The checkpoint evaluation reads; loadable into a plain torchvision resnet50."""
    ordered = sorted(rows, key=lambda r: r.index)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    checkpoint = {"arch": "resnet50", "classes": [r.key for r in ordered], "wnids": [r.wnid for r in ordered],
                  "state_dict": state, "image_size": tp.global_crop_size,
                  # Plain types only, so torch.load(weights_only=True) and other tools read it.
                  "params": json.loads(json.dumps({**asdict(tp), **extra}, default=str))}
    atomic_save(checkpoint, path)


def summary(result: TrainResult, params: Params, num_classes: int, skipped: int) -> dict:
    last = result.history[-1]
    images = sum(s.images for s in result.history)
    return {"epochs": len(result.history), "images": last.images, "loss": round(last.loss, 4),
            "train_top1": round(last.train_top1, 2),
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


def state_file(params: Params, keys: list[str], shards_dir: Path) -> Path:
    """train.work_dir/<key>/last.pt; the key leaves out what does not change the weights."""
    recipe = {k: v for k, v in asdict(params.train).items() if k not in ("workers", "device", "work_dir")}
    what = {"recipe": recipe, "seed": params.seed, "source": params.source, "classes": keys,
            "data": data_identity(params, shards_dir)}
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = params.train.work_dir / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "recipe.json").write_text(json.dumps(what, indent=1, default=str) + "\n")
    except OSError as exc:
        raise UserError(f"params.yaml: profiles.{params.profile}.train.work_dir = {str(params.train.work_dir)!r}: "
                        f"cannot write there ({exc.strerror or exc}); point it at a writable folder") from None
    return folder / "last.pt"


def prepare(params: Params, prompts_path: Path, shards_dir: Path):
    """Everything checked before a step is taken (or a worker started): classes, device, data, work folder."""
    rows = prompts.read(prompts_path)
    keys = data.class_keys(rows)
    device = resolve(params.train.device, f"profiles.{params.profile}.train.device")
    dataset = open_training_set(params, keys, shards_dir)
    return rows, keys, device, dataset, state_file(params, keys, shards_dir)


def run(params: Params, prompts_path: Path, shards_dir: Path, out: Path, metrics_path: Path,
        curve_path: Path) -> dict | None:
    """The train-resnet50 stage: validate inputs, train, write checkpoint, metrics and curve.

    Under torchrun every rank trains; rank 0 writes and returns the metrics, the others None.
    """
    rows, keys, device, dataset, state_path = prepare(params, prompts_path, shards_dir)
    ctx = distributed.start("nccl" if device.type == "cuda" else "gloo")
    try:
        device = ctx.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if ctx.main:
            print(f"training ResNet-50 on {len(dataset)} {params.source} images of {len(keys)} classes, "
                  f"{params.train.epochs} epochs, on {ctx.world} x {device.type}")
        result = train(dataset, len(keys), params.train, params.seed, device, curve_path, state_path, ctx)
        skipped = sum(ctx.all_gather(dataset.skipped.value if isinstance(dataset, data.ShardDataset) else 0))
        if not ctx.main:
            return None
        save_checkpoint(out, result.model, rows, params.train, {"seed": params.seed, "source": params.source})
        metrics = summary(result, params, len(keys), skipped)
        metrics["processes"] = ctx.world
        write_json(metrics_path, metrics)
        return metrics
    finally:
        distributed.stop()
