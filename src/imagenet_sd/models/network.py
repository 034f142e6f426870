"""The classifier network: a backbone (`train.arch`) whose own linear classifier a head
(models/heads/) may replace. Training (train/) builds it with `build`; checkpoint loading
(evaluate/checkpoints.py) with the same `build` and the head a checkpoint names, then loads its weights.

Every network has its classifier as `fc` and its pooled features from `features`, whatever the
backbone, so heads, evaluation (a hook on `fc`) and eval-transfer (`fc` replaced) never ask which.
- `resnet50` (the default): torchvision's ResNet-50 from random weights, its classifier `fc`; the
  checkpoint keys are torchvision's, so a checkpoint with the linear head loads into a plain
  torchvision or timm resnet50.
- `timm:<name>`: any timm model from random weights (`TimmNetwork`): its trunk is the model with
  its classifier taken out (timm's pooled pre-logits: average pooling, or a ViT's class token) and
  `fc` that classifier, initialised as timm does. ViTs take any crop size (`dynamic_img_size`).

Docs: docs/training.md#the-network
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from imagenet_sd.core.errors import UserError, param_error
from imagenet_sd.models.heads.base import Head

DEFAULT_ARCH = "resnet50"
TIMM_PREFIX = "timm:"
# What timm's constructors are asked for where a model takes them (each family names its own options).
_TIMM_OPTIONS = ("zero_init_last", "dynamic_img_size", "drop_path_rate")


ALLOWED = (f"{DEFAULT_ARCH!r} (torchvision's) or {TIMM_PREFIX!r} and a timm model name, "
           f"e.g. '{TIMM_PREFIX}vit_base_patch16_224'")


def unbuildable(arch: str) -> str | None:
    """Why `build` cannot make `arch`, in words that fit after its name (None: it can)."""
    if arch == DEFAULT_ARCH:
        return None
    name = arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else ""
    if not name:
        return f"is not {ALLOWED}"
    import timm
    if timm.is_model(name):
        return None
    return (f"timm {timm.__version__} has no model {name!r}; "
            f"`python -c \"import timm; print(timm.list_models('{name[:4]}*'))\"` lists the near ones")


def check(arch: str, key: str, drop_path: float = 0.0) -> None:
    """A one-line UserError naming the param `key` unless `arch` names a network `build` can make
    (with stochastic depth `drop_path`, which torchvision's ResNet-50 lacks)."""
    if arch == DEFAULT_ARCH and drop_path:
        raise UserError(f"{key} = {arch!r} (torchvision's) has no stochastic depth, but drop_path = {drop_path}; "
                        f"set drop_path: 0, or arch: {TIMM_PREFIX}resnet50 (timm's, which has it)")
    why = unbuildable(arch)
    if why is None:
        return
    if not arch.startswith(TIMM_PREFIX) or arch == TIMM_PREFIX:
        raise param_error(key, arch, ALLOWED)
    raise UserError(f"{key} = {arch!r}: {why}")


def describe(arch: str) -> str:
    """What the log calls the network."""
    return "ResNet-50" if arch == DEFAULT_ARCH else f"timm's {arch[len(TIMM_PREFIX):]}"


def build(arch: str, head: Head, num_classes: int, zero_init_residual: bool = False,
          drop_path: float = 0.0) -> nn.Module:
    """`arch` from random weights, its classifier replaced by what `head` makes of it.

    `zero_init_residual`: each residual block's last BatchNorm starts at 0 (Goyal et al.; timm's
    `zero_init_last`); refused for a timm model that has no such option. `drop_path`: timm's
    stochastic depth rate (`check` refuses it for torchvision's ResNet-50).
    """
    if arch == DEFAULT_ARCH:
        net = torchvision.models.resnet50(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    elif arch.startswith(TIMM_PREFIX):
        net = TimmNetwork(_timm_model(arch[len(TIMM_PREFIX):], num_classes, zero_init_residual, drop_path))
    else:
        raise ValueError(f"unknown arch {arch!r}; {DEFAULT_ARCH!r} or {TIMM_PREFIX!r}<timm model>")
    net.fc = head.module(net.fc, num_classes)
    return net


def features(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features: its forward without `fc`."""
    if isinstance(net, TimmNetwork):
        return net.trunk(images)
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)


class TimmNetwork(nn.Module):
    """A timm model split into `trunk` (pooled features) and `fc` (its classifier)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        fc = model.get_classifier()
        if not isinstance(fc, nn.Linear):
            raise UserError(f"train.arch: timm's {type(model).__name__} ends in a {type(fc).__name__}, not one linear "
                            "classifier, which the heads replace; choose another timm model")
        model.reset_classifier(0)      # the classifier becomes an identity: the model returns pooled features
        self.trunk, self.fc = model, fc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(images))


def _timm_model(name: str, num_classes: int, zero_init_residual: bool, drop_path: float = 0.0) -> nn.Module:
    import timm
    options = {"zero_init_last": zero_init_residual, "dynamic_img_size": True}
    if drop_path:
        options["drop_path_rate"] = drop_path
    while True:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **options)
        except TypeError as exc:          # this family's constructor lacks one of the options
            missing = next((k for k in _TIMM_OPTIONS if k in options and f"'{k}'" in str(exc)), None)
            if missing is None:
                raise
            if missing == "zero_init_last" and zero_init_residual:
                raise UserError(f"train.zero_init_residual: true, but timm's {name} has no residual BatchNorm to "
                                "start at 0 (no zero_init_last option); set it false") from None
            if missing == "drop_path_rate":
                raise UserError(f"train.drop_path = {drop_path}, but timm's {name} has no stochastic depth "
                                "(no drop_path_rate option); set it to 0") from None
            del options[missing]
