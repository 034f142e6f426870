"""The training heads (`train.head`): the registry below, one module a head (what a head defines:
models/heads/base.py; how to add one: docs/layout.md#a-training-head).

params.yaml's `train.head` is any name registered here: `get` checks it when train-resnet50
starts (core/params/ sits below models/ and cannot read this registry), and checkpoint
loading looks up the name a checkpoint saved.
"""
from __future__ import annotations

from imagenet_sd.core.errors import param_error
from imagenet_sd.models.heads import cosine, linear, trex
from imagenet_sd.models.heads.base import Head

# train.head's name -> the head; one line a head.
HEADS: dict[str, type[Head]] = {
    "linear": linear.Linear,
    "trex": trex.Trex,
    "cosine": cosine.Cosine,
}


def get(name: str, key: str = "train.head") -> type[Head]:
    """The head registered as `name`; a one-line error naming `key` if there is none."""
    if name not in HEADS:
        raise param_error(key, name, " | ".join(HEADS))
    return HEADS[name]
