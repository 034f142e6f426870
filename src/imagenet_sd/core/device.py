"""Resolving the `device` params (auto | cpu | cuda) to a torch device; naming the CPU for benchmarks."""
from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch

from imagenet_sd.core.errors import UserError


def resolve(name: str, key: str = "device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"params.yaml: {key} = 'cuda' but no CUDA GPU is visible; "
                        "use device: auto or cpu, or run on a GPU machine")
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for benchmark reports."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"
