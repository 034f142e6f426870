"""Running a trained network over real images: the loader and forward loop that eval-imagenet,
eval-transfer and clip-tune share, so all see images the same way (the preprocessing is
datasets.transforms), and the top-1/top-5 tally of a test set's plan (datasets/imagenet_scan.py)
that eval-imagenet and clip-tune report. On CUDA the forward pass runs under fp16 autocast
(`forward_batches`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from imagenet_sd.datasets.imagenet_scan import EvalPlan
from imagenet_sd.datasets.readers import ImageList


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


def tally(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], eval_plan: EvalPlan) -> dict:
    """Top-1/top-5 (percent) of (logits over every class of the model, labels) batches covering the
    planned images; top-5 is None under 5 logits. Where the plan narrows the logits (IN-R, IN-A),
    also over every logit (`top1_all_logits`, `top5_all_logits`). `column_top1`: the top-1 of each
    planned column's images (None for a column without images), in column order. The clip-tune
    stage scores its heads' logits through here too."""
    columns = torch.tensor(eval_plan.columns)
    hits, hits_all, width = {1: 0, 5: 0}, {1: 0, 5: 0}, None
    column_hits, column_images = torch.zeros(len(columns), dtype=torch.long), torch.zeros(len(columns), dtype=torch.long)
    for logits, labels in batches:
        width = logits.shape[1]
        narrowed = logits[:, columns]
        column_images += torch.bincount(labels, minlength=len(columns))
        column_hits += torch.bincount(labels[narrowed.argmax(1) == labels], minlength=len(columns))
        for k, n in topk_correct(narrowed, labels).items():
            hits[k] += n
        if len(columns) < width:       # restricted (IN-R, IN-A): also over every logit
            for k, n in topk_correct(logits, columns[labels]).items():
                hits_all[k] += n
    total = len(eval_plan.samples)

    def pct(counts: dict[int, int], k: int, logits: int):
        return round(100.0 * counts[k] / total, 2) if total and k <= logits else None
    result = {"top1": pct(hits, 1, len(columns)), "top5": pct(hits, 5, len(columns)),
              "classes": eval_plan.classes, "images": total, "logits": len(eval_plan.columns),
              "column_top1": [round(100.0 * h / n, 2) if n else None
                              for h, n in zip(column_hits.tolist(), column_images.tolist())]}
    if width is not None and len(columns) < width:
        result.update(top1_all_logits=pct(hits_all, 1, width), top5_all_logits=pct(hits_all, 5, width))
    return result
