"""Resolving the `device` params (auto | cpu | cuda) to a torch device."""
from __future__ import annotations

import torch

from .errors import UserError


def resolve(name: str, key: str = "device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"params.yaml: {key} = 'cuda' but no CUDA GPU is visible; "
                        "use device: auto or cpu, or run on a GPU machine")
    return torch.device(name)
