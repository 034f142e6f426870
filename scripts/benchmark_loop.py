#!/usr/bin/env python
"""Benchmark (not a test): images/s of the whole training loop beside each of its parts.

A starved GPU shows as a loop much slower than its step alone. On a shard set of
smooth random JPEGs at `--resolution` (what sd-generate stores), for each place the
multi-crop can run (`train.augment_device`):

- cpu:    the loader workers decode and crop (augmentation.MultiCrop);
- device: the workers read JPEG headers and draw; the device decodes and crops the
          batch (augmentation.DeviceMultiCrop; on a CPU machine this emulates the GPU
          path with CPU kernels, so its rates say nothing about a GPU),

it times, over the same batches:

- loader:  the DataLoader alone (train-resnet50's make_loader, `--workers` workers);
- augment: DeviceMultiCrop alone on batches already read (device path only);
- step:    loop.training_step alone on crops already on the device;
- loop:    all of it, as train_one_epoch runs it: next batch -> [crops on the device]
           -> to the device -> step.

for each classifier head of `--heads` (train.head: linear; trex, whose step adds the moving
average's forward pass and the memory write).

    python scripts/benchmark_loop.py                           # CPU: small sizes
    python scripts/benchmark_loop.py --device cuda --json bench-loop.json
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagenet_sd.core import distributed
from imagenet_sd.core.params import TrainParams
from imagenet_sd.datasets import readers, shards
from imagenet_sd.models import heads, network
from imagenet_sd.train import loop, recipe
from imagenet_sd.train.augmentation import DeviceMultiCrop, DrawCrops, MultiCrop, encoded_jpeg


def parse_args(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--images", type=int, default=4096 if cuda else 192, help="images in the shard set")
    p.add_argument("--distinct", type=int, default=128, help="distinct pictures, repeated to fill --images")
    p.add_argument("--resolution", type=int, default=512 if cuda else 128, help="stored image side")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=64 if cuda else 16, help="images a step (one GPU's share)")
    p.add_argument("--global-crops", type=int, default=1)
    p.add_argument("--global-size", type=int, default=224 if cuda else 64)
    p.add_argument("--local-crops", type=int, default=8 if cuda else 2)
    p.add_argument("--local-size", type=int, default=96 if cuda else 32)
    p.add_argument("--workers", type=int, default=8 if cuda else 2, help="DataLoader workers")
    p.add_argument("--amp", default="auto" if cuda else "none")
    p.add_argument("--heads", default="linear", help=f"comma-separated train.head values: {', '.join(heads.HEADS)}")
    p.add_argument("--steps", type=int, default=40 if cuda else 6, help="timed steps a row")
    p.add_argument("--warmup", type=int, default=5 if cuda else 2, help="untimed steps first")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not cuda:
        p.error("--device cuda but no CUDA device is visible")
    args.heads = args.heads.split(",")
    if any(head not in heads.HEADS for head in args.heads):
        p.error(f"--heads {','.join(args.heads)}: each must be one of {', '.join(heads.HEADS)}")
    if args.images < args.batch * (args.warmup + args.steps):
        p.error(f"--images {args.images} is fewer than batch x (warmup + steps) = "
                f"{args.batch * (args.warmup + args.steps)}; raise --images or lower --steps")
    return args


def write_shards(folder: Path, args) -> list[Path]:
    """`--distinct` smooth random colour pictures with grain (encoding 4096 at 512 px would take
    half a minute), repeated to `--images`, 100 a shard, labelled round-robin."""
    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(min(args.distinct, args.images)):
        coarse = torch.from_numpy(rng.random((1, 3, 4, 4), dtype=np.float32))
        smooth = torch.nn.functional.interpolate(coarse, size=(args.resolution,) * 2, mode="bicubic")[0]
        grain = torch.from_numpy(rng.normal(0, 8, (3, args.resolution, args.resolution)).astype(np.float32))
        pixels = (smooth * 255 + grain).clamp(0, 255).byte().permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
        pictures.append(buffer.getvalue())
    paths, samples = [], []
    for i in range(args.images):
        label = i % args.classes
        samples.append((shards.sample_key(label, i), pictures[i % len(pictures)],
                        {"class": f"c{label}", "label": label, "image_index": i}))
        if len(samples) == 100 or i == args.images - 1:
            paths.append(folder / shards.SHARD_PATTERN.format(len(paths)))
            shards.write_shard(paths[-1], samples)
            samples = []
    return paths


def train_params(args, head: str = "linear") -> TrainParams:
    return TrainParams(
        epochs=1, max_steps=0, batch_size=args.batch, lr=0.1, min_lr=0.0, nesterov=False, weight_decay=1e-4,
        warmup_epochs=0, label_smoothing=0.0, sync_batchnorm=False, global_crops=args.global_crops,
        global_crop_style="trex", global_crop_size=args.global_size, global_crop_scale=(0.25, 1.0),
        local_crops=args.local_crops, local_crop_size=args.local_size, local_crop_scale=(0.05, 0.25),
        holdout_per_class=0, augment_device="cpu", amp=args.amp, channels_last=args.device == "cuda",
        compile=False, workers=args.workers, processes=1, checkpoint_every_steps=0, work_dir=Path("."),
        device=args.device, head=head, trex_memory=8192)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


class Timed:
    """Images/s over the steps after `warmup`, from the first step's end to the last one's."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.start, self.images, self.steps = None, 0, 0

    def step_done(self, images: int) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()
        elif self.steps > self.warmup:
            self.images += images

    def result(self) -> float:
        sync(self.device)
        return rate(self.images, time.perf_counter() - self.start)


def measure(args, paths: list[Path], on_device: bool, device: torch.device, head: str = "linear") -> dict:
    tp = train_params(args, head)
    keys = [f"c{i}" for i in range(args.classes)]
    multicrop = MultiCrop.from_params(tp)
    dataset = readers.ShardDataset(paths, keys, DrawCrops(multicrop) if on_device else multicrop, seed=0,
                                decode=encoded_jpeg if on_device else None)
    dataset.set_epoch(1)
    total = args.warmup + args.steps
    augment = DeviceMultiCrop(multicrop, device) if on_device else None
    loader = loop.make_loader(dataset, tp, 0, device, distributed.SINGLE, on_device)

    # loader alone
    clock = Timed(args.warmup, torch.device("cpu"))
    batches = []
    for inputs, labels in loader:
        batches.append((inputs, labels))
        clock.step_done(len(labels))
        if clock.steps == total:
            break
    row = {"head": head, "path": "device" if on_device else "cpu", "loader": clock.result()}

    # augment alone (device path), on the batches just read
    crops = None
    if on_device:
        clock = Timed(args.warmup, device)
        for (jpegs, draws), labels in batches:
            crops, _ = augment(jpegs, draws)
            clock.step_done(len(labels))
        row["augment"] = clock.result()
    else:
        crops = batches[0][0]

    # step alone, on one batch of crops kept on the device
    torch.manual_seed(0)
    memory = torch.channels_last if tp.channels_last else torch.contiguous_format
    chosen = heads.get(tp.head).from_params(tp)
    net, model = loop.build_network(chosen, args.classes, tp, device, distributed.SINGLE)
    head_training = chosen.training(net, lambda: network.build(network.DEFAULT_ARCH, chosen, args.classes).to(device),
                                    tp.batch_size, device)
    optimizer = recipe.build_optimizer(net, tp)
    autocast, scaler = recipe.precision(recipe.autocast_dtype(tp.amp, device), device)
    fixed = [c.to(device, memory_format=memory) for c in crops]
    fixed_labels = batches[0][1][:len(fixed[0])].to(device)
    clock = Timed(args.warmup, device)
    for _ in range(total):
        loop.training_step(model, fixed, fixed_labels, optimizer, scaler, autocast, 0.0, head_training)
        clock.step_done(len(fixed_labels))
    row["step"] = clock.result()

    # the whole loop, as train_one_epoch runs it
    dataset.set_epoch(2)
    clock = Timed(args.warmup, device)
    for inputs, labels in loop.make_loader(dataset, tp, 0, device, distributed.SINGLE, on_device):
        crops, labels = loop.on_device(inputs, labels, augment, device, memory)
        loop.training_step(model, crops, labels, optimizer, scaler, autocast, 0.0, head_training)
        clock.step_done(len(labels))
        if clock.steps == total:
            break
    row["loop"] = clock.result()
    slowest = min(v for k, v in row.items() if k in ("loader", "augment", "step"))
    row["loop_over_slowest_part"] = row["loop"] / slowest
    return row


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    crops = f"{args.global_crops}x{args.global_size} + {args.local_crops}x{args.local_size}"
    print(f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; {args.images} JPEGs of "
          f"{args.resolution} px; batch {args.batch}; crops {crops}; {args.workers} workers; "
          f"{args.warmup} + {args.steps} steps a row", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="benchmark-loop-") as folder:
        paths = write_shards(Path(folder), args)
        rows = [measure(args, paths, on_device, device, head) for head in args.heads for on_device in (False, True)]
    print("\n| head | multi-crop on | loader img/s | augment img/s | step img/s | whole loop img/s | loop / slowest part |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        augment = f"{r['augment']:.1f}" if "augment" in r else "(in the loader)"
        where = "loader workers (cpu)" if r["path"] == "cpu" else f"{args.device} (device path)"
        print(f"| {r['head']} | {where} | {r['loader']:.1f} | {augment} | {r['step']:.1f} | {r['loop']:.1f} | "
              f"{r['loop_over_slowest_part']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
