#!/usr/bin/env python
"""Benchmark (not a test): training images/s of the stage's ResNet-50 step, without data loading.

Each row runs `imagenet_sd.train.loop.training_step` (forward of every crop, multi-crop
loss, backward, SGD step: the code train-resnet50 runs) on random inputs already
on the device, so it measures the model's side alone; the loader's side is
`scripts/benchmark_loader.py`. Rows cover three crop layouts:

- single crop:  one 224 px crop an image (what NVIDIA's published ResNet-50
  training figures measure: 2470 img/s on an A100 80GB with AMP, batch 256);
- two crops:    the 2 global crops of the recipe with `local_crops: 0`;
- multi-crop:   2 global crops at 224 + 6 local crops at 96 (the paper profile),

each with and without channels_last and over the precisions asked for, for ResNet-50
(SGD, the paper's recipe). Each other network of `--archs` (a `train.arch`, e.g.
timm:vit_base_patch16_224) gets the single-crop row with AdamW, the ViT-B recipe's step. FLOPs of
one training image (forward + backward, all its crops) are counted with
torch.utils.flop_counter on the meta device, so a row also says how much more
work multi-crop is and what TFLOP/s the step reaches.

    python scripts/benchmark_train.py                                 # CPU: small sizes
    python scripts/benchmark_train.py --device cuda --json bench-train.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from imagenet_sd.core.params import PRECISIONS, TrainParams
from imagenet_sd.models import network
from imagenet_sd.models.heads.linear import Linear
from imagenet_sd.train import loop, recipe

# NVIDIA DeepLearningExamples, ResNet-50 v1.5 for PyTorch, training throughput with AMP
# at batch 256 (the figure the issue names). Other GPUs: no published figure here.
NVIDIA_AMP_IMAGES_PER_S = {"A100": 2470}


def parse_args(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=256 if cuda else 8, help="images a step")
    parser.add_argument("--global-size", type=int, default=224 if cuda else 96)
    parser.add_argument("--local-size", type=int, default=96 if cuda else 48)
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--archs", default=network.DEFAULT_ARCH,
                        help="comma-separated train.arch values; networks other than resnet50: single crop, AdamW")
    parser.add_argument("--amp", default="auto" if cuda else "none,bf16",
                        help=f"comma-separated, of {', '.join(PRECISIONS)}")
    parser.add_argument("--compile", action="store_true", help="also rows with torch.compile")
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2, help="untimed steps a row")
    parser.add_argument("--steps", type=int, default=30 if cuda else 5, help="timed steps a row")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    args.amp = args.amp.split(",")
    args.archs = args.archs.split(",")
    for arch in args.archs:
        if (why := network.unbuildable(arch)) is not None:
            parser.error(f"--archs: {arch!r} {why}")
    bad = [a for a in args.amp if a not in PRECISIONS]
    if bad:
        parser.error(f"--amp {bad[0]!r} is not one of {', '.join(PRECISIONS)}")
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda but no CUDA device is visible")
    return args


def layouts(args, arch: str) -> dict[str, list[int]]:
    """Crop sizes of one image in each layout `arch` is measured in, global crops first."""
    g, loc = args.global_size, args.local_size
    if arch != network.DEFAULT_ARCH:
        return {"single crop": [g]}
    return {"single crop": [g], "two crops": [g, g], "multi-crop": [g, g] + [loc] * args.local_crops}


def train_flops_per_image(arch: str, sizes: list[int], classes: int) -> float:
    """FLOPs of forward + backward of one image's crops, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        net = network.build(arch, Linear(), classes)
        crops = [torch.randn(1, 3, s, s) for s in sizes]
        with FlopCounterMode(display=False) as counter:
            global_logits, local_logits = Linear().crop_logits(net, crops, min(2, len(sizes)))
            loss = recipe.multicrop_loss(global_logits, local_logits, torch.zeros(1, dtype=torch.long), 0.1)
            loss.backward()
    return counter.get_total_flops()


def measure(args, device: torch.device, arch: str, sizes: list[int], amp: str, channels_last: bool,
            compile_: bool) -> float:
    """Median images/s of `args.steps` timed training steps."""
    torch.manual_seed(0)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    net = network.build(arch, Linear(), args.classes).to(device, memory_format=memory)
    model = loop.MultiCropNet(torch.compile(net) if compile_ else net, min(2, len(sizes)), Linear())
    tp = TrainParams(epochs=1, max_steps=0, batch_size=args.batch, lr=0.1, min_lr=0.0, nesterov=False,
                     weight_decay=1e-4, warmup_epochs=0, label_smoothing=0.1, sync_batchnorm=False,
                     global_crops=min(2, len(sizes)), global_crop_style="dino", global_crop_size=sizes[0],
                     global_crop_scale=(0.25, 1.0), local_crops=max(0, len(sizes) - 2), local_crop_size=sizes[-1], local_crop_scale=(0.05, 0.25),
                     holdout_per_class=0, augment_device="cpu", amp=amp, channels_last=channels_last, compile=compile_, workers=0,
                     processes=1, checkpoint_every_steps=0, work_dir=None, device=device.type, arch=arch,
                     optimizer="sgd" if arch == network.DEFAULT_ARCH else "adamw")
    optimizer = recipe.build_optimizer(net, tp)
    autocast, scaler = recipe.precision(recipe.autocast_dtype(amp, device), device)
    crops = [torch.randn(args.batch, 3, s, s, device=device).contiguous(memory_format=memory) for s in sizes]
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        loop.training_step(model, crops, labels, optimizer, scaler, autocast, 0.1)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return args.batch / statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"{args.warmup} warm-up + {args.steps} timed steps a row", file=sys.stderr)
    rows = []
    for arch in args.archs:
        # channels_last is a convolution layout: a ViT's rows leave it off.
        layouts_of = (False, True) if arch == network.DEFAULT_ARCH else (False,)
        for layout, sizes in layouts(args, arch).items():
            flops = train_flops_per_image(arch, sizes, args.classes)
            for amp in args.amp:
                for channels_last in layouts_of:
                    for compile_ in (False, True) if args.compile else (False,):
                        rate = measure(args, device, arch, sizes, amp, channels_last, compile_)
                        rows.append({"arch": arch, "layout": layout, "crops": "+".join(str(s) for s in sizes),
                                     "amp": amp, "channels_last": channels_last, "compile": compile_,
                                     "images_per_s": rate, "gflop_per_image": flops / 1e9,
                                     "tflop_per_s": rate * flops / 1e12})
                        print(f"{arch:10s} {layout:12s} amp={amp:4s} channels_last={channels_last!s:5s} "
                              f"compile={compile_!s:5s} {rate:8.1f} img/s", file=sys.stderr, flush=True)
    single = {r["arch"]: r["gflop_per_image"] for r in reversed(rows) if r["layout"] == "single crop"}
    print("\n| arch | layout | crops | amp | channels_last | compile | img/s | GFLOP/img (x single) | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['layout']} | {r['crops']} | {r['amp']} | {r['channels_last']} | {r['compile']} | "
              f"{r['images_per_s']:.1f} | {r['gflop_per_image']:.1f} "
              f"({r['gflop_per_image'] / single[r['arch']]:.2f}x) | {r['tflop_per_s']:.2f} |")
    reference = next((v for k, v in NVIDIA_AMP_IMAGES_PER_S.items() if k in name), None)
    if reference and network.DEFAULT_ARCH in args.archs:
        best = max(r["images_per_s"] for r in rows if r["layout"] == "single crop" and r["arch"] == network.DEFAULT_ARCH)
        print(f"\nsingle crop, best: {best:.0f} img/s = {100 * best / reference:.0f}% of NVIDIA's {reference} img/s "
              f"(target: >= 90%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
