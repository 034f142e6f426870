"""The train-resnet50 stage: its inputs checked before anything is written (`prepare`), the
training (loop.py), and its outputs: the checkpoint evaluation reads, metrics/train.json and the
DVCLive log.

Held-out images: sd-generate makes `holdout_per_class` images a class in addition to real x
scale, so training sees exactly real x scale images a class; `open_training_set` splits them off.

Logging: rank 0 logs every epoch with DVCLive into the stage's log folder. DVC deletes that
folder before a run, so a resumed run first logs the epochs of the saved history again: the log
is always complete. Under torchrun every rank trains; rank 0 writes the checkpoint, log and metrics.

Docs: docs/training.md
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import Dataset

from imagenet_sd.core import distributed
from imagenet_sd.core.device import resolve
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import write_json
from imagenet_sd.core.params import Params, TrainParams, require_dir
from imagenet_sd.datasets import kept, readers, shards
from imagenet_sd.datasets.shards import read_index
from imagenet_sd.datasets.transforms import build_transform
from imagenet_sd.models import heads, network
from imagenet_sd.prompts import prompts
from imagenet_sd.train import loop, recipe, state
from imagenet_sd.train.augmentation import DrawCrops, MultiCrop, encoded_jpeg, read_encoded
from imagenet_sd.train.loop import TrainResult
from imagenet_sd.train.state import EpochStats

# What the training log (DVCLive) records each epoch: EpochStats fields, None ones left out.
LOGGED = ("loss", "train_top1", "holdout_loss", "holdout_top1", "lr", "images_per_second")


def augment_on_device(tp: TrainParams, device: torch.device, key: str = "train.augment_device") -> bool:
    """Whether `augment_device` puts decoding and multi-crop on the training device (auto: where the
    training runs, unless the crop style has no device form)."""
    if tp.augment_device == "cuda" and device.type != "cuda":
        raise UserError(f"params.yaml: {key} = 'cuda' but training runs on {device.type}; set it to auto or cpu")
    drawable = MultiCrop.from_params(tp).drawable
    if tp.augment_device == "cuda" and not drawable:
        raise UserError(f"params.yaml: {key} = 'cuda' but global_crop_style {tp.global_crop_style!r} runs in the "
                        "loader workers only (timm's RandAugment); set it to auto or cpu")
    return drawable and (tp.augment_device == "cuda" or (tp.augment_device == "auto" and device.type == "cuda"))


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
        return readers.folder_splits(require_dir(key, params.data.train), keys, key, tp.holdout_per_class,
                                  transform, centre, read=read_encoded if on_device else readers.read_rgb)
    index = read_index(shards_dir)
    paths = [shards_dir / entry["file"] for entry in index["shards"]]
    if not paths:
        raise UserError(f"no shards in {shards_dir}; run: dvc repro sd-generate")
    readers.check_index_classes(index, keys, shards_dir)
    held = index.get("holdout_per_class", 0)
    if held != tp.holdout_per_class:
        raise UserError(f"{shards_dir / shards.INDEX_FILE}: the shards were made with {held} held-out images a "
                        f"class, but profiles.{params.profile}.train.holdout_per_class = {tp.holdout_per_class}; "
                        "regenerate them: dvc repro sd-generate")
    filtered = kept.read(kept_dir, shards_dir) if kept_dir is not None else None
    return readers.shard_splits(paths, keys, params.seed, tp.holdout_per_class, transform, centre, index,
                             decode=encoded_jpeg if on_device else None, kept=filtered)


def save_checkpoint(path: Path, model: torch.nn.Module, rows: list[prompts.ClassPrompt], tp: TrainParams,
                    extra: dict) -> None:
    """The checkpoint evaluation reads; with arch resnet50 it also loads into a plain torchvision or timm resnet50
    (docs/training.md#using-the-trained-model-elsewhere)."""
    ordered = sorted(rows, key=lambda r: r.index)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    checkpoint = {"arch": tp.arch, "head": tp.head, "classes": [r.key for r in ordered],
                  "wnids": [r.wnid for r in ordered], "state_dict": weights, "image_size": tp.global_crop_size,
                  # Plain types only, so torch.load(weights_only=True) and other tools read it.
                  "params": json.loads(json.dumps({**asdict(tp), **extra}, default=str))}
    state.atomic_save(checkpoint, path)


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
            "arch": params.train.arch, "head": params.train.head, "zero_init_residual": params.train.zero_init_residual,
            "skipped": skipped}


def prepare(params: Params, prompts_path: Path, shards_dir: Path, kept_dir: Path | None = None):
    """Everything checked before a step is taken (or a worker started): classes, device, data, work folder."""
    key = f"profiles.{params.profile}.train"
    head = heads.get(params.train.head, f"{key}.head")   # train.head: a registered head (core/params cannot check it)
    network.check(params.train.arch, f"{key}.arch", params.train.drop_path)   # train.arch: likewise
    if (params.train.mixup or params.train.cutmix) and not head.mixable:
        raise UserError(f"params.yaml: {key}.head = {params.train.head!r} learns each crop under its one label, so "
                        "it cannot train on mixed images; set train.mixup and train.cutmix to 0, or head: linear")
    rows = prompts.read(prompts_path)
    keys = readers.class_keys(rows)
    device = resolve(params.train.device, f"{key}.device")
    recipe.autocast_dtype(params.train.amp, device, f"{key}.amp")
    on_device = augment_on_device(params.train, device, f"{key}.augment_device")
    dataset, holdout = open_training_set(params, keys, shards_dir, on_device, kept_dir)
    return rows, keys, device, on_device, dataset, holdout, state.state_file(params, keys, shards_dir, kept_dir)


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
            print(f"training {network.describe(params.train.arch)} on {len(dataset)} {params.source} images{held} of {len(keys)} classes, "
                  f"{length}, on {ctx.world} x {device.type}; multi-crop {where}")
            live = open_log(log_dir)
        result = loop.train(dataset, len(keys), params.train, params.seed, device, state_path, ctx, holdout,
                       on_epoch=lambda stats: log_epoch(live, stats), on_device=on_device)
        in_loader = dataset.skipped.value if isinstance(dataset, readers.ShardDataset) else 0
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
