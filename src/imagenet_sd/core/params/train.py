"""The profile's `train` block (train-resnet50)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from imagenet_sd.core.errors import param_error
from imagenet_sd.core.params.reader import DEVICES, Overlay, Section, keys_of, work_dir_at

GLOBAL_CROP_STYLES = ("trex", "dino", "deit")   # augmentation.MultiCrop
OPTIMIZERS = ("sgd", "adamw")                    # recipe.build_optimizer
PRECISIONS = ("auto", "bf16", "fp16", "none")      # training autocast; auto: bf16 or fp16 on GPU, none on CPU


@dataclass(frozen=True)
class TrainParams:
    epochs: int
    max_steps: int          # > 0: a fixed budget of optimiser steps instead of `epochs` (docs/training.md#what-is-held-fixed-at-10x-50x)
    batch_size: int
    lr: float
    min_lr: float           # where the cosine ends
    nesterov: bool
    weight_decay: float
    warmup_epochs: int
    label_smoothing: float
    sync_batchnorm: bool    # BatchNorm statistics over all processes' crops (DDP only)
    global_crops: int
    global_crop_style: str  # one of GLOBAL_CROP_STYLES
    global_crop_size: int
    global_crop_scale: tuple[float, float]
    local_crops: int
    local_crop_size: int
    local_crop_scale: tuple[float, float]
    holdout_per_class: int  # images per class generated beyond real x scale, kept out of training, scored every epoch
    augment_device: str     # where multi-crop runs: cpu (loader workers) | cuda (the training GPU) | auto
    amp: str                # one of PRECISIONS
    channels_last: bool
    compile: bool
    workers: int
    processes: int          # DDP processes (GPUs) on this machine; batch_size is split over them
    checkpoint_every_steps: int   # 0: save the training state at the end of each epoch only
    work_dir: Path          # training state for resume, outside the DVC output
    device: str
    # Each residual block's last BatchNorm starts at 0 (Goyal et al.'s trick); t-ReX and torchvision: false.
    zero_init_residual: bool = False
    # The network: resnet50 or timm:<name>, checked by models/network.py when train-resnet50 starts (this
    # module cannot import it).
    arch: str = "resnet50"
    # A name in models/heads' registry, checked there when train-resnet50 starts (this module cannot import it).
    head: str = "linear"
    trex_memory: int = 8192  # head trex: memory entries the class prototypes are summed from (t-ReX: 8192)
    # DeiT's recipe (train_recipes.vit_b in params.yaml; docs/training.md#the-vit-b-recipe): each at the value
    # that leaves the ResNet-50 recipe as it was.
    optimizer: str = "sgd"          # one of OPTIMIZERS
    drop_path: float = 0.0          # stochastic depth rate (timm's drop_path_rate)
    mixup: float = 0.0              # Beta(alpha, alpha) of Mixup; 0: off
    cutmix: float = 0.0             # Beta(alpha, alpha) of CutMix; 0: off
    randaugment: str = ""           # global_crop_style deit: timm's RandAugment config, e.g. rand-m9-mstd0.5-inc1
    random_erasing: float = 0.0     # global_crop_style deit: probability of erasing a box of each crop


# Keys added after the first trained states, at the defaults above that train as before them: the training
# state key leaves them out at these values (train/state.py).
NEUTRAL = {f.name: f.default for f in fields(TrainParams)
           if f.name in ("arch", "optimizer", "drop_path", "mixup", "cutmix", "randaugment", "random_erasing")}


def parse_train(s: Section) -> TrainParams:
    s.no_unknown_keys(keys_of(TrainParams))
    tp = TrainParams(
        epochs=s.number("epochs", int, low=1),
        max_steps=s.number("max_steps", int, low=0),
        batch_size=s.number("batch_size", int, low=1),
        lr=s.number("lr", float, low=0, low_open=True, high=1e6),
        min_lr=s.number("min_lr", float, low=0),
        nesterov=s.flag("nesterov"),
        weight_decay=s.number("weight_decay", float, low=0),
        warmup_epochs=s.number("warmup_epochs", int, low=0),
        label_smoothing=s.number("label_smoothing", float, low=0, high=0.99),
        sync_batchnorm=s.flag("sync_batchnorm"),
        global_crops=s.number("global_crops", int, low=1),
        global_crop_style=s.choice("global_crop_style", GLOBAL_CROP_STYLES),
        global_crop_size=s.number("global_crop_size", int, low=16),
        global_crop_scale=s.fraction_range("global_crop_scale"),
        local_crops=s.number("local_crops", int, low=0),
        local_crop_size=s.number("local_crop_size", int, low=16),
        local_crop_scale=s.fraction_range("local_crop_scale"),
        holdout_per_class=s.number("holdout_per_class", int, low=0),
        augment_device=s.choice("augment_device", DEVICES),
        amp=s.choice("amp", PRECISIONS),
        channels_last=s.flag("channels_last"),
        compile=s.flag("compile"),
        workers=s.number("workers", int, low=0),
        processes=_processes(s),
        checkpoint_every_steps=s.number("checkpoint_every_steps", int, low=0),
        work_dir=work_dir_at(s),
        device=s.choice("device", DEVICES),
        zero_init_residual=s.flag("zero_init_residual"),
        arch=s.text("arch"),
        head=s.text("head"),
        trex_memory=s.number("trex_memory", int, low=1),
        optimizer=s.choice("optimizer", OPTIMIZERS),
        drop_path=s.number("drop_path", float, low=0, high=0.99),
        mixup=s.number("mixup", float, low=0),
        cutmix=s.number("cutmix", float, low=0),
        randaugment=_randaugment(s),
        random_erasing=s.number("random_erasing", float, low=0, high=1),
    )
    if tp.random_erasing and tp.global_crop_style != "deit":
        raise param_error(s.path("random_erasing"), tp.random_erasing,
                          f"0 with global_crop_style {tp.global_crop_style!r} (random erasing is part of the deit style)")
    peak = tp.lr * tp.batch_size / 256
    if tp.min_lr >= peak:
        raise param_error(s.path("min_lr"), tp.min_lr, f"a number below the peak lr, lr x batch_size / 256 = {peak:g}")
    if tp.warmup_epochs >= tp.epochs and tp.warmup_epochs:
        raise param_error(s.path("warmup_epochs"), tp.warmup_epochs, f"an integer below epochs ({tp.epochs})")
    return tp


# What a named recipe (train_recipes) may not set: where and at what size the profile's machine trains.
MACHINE_KEYS = ("batch_size", "global_crop_size", "local_crop_size", "holdout_per_class", "sync_batchnorm",
                "augment_device", "amp", "channels_last", "compile", "workers", "processes",
                "checkpoint_every_steps", "work_dir", "device")


def recipe_overlay(train: Section, recipe: Section) -> Section:
    """The profile's train block with the keys of a named recipe (train_recipes.<name>) in place of its own."""
    recipe.no_unknown_keys(tuple(k for k in keys_of(TrainParams) if k not in MACHINE_KEYS))
    return Overlay(train, recipe)


def _randaugment(s: Section) -> str:
    """'' or a timm RandAugment config ('rand-...'), read only by the deit crop style."""
    value = s.text("randaugment").strip()
    if value and not value.startswith("rand"):
        raise param_error(s.path("randaugment"), value, "'' or a timm RandAugment config such as 'rand-m9-mstd0.5-inc1'")
    if value and s.get("global_crop_style") != "deit":
        raise param_error(s.path("randaugment"), value, "'' with global_crop_style "
                          f"{s.get('global_crop_style')!r} (RandAugment replaces the colour jitter in the deit style)")
    return value


def _processes(s: Section) -> int:
    processes, batch = s.number("processes", int, low=1), s.number("batch_size", int, low=1)
    if batch % processes:
        raise param_error(s.path("processes"), processes, f"a divisor of batch_size ({batch}), "
                          "which is the batch of all processes together")
    return processes
