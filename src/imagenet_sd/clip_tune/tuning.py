"""The zero-shot head (CLIP's class-name text embeddings as a linear layer) and He et al.'s recipe
that tunes it on the synthetic images' features. The recipe and where it differs: docs/he2023.md."""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from imagenet_sd.clip_tune.features import SyntheticSet
from imagenet_sd.core import seeds
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.params import Params
from imagenet_sd.models import probes
from imagenet_sd.models.clip_model import Clip

GRADIENT_CLIP = 1.0
BETAS, EPS = (0.9, 0.999), 1e-8
EVAL_CHUNK = 8192
Monitor = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]   # features, labels, logit columns (None: all)


def zero_shot_head(directions: torch.Tensor, logit_scale: float) -> nn.Linear:
    """The linear head CLIP's zero-shot classifier is: weights logit_scale x directions, bias 0."""
    head = nn.Linear(directions.shape[1], directions.shape[0])
    with torch.no_grad():
        head.weight.copy_(logit_scale * directions)
        head.bias.zero_()
    return head


def logit_scale(clip: Clip) -> float:
    return float(clip.model.logit_scale.detach().exp())


def real_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, epoch: int):
    """The K-shot images' features, one batch a step, reshuffled whenever they run out (He et al.'s reader)."""
    for rounds in itertools.count():
        order = torch.from_numpy(np.random.default_rng(
            seeds.derive(seed, "clip-tune", "real", epoch, rounds)).permutation(len(y)))
        for start in range(0, len(y), batch_size):
            chosen = order[start:start + batch_size]
            yield x[chosen], y[chosen]


def soft_cross_entropy(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy against the teacher's softmax at `temperature` (the student's logits as they are)."""
    return -(teacher.div(temperature).softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def synthetic_loss(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, params: Params) -> torch.Tensor:
    cp = params.clip_classifier
    hard = F.cross_entropy(logits, labels)
    if not cp.soft_label:
        return hard
    return cp.soft_label * soft_cross_entropy(logits, teacher, cp.soft_label_temperature) + (1 - cp.soft_label) * hard


@torch.no_grad()
def top1(head: nn.Linear, monitor: Monitor, device: torch.device) -> float:
    x, y, columns = monitor
    hits = 0
    for start in range(0, len(y), EVAL_CHUNK):
        logits = head(x[start:start + EVAL_CHUNK].to(device)).cpu()
        logits = logits if columns is None else logits[:, columns]
        hits += int((logits.argmax(dim=1) == y[start:start + EVAL_CHUNK]).sum())
    return round(100.0 * hits / len(y), 2)


def train_head(head: nn.Linear, synthetic: SyntheticSet, real: tuple[torch.Tensor, torch.Tensor] | None,
               params: Params, device: torch.device, monitors: dict[str, Monitor]) -> list[dict]:
    """Tune `head` in place (He et al.'s recipe, module doc); returns one row an epoch: mean loss,
    last lr, and the top-1 of every monitor."""
    cp = params.clip_classifier
    lr = cp.few_shot_lr if real is not None else cp.lr
    head.to(device).train()
    teacher = copy.deepcopy(head).requires_grad_(False)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cp.weight_decay, betas=BETAS, eps=EPS)
    schedule = Schedule(lr, cp.epochs * math.ceil(len(synthetic) / cp.batch_size))
    history = []
    # A head on a CPU is small work a step: one thread (probes.threads_for says why).
    with probes.threads_for(cp.batch_size * head.in_features * head.out_features), \
            tqdm(total=schedule.total, unit="step", desc="clip-tune head", dynamic_ncols=True) as bar:
        for epoch in range(cp.epochs):
            reals = real_batches(*real, cp.real_batch_size, params.seed, epoch) if real is not None else None
            loss_sum, seen = 0.0, 0
            for x, y in synthetic.batches(epoch, cp.batch_size, params.seed):
                loss = step(head, teacher, optimizer, schedule, x.to(device), y.to(device), reals, params)
                loss_sum, seen = loss_sum + loss * len(y), seen + len(y)
                bar.update(1)
            if not math.isfinite(loss_sum):
                raise UserError(f"clip-tune: the loss is {loss_sum} at epoch {epoch + 1}; lower "
                                f"profiles.{params.profile}.clip_classifier.lr (and few_shot_lr)")
            history.append({"epoch": epoch + 1, "loss": round(loss_sum / seen, 6), "lr": float(f"{schedule.last:.6g}"),
                            **{f"{name}_top1": top1(head, m, device) for name, m in monitors.items()}})
    return history


@dataclass
class Schedule:
    """He et al.'s cosine_lr without warm-up, set before each step: peak at step 0, 0 after the last."""
    peak: float
    total: int
    done: int = 0
    last: float = 0.0

    def next(self) -> float:
        self.last = 0.5 * (1 + math.cos(math.pi * self.done / self.total)) * self.peak
        self.done += 1
        return self.last


def step(head: nn.Linear, teacher: nn.Linear, optimizer, schedule: Schedule, x: torch.Tensor, y: torch.Tensor,
         reals, params: Params) -> float:
    """One optimiser step on a synthetic batch (and the next real batch, few-shot); its loss."""
    for group in optimizer.param_groups:
        group["lr"] = schedule.next()
    loss = synthetic_loss(head(x), teacher(x), y, params)
    if reals is not None:
        real_x, real_y = next(reals)
        loss = loss + F.cross_entropy(head(real_x.to(x.device)), real_y.to(x.device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), GRADIENT_CLIP)
    optimizer.step()
    return loss.item()
