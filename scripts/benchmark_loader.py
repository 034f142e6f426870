#!/usr/bin/env python
"""Benchmark (not a test): training-loader images/s per CPU core, shards + MultiCrop against ImageFolder + PIL.

What is measured: a DataLoader pass over the same N JPEGs, decode plus multi-crop
augmentation plus batching, on the CPU. Rows:

- baseline:    torchvision.datasets.ImageFolder (its default PIL loader) with the
               multi-crop recipe as torchvision transforms on PIL images (a copy of
               what imagenet_sd/train/augmentation.py was before it moved to tensors:
               `BaselineMultiCrop` below);
- folder+ours: the same ImageFolder with imagenet_sd.train.augmentation.MultiCrop (shows
               what the augmentation alone gains);
- ours:        imagenet_sd.datasets.readers.ShardDataset over tar shards (what train-resnet50
               reads) with imagenet_sd.train.augmentation.MultiCrop.

The images are written once, in a temporary folder (or --workdir), both as tar
shards (imagenet_sd.datasets.shards, records as sd-generate writes them) and as class
folders of .jpg files with the same bytes. They are photo-like (smooth colour
fields, mid-scale structure, fine grain) so that JPEG decoding costs what it does
on generated images: about 110 kB for 512 px at quality 95.

Crops: the paper profile, 2 global crops at 224 px (area 0.25-1) and 6 local crops
at 96 px (area 0.05-0.25), and the same with 0 local crops. Each row runs `workers`
DataLoader processes (0: everything in this process, i.e. one core) with one torch
thread a process, so images/s per core = images/s / max(1, workers), at most the
machine's cores (this process, which only receives the batches, is not counted).
A row is `--repeats` full passes, alternating with the other loaders' passes so that
a slow spell of the machine falls on all of them; in each pass the first
`--warmup-batches` batches (worker start-up included) are not timed, and the row's
images/s is its median pass. The CPU time of all processes over whole passes is
reported too (ms of CPU an image), which other work on the machine moves less than
wall time.

The target (issue 4): ours >= 1.5x the baseline's images/s per core, at every crop
profile and worker count measured. Then (--profile-images, 0 to skip) each step of
both pipelines is timed in this process, to show where the time goes.

    python scripts/benchmark_loader.py                        # defaults: ~2 minutes on 2 cores
    python scripts/benchmark_loader.py --images 512 --workers 0,2,4 --json loader.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from unittest import mock

import PIL
import torch
import torch.nn.functional as nnf
import torchvision
from PIL import Image, features
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from imagenet_sd.core.device import cpu_model
from imagenet_sd.datasets import readers, shards
from imagenet_sd.train import augmentation
from imagenet_sd.train.augmentation import IMAGENET_MEAN, IMAGENET_STD, MultiCrop

# The paper profile of params.yaml.
GLOBAL_SIZE, GLOBAL_SCALE = 224, (0.25, 1.0)
LOCAL_SIZE, LOCAL_SCALE = 96, (0.05, 0.25)
TARGET_PER_CORE = 1.5
LOADERS = ("baseline", "folder+ours", "ours")
LOADER_TEXT = {"baseline": "ImageFolder + PIL torchvision", "folder+ours": "ImageFolder + MultiCrop",
               "ours": "ShardDataset + MultiCrop"}


class UsageError(Exception):
    """A bad command line: reported as one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# --------------------------------------------------------------------------- the baseline recipe
# imagenet_sd/train/augmentation.py before its tensor rewrite, unchanged: torchvision's transforms
# on PIL images (torchvision's GaussianBlur converts each PIL crop to a tensor and back).

BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL = 13


def _photometric() -> list:
    return [T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2)]


def _blur(p: float) -> T.RandomApply:
    return T.RandomApply([T.GaussianBlur(BLUR_KERNEL, sigma=BLUR_SIGMA)], p=p)


def _normalize() -> list:
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def _view(size: int, scale: tuple[float, float], *extra) -> list:
    crop = T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)
    return [crop, *_photometric(), *extra, *_normalize()]


class BaselineMultiCrop:
    """PIL image -> [global 1, global 2, local 1, ..., local n]: the recipe as torchvision PIL transforms.

    With a `timer`, every step is wrapped to add its time to the timer (for --profile).
    """

    def __init__(self, local_crops: int, timer: "Timer | None" = None):
        self.local_crops = local_crops
        views = (_view(GLOBAL_SIZE, GLOBAL_SCALE, _blur(1.0)),
                 _view(GLOBAL_SIZE, GLOBAL_SCALE, _blur(0.1), T.RandomSolarize(128, p=0.2)),
                 _view(LOCAL_SIZE, LOCAL_SCALE, _blur(0.5)))
        if timer is not None:
            views = [[timer.wrap(self._step(t), t) for t in steps] for steps in views]
        self.global_1, self.global_2, self.local = (T.Compose(list(v)) for v in views)

    @staticmethod
    def _step(t) -> str:
        names = {T.RandomResizedCrop: "crop + resize", T.RandomHorizontalFlip: "flip", T.RandomGrayscale: "grayscale",
                 T.RandomSolarize: "solarize", T.ToTensor: "to tensor + normalise",
                 T.Normalize: "to tensor + normalise"}
        if isinstance(t, T.RandomApply):
            return "blur" if isinstance(t.transforms[0], T.GaussianBlur) else "colour jitter"
        return names[type(t)]

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_1(image), self.global_2(image)]
        crops += [self.local(image) for _ in range(self.local_crops)]
        return crops


# --------------------------------------------------------------------------- the images

def photo(seed: int, size: int) -> Image.Image:
    """A photo-like RGB picture: smooth colour fields at three scales plus fine grain."""
    g = torch.Generator().manual_seed(seed)

    def field(cells: int, amplitude: float) -> torch.Tensor:
        coarse = torch.rand(1, 3, cells, cells, generator=g)
        return nnf.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0] * amplitude

    pixels = field(3, 200) + field(12, 70) + field(48, 40) + torch.randn(3, size, size, generator=g) * 6
    pixels = pixels - pixels.mean() + 128
    return Image.fromarray(pixels.clamp(0, 255).round().byte().permute(1, 2, 0).numpy())


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def record(wnid: str, label: int, index: int, seed: int, size: int) -> dict:
    """What sd-generate stores beside an image (imagenet_sd.generate.worker.record)."""
    return {"wnid": wnid, "class": wnid, "label": label, "image_index": index, "prompt": f"a photo of {wnid}",
            "seed": seed, "attempt": 0, "guidance": 7.5, "steps": 50, "scheduler": "model",
            "model": "benchmark", "resolution": size, "flagged": False}


def write_images(root: Path, args) -> tuple[list[Path], Path, list[str], dict]:
    """(shard paths, ImageFolder root, class keys, stats): the same JPEGs in both layouts."""
    keys = [f"n{i:08d}" for i in range(args.classes)]
    per_class = args.images // args.classes
    per_shard_class = args.per_shard // args.classes
    folder, shard_dir = root / "folder", root / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    sizes, paths = [], []
    # As sd-generate lays them out: shard k holds image indices [k*b, (k+1)*b) of every class.
    for k in range(per_class // per_shard_class):
        samples = []
        for index in range(k * per_shard_class, (k + 1) * per_shard_class):
            for label, wnid in enumerate(keys):
                seed = label * per_class + index
                payload = jpeg(photo(seed, args.size), args.quality)
                sizes.append(len(payload))
                target = folder / wnid / f"{shards.sample_key(label, index)}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(payload)
                samples.append((shards.sample_key(label, index), payload, record(wnid, label, index, seed, args.size)))
        path = shard_dir / shards.SHARD_PATTERN.format(k)
        shards.write_shard(path, samples)
        paths.append(path)
    return paths, folder, keys, {"images": len(sizes), "shards": len(paths), "mean_jpeg_kb": statistics.mean(sizes) / 1000}


# --------------------------------------------------------------------------- timing loaders

def cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children, user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_dataset(loader: str, local_crops: int, paths: list[Path], folder: Path, keys: list[str], args):
    multicrop = MultiCrop(GLOBAL_SIZE, GLOBAL_SCALE, local_crops, LOCAL_SIZE, LOCAL_SCALE)
    if loader == "baseline":
        return datasets.ImageFolder(str(folder), transform=BaselineMultiCrop(local_crops))
    if loader == "folder+ours":
        return datasets.ImageFolder(str(folder), transform=multicrop)
    # A small shuffle buffer, so that reading the tars happens inside the timed batches
    # (with training's 1000 a worker reads all its shards before its first image).
    return readers.ShardDataset(paths, keys, multicrop, seed=0, buffer_size=args.shuffle_buffer)


def one_pass(dataset, workers: int, args, seed: int) -> dict:
    """One epoch through a DataLoader: images/s after the warm-up batches, CPU s an image overall."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    shuffle = not isinstance(dataset, torch.utils.data.IterableDataset)
    cpu0 = cpu_seconds()
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, num_workers=workers,
                        generator=generator)
    start = time.perf_counter() if args.warmup_batches == 0 else None
    it = iter(loader)
    images = timed_images = 0
    for n, (crops, labels) in enumerate(it):
        images += len(labels)
        if n >= args.warmup_batches:
            timed_images += len(labels)
        elif n == args.warmup_batches - 1:
            start = time.perf_counter()     # the clock starts when the last warm-up batch is in
    seconds = time.perf_counter() - start
    del it, loader                        # joins the workers, so that their CPU time is counted
    cpu = cpu_seconds() - cpu0
    return {"images_per_s": timed_images / seconds, "cpu_ms_per_image": 1000 * cpu / images, "images": images}


def cores(workers: int) -> int:
    """Cores a row runs on: one for this process alone, else one a worker (as many as there are)."""
    return max(1, min(workers, os.cpu_count() or 1))


def measure_group(datasets_: dict, workers: int, args) -> dict[str, dict]:
    """Rows of the loaders at one crop profile and worker count. Their passes alternate
    (baseline, ..., ours, baseline, ...), so that a slow spell of the machine falls on all."""
    passes = {loader: [] for loader in datasets_}
    for seed in range(args.repeats):
        for loader, dataset in datasets_.items():
            passes[loader].append(one_pass(dataset, workers, args, seed))
    rows = {}
    for loader, runs in passes.items():
        rates = sorted(p["images_per_s"] for p in runs)
        median = statistics.median(rates)
        rows[loader] = {"images_per_s": median, "images_per_s_per_core": median / cores(workers),
                        "spread": (rates[-1] - rates[0]) / median,
                        "cpu_ms_per_image": statistics.median(p["cpu_ms_per_image"] for p in runs),
                        "passes": runs}
    return rows


# --------------------------------------------------------------------------- per-step profile

class Timer:
    """Seconds spent in named steps, summed over calls."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(name, time.perf_counter() - start)
        return timed


def profile_baseline(files: list[Path], local_crops: int) -> tuple[dict, float]:
    timer = Timer()
    transform = BaselineMultiCrop(local_crops, timer)
    load = timer.wrap("read file + decode", datasets.folder.pil_loader)
    torch.manual_seed(0)
    start = time.perf_counter()
    for path in files:
        transform(load(str(path)))
    return timer.seconds, time.perf_counter() - start


def profile_ours(shard_paths: list[Path], local_crops: int, count: int) -> tuple[dict, float]:
    """Steps of ours, timed by wrapping the functions augmentation.py calls (names as of this writing;
    a step it no longer calls by that name shows up in "rest")."""
    timer = Timer()
    transform = MultiCrop(GLOBAL_SIZE, GLOBAL_SCALE, local_crops, LOCAL_SIZE, LOCAL_SCALE)
    tv = types.SimpleNamespace(**{name: getattr(F, name) for name in dir(F) if not name.startswith("__")})
    tv.resized_crop_image = timer.wrap("crop + resize", F.resized_crop_image)
    tv.rgb_to_grayscale_image = timer.wrap("grayscale", F.rgb_to_grayscale_image)
    patches = {"F": tv}
    for attr, name in (("pixels", "to uint8 tensor"), ("_colour_jitter", "colour jitter"),
                       ("gaussian_blur", "blur")):
        if hasattr(augmentation, attr):
            patches[attr] = timer.wrap(name, getattr(augmentation, attr))
    start = time.perf_counter()
    samples = [jpg for p in shard_paths for _, jpg, _ in shards.iter_shard(p)]
    read = (time.perf_counter() - start) / len(samples)       # tar reading, an image
    samples = samples[:count]
    decode = timer.wrap("decode", readers._decode)
    with contextlib.ExitStack() as stack:
        for attr, value in patches.items():
            stack.enter_context(mock.patch.object(augmentation, attr, value))
        torch.manual_seed(0)
        start = time.perf_counter()
        for jpg in samples:
            transform(decode(jpg))
        seconds = time.perf_counter() - start
    timer.add("read tar", read * len(samples))
    return timer.seconds, seconds + read * len(samples)


def print_profile(name: str, steps: dict, total: float, count: int, rest: str) -> dict:
    per_image = {k: 1000 * v / count for k, v in steps.items()}
    per_image[f"rest ({rest})"] = 1000 * total / count - sum(per_image.values())
    total_ms = 1000 * total / count
    print(f"  {name}: {total_ms:.2f} ms an image")
    for k, v in sorted(per_image.items(), key=lambda kv: -kv[1]):
        print(f"    {k:<52} {v:6.2f} ms  {100 * v / total_ms:4.0f}%")
    return {"ms_per_image": total_ms, "steps_ms": per_image}


# --------------------------------------------------------------------------- report

def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu_model()}, {os.cpu_count()} cores; load average {load}"


def crops_text(local_crops: int) -> str:
    return f"2x{GLOBAL_SIZE}" + (f" + {local_crops}x{LOCAL_SIZE}" if local_crops else "")


def print_table(rows: list[dict]) -> None:
    head = ("crops", "workers", "loader", "img/s", "img/s/core", "spread", "CPU ms/img", "x baseline/core")
    lines = [head]
    for r in rows:
        lines.append((crops_text(r["local_crops"]), str(r["workers"]), LOADER_TEXT[r["loader"]],
                      f"{r['images_per_s']:.1f}", f"{r['images_per_s_per_core']:.1f}", f"{100 * r['spread']:.0f}%",
                      f"{r['cpu_ms_per_image']:.1f}", f"{r['speedup']:.2f}x"))
    widths = [max(len(line[c]) for line in lines) for c in range(len(head))]
    for n, line in enumerate(lines):
        print("  ".join(cell.ljust(w) if c < 3 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="images in all (a multiple of --per-shard)")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=32, help="images a shard (a multiple of --classes)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (SD v1.4's 512)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (the paper profile's 95)")
    p.add_argument("--local-crops", default="6,0", help="comma list of local crop counts")
    p.add_argument("--workers", default="0,2", help="comma list of DataLoader worker counts (0: this process)")
    p.add_argument("--loaders", default=",".join(LOADERS), help="comma list of " + ", ".join(LOADERS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-batches", type=int, default=2, help="untimed batches at the start of each pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes a row (the median is reported)")
    p.add_argument("--shuffle-buffer", type=int, default=64, help="ShardDataset's buffer_size")
    p.add_argument("--profile-images", type=int, default=48, help="images for the per-step profile (0: none)")
    p.add_argument("--workdir", type=Path, help="write the images to this new or empty folder, and keep them "
                                                 "(default: a temporary folder, removed)")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    args.local_crops = _ints("--local-crops", args.local_crops, minimum=0)
    args.workers = _ints("--workers", args.workers, minimum=0)
    args.loaders = [x.strip() for x in args.loaders.split(",") if x.strip()]
    if "baseline" not in args.loaders or any(x not in LOADERS for x in args.loaders):
        raise UsageError(f"--loaders: a comma list of {', '.join(LOADERS)} that includes baseline")
    for name in ("images", "classes", "per_shard", "size", "batch_size", "repeats", "quality"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.per_shard % args.classes or args.images % args.per_shard:
        raise UsageError("--per-shard must be a multiple of --classes, and --images a multiple of --per-shard")
    if args.size < GLOBAL_SIZE // 2:
        raise UsageError(f"--size {args.size}: too small for {GLOBAL_SIZE} px crops")
    if args.warmup_batches < 0 or args.warmup_batches >= args.images // args.batch_size:
        raise UsageError("--warmup-batches must leave at least one timed batch")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        raise UsageError(f"--workdir {args.workdir}: not empty (give a new or empty folder)")
    if args.json is not None and not args.json.resolve().parent.is_dir():
        raise UsageError(f"--json {args.json}: folder {args.json.resolve().parent} does not exist")
    return args


def _ints(option: str, text: str, minimum: int) -> list[int]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(t.isdigit() and int(t) >= minimum for t in items):
        raise UsageError(f"{option}: {text!r} is not a comma list of integers >= {minimum}")
    return list(dict.fromkeys(int(t) for t in items))


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"benchmark_loader: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)          # this process is one core; DataLoader workers set 1 thread themselves
    command = shlex.join(["python", "scripts/benchmark_loader.py", *argv])
    print(f"command: {command}")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__} "
          f"(libjpeg-turbo {features.version('libjpeg_turbo') or 'no'})")
    print(f"CPU: {machine()}; 1 torch thread a process")

    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-loader-")))
        start = time.perf_counter()
        paths, folder, keys, stats = write_images(root, args)
        print(f"images: {stats['images']} of {args.size} px, JPEG quality {args.quality} "
              f"(mean {stats['mean_jpeg_kb']:.0f} kB), {args.classes} classes, {stats['shards']} shards, "
              f"written in {time.perf_counter() - start:.1f} s to {root}")
        print(f"batch {args.batch_size}, {args.warmup_batches} warm-up batches and {args.repeats} timed passes a row\n",
              flush=True)

        rows = []
        for local_crops in args.local_crops:
            for workers in args.workers:
                print(f"[{crops_text(local_crops)}, {workers} workers] ", end="", file=sys.stderr, flush=True)
                group = measure_group({loader: make_dataset(loader, local_crops, paths, folder, keys, args)
                                       for loader in args.loaders}, workers, args)
                for loader, row in group.items():
                    row.update(local_crops=local_crops, workers=workers, loader=loader,
                               speedup=row["images_per_s"] / group["baseline"]["images_per_s"])
                    rows.append(row)
                print(", ".join(f"{loader} {row['images_per_s']:.1f}" for loader, row in group.items()) + " img/s",
                      file=sys.stderr, flush=True)
        print()
        print_table(rows)

        print(f"\ntarget: ours >= {TARGET_PER_CORE}x the baseline's images/s per core")
        verdicts = []
        for r in rows:
            if r["loader"] == "ours":
                met = r["speedup"] >= TARGET_PER_CORE
                verdicts.append(met)
                print(f"  {crops_text(r['local_crops'])}, {r['workers']} workers: {r['speedup']:.2f}x -> "
                      f"{'met' if met else 'NOT met'}")

        profiles = {}
        if args.profile_images:
            files = sorted(folder.rglob("*.jpg"))[:args.profile_images]
            count = len(files)
            print(f"\nwhere the time goes: one process, {count} images, ms an image (steps timed one by one)")
            for local_crops in args.local_crops:
                print(f" {crops_text(local_crops)}:")
                profiles[local_crops] = {
                    "baseline": print_profile("baseline", *profile_baseline(files, local_crops), count,
                                              "random draws, Compose"),
                    "ours": print_profile("ours", *profile_ours(paths, local_crops, count), count,
                                          "crop draws, flip, to float, solarize, normalise")}

    if args.json:
        args.json.write_text(json.dumps({
            "command": command, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "pillow": PIL.__version__, "cpu": machine(), "images": stats, "batch_size": args.batch_size,
            "warmup_batches": args.warmup_batches, "repeats": args.repeats, "rows": rows,
            "target_per_core": TARGET_PER_CORE, "target_met": all(verdicts) if verdicts else None,
            "profile": profiles}, indent=1) + "\n")
        print(f"\nrows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
