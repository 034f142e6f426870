"""The training state that a killed run resumes from, and the work folder it lives in.

After every epoch, and every `checkpoint_every_steps` steps, the whole training state (model,
optimiser, grad scaler, epoch, step, history, and what the head trains beside the network) is
saved atomically to `train.work_dir/<key>/last.pt`, the key hashing what decides the weights
(recipe, seed, source, classes, the data, the training code: `state_file`). A killed run starts
again from there (loop.train). The final model is a normal DVC output written from it.

Docs: docs/caching.md#training-state, docs/training.md#resume
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from imagenet_sd.core.io import atomic_write_text, replacing
from imagenet_sd.core.params import Params, writable_dir
from imagenet_sd.core.params.train import NEUTRAL
from imagenet_sd.datasets import kept, readers, shards, transforms
from imagenet_sd.models import heads, network
from imagenet_sd.models.heads import base
from imagenet_sd.models.heads.base import HeadTraining


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


# --------------------------------------------------------------------------- the state file

def save_state(path: Path, model, optimizer, scaler, history: list[EpochStats],
               progress: EpochProgress | None = None, head_training: HeadTraining | None = None) -> None:
    """Everything needed to go on: after the last finished epoch, or `progress` steps into the next
    (with a head that trains something beside the network, that too)."""
    state = {"epoch": len(history), "progress": asdict(progress) if progress else None,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "history": [asdict(h) for h in history]}
    if head_training is not None:
        state["head_training"] = head_training.state_dict()
    atomic_save(state, path)


def load_state(path: Path, model, optimizer, scaler, head_training: HeadTraining | None = None
               ) -> tuple[list[EpochStats], EpochProgress | None]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    if head_training is not None:
        head_training.load_state_dict(state["head_training"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    progress = EpochProgress(**state["progress"]) if state.get("progress") else None
    return [EpochStats(**h) for h in state["history"]], progress


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


# --------------------------------------------------------------------------- the work folder's key

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


# The train/ modules that decide the weights: all of them.
TRAIN_MODULES = ("training.py", "loop.py", "recipe.py", "state.py", "augmentation.py", "mixing.py")


def code_identity(head: type[base.Head]) -> str:
    """The training code itself, whole files: after an edit, a finished state must not pass for the
    new result. The head's own module is in it, other heads' are not (adding a head keeps keys)."""
    files = [Path(__file__).with_name(name) for name in TRAIN_MODULES]
    files += [Path(m.__file__) for m in (network, base, readers, kept, transforms)] + [Path(inspect.getfile(head))]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


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
    # A ResNet-50 recipe's key is what it was before train.arch and the ViT-B recipe's keys existed.
    recipe = {k: v for k, v in recipe.items() if k not in NEUTRAL or v != NEUTRAL[k]}
    recipe["processes"] = world_size(params)     # the processes it trains on, however they are launched
    what = {"recipe": recipe, "seed": params.seed, "source": params.source, "classes": keys,
            "data": data_identity(params, shards_dir, kept_dir),
            "code": code_identity(heads.get(params.train.head, f"profiles.{params.profile}.train.head"))}
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = writable_dir(f"profiles.{params.profile}.train.work_dir", params.train.work_dir,
                          params.train.work_dir / key)
    if int(os.environ.get("RANK", 0)) == 0:        # torchrun's other ranks would write the same file at once
        atomic_write_text(folder / "recipe.json", json.dumps(what, indent=1, default=str) + "\n")
    return folder / "last.pt"
