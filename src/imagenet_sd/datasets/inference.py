"""Running a trained network over real images: the loader and forward loop that eval-imagenet,
eval-transfer and clip-tune share, so all see images the same way (the preprocessing is
datasets.transforms). On CUDA the forward pass runs under fp16 autocast (`forward_batches`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from imagenet_sd.datasets.data import ImageList


def loader(samples: list[tuple[Path, int]], transform, batch_size: int, device: torch.device) -> DataLoader:
    # On CPU the forward pass is the bottleneck and worker processes would steal its
    # cores; on a GPU JPEG decoding is, so decode in parallel.
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    return DataLoader(ImageList(samples, transform), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=device.type == "cuda")


@torch.no_grad()
def forward_batches(model: nn.Module, data: DataLoader, device: torch.device, desc: str):
    """Yield (float32 outputs on CPU, labels) per batch, with an img/s progress bar."""
    model.eval().to(device)
    with tqdm(total=len(data.dataset), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for images, labels in data:
            # Mixed precision only where it pays: CUDA. fp16 rather than bf16 (which
            # training prefers for its range): inference has no gradients to overflow,
            # and fp16's 3 extra mantissa bits keep the logits, hence top-k, closer to fp32.
            with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                out = model(images.to(device, non_blocking=True))
            yield out.float().cpu(), labels
            bar.update(len(labels))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """How many rows have their label among the k highest logits, for each k <= number of logits."""
    usable = [k for k in ks if k <= logits.shape[1]]
    if not usable:
        return {}
    top = logits.topk(max(usable), dim=1).indices
    hits = top == labels.unsqueeze(1)
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in usable}
