"""Loading the classifiers that the evaluation stages score: the trained checkpoint and the
ImageNet-1K reference models, each checked so that a wrong file stops with one line.

- `load_checkpoint`: the network saved by train-resnet50 (arch, head, class keys, wnids,
  state_dict), rebuilt by models/network.py with the head the checkpoint names (models/heads/;
  a checkpoint without `head` has the linear one).
- Reference models (Table 1 rows 13-14, `evaluate.reference_models`, `reference_models`):
  torchvision's ResNet-50 and timm's resnet50.a1_in1k (RSB-A1) from local weight files
  (.pth or .safetensors), never downloaded; their logits are in ImageNet-1K class-index
  order. `timm_transform` is timm's own evaluation preprocessing for a timm model
  (resnet50.a1_in1k: bicubic, crop ratio 0.95), which differs from the shared one of
  `transforms.build_transform`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torchvision
from torch import nn

from imagenet_sd.core.errors import UserError, first_line
from imagenet_sd.models import heads, network
from imagenet_sd.prompts import classes

RETRAIN_HINT = "run `dvc repro train-resnet50` to (re)build it"


# --------------------------------------------------------------------------- checkpoint

class LoadedModel(NamedTuple):
    model: nn.Module
    classes: list[str]
    wnids: list[str]


def load_checkpoint(path: Path) -> LoadedModel:
    """The classifier saved by train-resnet50, in eval mode, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model checkpoint; {RETRAIN_HINT}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise UserError(f"{path}: not a readable checkpoint ({first_line(exc)}); {RETRAIN_HINT}") from None
    keys, wnids = _checked_fields(path, ck)
    name = ck.get("head", "linear")
    weights = ck["state_dict"] if isinstance(ck["state_dict"], dict) else {}
    fc = {k.removeprefix("fc."): v for k, v in weights.items() if isinstance(k, str) and k.startswith("fc.")}
    model = network.build(ck["arch"], heads.HEADS[name].from_checkpoint(fc), len(keys))
    misfit = weights_misfit(model, ck["state_dict"])
    if misfit:
        raise UserError(f"{path}: weights do not fit a {ck['arch']} with {len(keys)} classes and a {name} "
                        f"head ({misfit}); {RETRAIN_HINT}")
    model.load_state_dict(ck["state_dict"])
    return LoadedModel(model.eval(), keys, wnids)


def _checked_fields(path: Path, ck) -> tuple[list[str], list[str]]:
    def bad(what: str) -> UserError:
        return UserError(f"{path}: checkpoint {what}; {RETRAIN_HINT}")
    if not isinstance(ck, dict) or "state_dict" not in ck:
        raise bad("is not a dict with a state_dict")
    if not isinstance(ck.get("arch"), str):
        raise bad("names no arch")
    why = network.unbuildable(ck["arch"])
    if why is not None:
        raise bad(f"has arch {ck['arch']!r}, which this install cannot build ({why})")
    if ck.get("head", "linear") not in heads.HEADS:
        raise bad(f"has head {ck.get('head')!r}, expected one of {', '.join(heads.HEADS)}")
    keys, wnids = ck.get("classes"), ck.get("wnids")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise bad("has no list of class keys")
    if not isinstance(wnids, list) or len(wnids) != len(keys) or not all(isinstance(w, str) for w in wnids):
        raise bad("wnids do not match its classes (one wnid or '' per class)")
    return keys, wnids


def weights_misfit(model: nn.Module, state) -> str:
    """Why `state` cannot be loaded into `model`, in one line; '' if it can.

    load_state_dict's own message spans many lines; users need the gist: which keys
    are missing or extra and which shapes differ (e.g. a 100-class head).
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "not a state_dict of tensors"
    expected = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked (unused in eval); some exports drop it.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in expected]
    shapes = [f"{k} is {tuple(state[k].shape)}, expected {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = ([f"{len(missing)} missing keys (e.g. {missing[0]})"] if missing else []) + \
               ([f"{len(extra)} unexpected keys (e.g. {extra[0]})"] if extra else []) + shapes[:1]
    return "; ".join(problems)


# --------------------------------------------------------------------------- reference models
# Table 1 rows 13-14: ImageNet-1K ResNet-50s trained on real images, scored by the
# same code as the trained model. Both name their weights like torchvision's resnet50.

def _torchvision_resnet50() -> nn.Module:
    return torchvision.models.resnet50(weights=None)


def _timm_resnet50() -> nn.Module:
    import timm  # here, not at the top: importing timm takes seconds and is needed only when configured
    return timm.create_model("resnet50", pretrained=False)


@dataclass(frozen=True)
class ReferenceModel:
    build: Callable[[], nn.Module]   # the architecture with random weights, 1000 logits
    weights: str                     # what the weight file should hold, for errors


REFERENCE_MODELS: dict[str, ReferenceModel] = {
    "torchvision-resnet50": ReferenceModel(
        _torchvision_resnet50, "torchvision's ResNet-50 ImageNet-1K state_dict, e.g. resnet50-0676ba61.pth"),
    "timm-resnet50-a1": ReferenceModel(
        _timm_resnet50, "timm's resnet50.a1_in1k weights (model.safetensors or a .pth state_dict)"),
}


def read_weights(key: str, path: Path, expected: str) -> dict:
    """The state_dict in a .safetensors or .pth file; UserError naming `key` if the file is not one."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # here: only reference models need it
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a truncated or foreign file
        raise UserError(f"params.yaml: {key} = {str(path)!r}: not a readable weight file ({first_line(exc)}); "
                        f"expected {expected}") from None
    # Training checkpoints (timm's train.py, torchvision's references) wrap the weights.
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            return state[wrapper]
    return state


def load_reference(name: str, path: Path, key: str) -> LoadedModel:
    """Reference model `name` with the weights of `path`, in eval mode on the CPU; logits in ImageNet-1K order."""
    spec = REFERENCE_MODELS[name]
    if not path.is_file():
        raise UserError(f"params.yaml: {key} = {str(path)!r}: no such weight file; expected {spec.weights}, "
                        f"or set {key}: '' to skip this model")
    state = read_weights(key, path, spec.weights)
    model = spec.build()
    misfit = weights_misfit(model, state)
    if misfit:
        raise UserError(f"params.yaml: {key} = {str(path)!r}: weights do not fit ({misfit}); expected {spec.weights}")
    model.load_state_dict(state)
    wnids = list(classes.imagenet1k_wnids())
    return LoadedModel(model.eval(), wnids, list(wnids))


def reference_key(params, name: str) -> str:
    return f"profiles.{params.profile}.evaluate.reference_models.{name}"


def reference_models(params) -> dict[str, LoadedModel]:
    """The configured reference models by name (unconfigured ones left out); UserError on a bad file."""
    return {name: load_reference(name, path, reference_key(params, name))
            for name, path in params.evaluate.reference_models.items() if path is not None}


def timm_transform(model: nn.Module) -> tuple[Callable, dict]:
    """(timm's evaluation transform for `model`, the data config it comes from)."""
    from timm.data import create_transform, resolve_data_config
    config = resolve_data_config({}, model=model)
    return create_transform(**config), config
