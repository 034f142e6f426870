"""The training recipe, every part a param (docs/training.md#training-recipe); the paper profile
has the defaults of the authors' public multi-crop training code (naver/trex):
- SGD, momentum 0.9, `nesterov` or not, or AdamW (`optimizer`, the ViT-B recipe's); lr = `lr` x
  batch_size / 256 (linear scaling);
- linear warmup for `warmup_epochs`, then cosine decay to `min_lr`, updated every step;
  with `max_steps` the same shape spans a fixed budget of steps instead of `epochs` (`Budget`);
- `label_smoothing`; weight decay on conv and linear weights only (not on norms, biases,
  or what a timm model exempts);
- Mixup and CutMix (`mixup`, `cutmix`: mixing.py), whose soft targets the loss takes;
- the loss of multi-crop (augmentation.py): the mean over all crops of every image, each crop
  carrying its image's label;
- precision (`amp`): bf16 or fp16 autocast, fp16 with loss scaling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.params import TrainParams


def build_optimizer(model: torch.nn.Module, tp: TrainParams) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or AdamW (betas 0.9, 0.999; DeiT's), weight decay on weights of two or more
    dimensions only, and not on what a module's `no_weight_decay()` names (timm: a ViT's position
    embedding and class token)."""
    skip = set()
    for prefix, module in model.named_modules():
        if callable(getattr(module, "no_weight_decay", None)):
            skip |= {f"{prefix}.{name}" if prefix else name for name in module.no_weight_decay()}
    named = list(model.named_parameters())
    decay = [p for name, p in named if p.ndim > 1 and name not in skip]
    no_decay = [p for name, p in named if p.ndim <= 1 or name in skip]
    groups = [{"params": decay, "weight_decay": tp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if tp.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=peak_lr(tp), betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.SGD(groups, lr=peak_lr(tp), momentum=0.9, nesterov=tp.nesterov)


def peak_lr(tp: TrainParams) -> float:
    return tp.lr * tp.batch_size / 256


def lr_at(done: float, tp: TrainParams) -> float:
    """Learning rate when the fraction `done` of the run is done: linear warmup over the first
    warmup_epochs / epochs of it, then cosine to `min_lr`.

    `done` counts images over epochs x images (not steps: the workers' partial batches
    would change the count), or steps over `max_steps` with a step budget.
    """
    warmup = tp.warmup_epochs / tp.epochs
    if done < warmup:
        return peak_lr(tp) * done / warmup
    decay = min(1.0, (done - warmup) / max(1 - warmup, 1e-9))
    return tp.min_lr + (peak_lr(tp) - tp.min_lr) * 0.5 * (1 + math.cos(math.pi * decay))


@dataclass
class Budget:
    """How long the run is: `epochs` passes over `images` images, or `max_steps` steps."""
    epochs: int
    max_steps: int
    images: int              # per epoch, all ranks together

    def done(self, epoch: int, seen_all_ranks: int, steps: int) -> float:
        """Fraction of the run done after `steps` steps in all, `seen_all_ranks` images into `epoch`."""
        if self.max_steps:
            return min(1.0, steps / self.max_steps)
        return (epoch - 1 + min(1.0, seen_all_ranks / self.images)) / self.epochs

    def over(self, epoch: int, steps: int) -> bool:
        """Whether the run ends before `epoch` begins (`steps` steps done)."""
        return steps >= self.max_steps if self.max_steps else epoch > self.epochs


def multicrop_loss(global_logits: torch.Tensor, local_logits: torch.Tensor | None, targets: torch.Tensor,
                   label_smoothing: float) -> torch.Tensor:
    """Cross-entropy averaged over every crop of every image, each crop carrying its image's target:
    a class index (B,), or class probabilities (B, classes) from Mixup or CutMix."""
    def repeated(times: int) -> torch.Tensor:
        return targets.repeat(times) if targets.ndim == 1 else targets.repeat(times, 1)

    total = F.cross_entropy(global_logits.float(), repeated(global_logits.shape[0] // len(targets)),
                            reduction="sum", label_smoothing=label_smoothing)
    crops = global_logits.shape[0]
    if local_logits is not None:
        total = total + F.cross_entropy(local_logits.float(), repeated(local_logits.shape[0] // len(targets)),
                                        reduction="sum", label_smoothing=label_smoothing)
        crops += local_logits.shape[0]
    return total / crops


def autocast_dtype(amp: str, device: torch.device, key: str = "train.amp") -> torch.dtype | None:
    """The autocast dtype the `amp` param means on `device`; None: plain float32."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"params.yaml: {key} = 'fp16' needs a CUDA device (its loss scaling is CUDA's); "
                        "use bf16 or none on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def precision(dtype: torch.dtype | None, device: torch.device) -> tuple[torch.autocast, torch.amp.GradScaler]:
    """(the autocast context of `dtype`, the grad scaler) on `device`."""
    autocast = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    # float16 needs loss scaling against underflowing gradients; bfloat16 does not.
    return autocast, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
