"""eval-imagenet: the trained classifier (encoder + head) on real ImageNet test sets.

Test sets and their folder layouts (roots from `profiles.<profile>.data`):

- val:    <root>/<wnid>/*.JPEG       ILSVRC-2012 validation, class folders
- v2:     <root>/<0..999>/*.jpeg     ImageNetV2; folder = ImageNet-1K class index
- sketch: <root>/<wnid>/*            ImageNet-Sketch
- r:      <root>/<wnid>/*            ImageNet-R, 200 classes
- a:      <root>/<wnid>/*            ImageNet-A, 200 classes

Only images of classes the model knows are counted. For val, v2 and sketch the
prediction is over all the model's logits. IN-R and IN-A cover 200 classes each,
so, as in the paper's Table 1 footnote, both the images and the logits are
restricted to the classes shared by the model and the test set (for an
ImageNet-1K model this is the standard 200-way evaluation).

Preprocessing: shorter side resized to `evaluate.resize` with bilinear
interpolation (torchvision's ResNet-50 reference recipe), centre crop to
`evaluate.crop`, ImageNet mean/std normalisation. Accuracies are in percent.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T
from tqdm import tqdm

from . import classes, device as device_module
from .data import ImageList, image_files
from .errors import UserError
from .io import write_json, write_tsv

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATION = "bilinear"
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
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable checkpoint ({reason}); {RETRAIN_HINT}") from None
    keys, wnids = _checked_fields(path, ck)
    model = torchvision.models.resnet50(num_classes=len(keys))
    try:
        model.load_state_dict(ck["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0][:120]
        raise UserError(f"{path}: weights do not fit a ResNet-50 with {len(keys)} classes ({reason}); "
                        f"{RETRAIN_HINT}") from None
    return LoadedModel(model.eval(), keys, wnids)


def _checked_fields(path: Path, ck) -> tuple[list[str], list[str]]:
    def bad(what: str) -> UserError:
        return UserError(f"{path}: checkpoint {what}; {RETRAIN_HINT}")
    if not isinstance(ck, dict) or "state_dict" not in ck:
        raise bad("is not a dict with a state_dict")
    if ck.get("arch") != "resnet50":
        raise bad(f"has arch {ck.get('arch')!r}, expected 'resnet50'")
    keys, wnids = ck.get("classes"), ck.get("wnids")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise bad("has no list of class keys")
    if not isinstance(wnids, list) or len(wnids) != len(keys) or not all(isinstance(w, str) for w in wnids):
        raise bad("wnids do not match its classes (one wnid or '' per class)")
    return keys, wnids


# --------------------------------------------------------------------------- test sets

@dataclass(frozen=True)
class TestSet:
    name: str
    layout: str                              # shown in errors: what the root should contain
    folder_wnid: Callable[[str], str | None]  # class folder name -> wnid; None if not of this layout
    restrict: bool                           # logits limited to classes shared with the model
    class_set: Callable[[], frozenset[str]] | None = None  # the set's full class list, if restricted


def _wnid_folder(name: str) -> str | None:
    return name if classes.WNID.match(name) else None


def _index_folder(name: str) -> str | None:
    in1k = classes.imagenet1k_wnids()
    return in1k[int(name)] if name.isdigit() and int(name) < len(in1k) else None


TEST_SETS: dict[str, TestSet] = {
    "val": TestSet("val", "class folders named by wnid (<root>/n01440764/...)", _wnid_folder, False),
    "v2": TestSet("v2", "class folders named 0..999 by ImageNet-1K class index (<root>/0/...)",
                  _index_folder, False),
    "sketch": TestSet("sketch", "class folders named by wnid (<root>/n01440764/...)", _wnid_folder, False),
    "r": TestSet("r", "class folders named by wnid, 200 ImageNet-R classes (<root>/n01443537/...)",
                 _wnid_folder, True, classes.imagenet_r_wnids),
    "a": TestSet("a", "class folders named by wnid, 200 ImageNet-A classes (<root>/n01498041/...)",
                 _wnid_folder, True, classes.imagenet_a_wnids),
}


def configured_roots(params) -> dict[str, Path | None]:
    return {name: getattr(params.data, name) for name in TEST_SETS}


def scan_test_set(profile: str, spec: TestSet, root: Path) -> dict[str, list[Path]]:
    """{wnid: image paths} of a test set root; UserError if the root is missing or malformed."""
    key = f"profiles.{profile}.data.{spec.name}"
    expected = f"expected {spec.layout}"
    if not root.is_dir():
        raise UserError(f"params.yaml: {key} = {str(root)!r}: no such folder; {expected}, "
                        f"or set {key}: '' to skip this test set")
    folders = image_files(root)
    if not folders:
        raise UserError(f"params.yaml: {key} = {str(root)!r}: no class folders with images; {expected}")
    by_wnid: dict[str, list[Path]] = {}
    for folder, files in folders.items():
        wnid = spec.folder_wnid(folder)
        if wnid is None:
            raise UserError(f"params.yaml: {key} = {str(root)!r}: class folder {folder!r} does not fit "
                            f"the layout; {expected}")
        by_wnid[wnid] = files
    return by_wnid


@dataclass(frozen=True)
class EvalPlan:
    """What to score: images with labels, and which model logits take part."""
    samples: list[tuple[Path, int]]   # image, index into `columns`
    columns: list[int]                # model logit indices in play, in model order
    classes: int                      # classes with at least one counted image


def plan(spec: TestSet, by_wnid: dict[str, list[Path]], model_wnids: list[str]) -> EvalPlan:
    """Keep the images of classes the model knows; for IN-R/IN-A also narrow the logits."""
    if spec.restrict:
        in_set = spec.class_set() if spec.class_set else frozenset(by_wnid)
        columns = [i for i, w in enumerate(model_wnids) if w and w in in_set]
    else:
        columns = list(range(len(model_wnids)))
    label_of = {model_wnids[c]: pos for pos, c in enumerate(columns) if model_wnids[c]}
    samples = [(path, label_of[wnid]) for wnid, files in sorted(by_wnid.items()) if wnid in label_of
               for path in files]
    return EvalPlan(samples, columns, len({label for _, label in samples}))


# --------------------------------------------------------------------------- scoring

def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """How many rows have their label among the k highest logits, for each k <= number of logits."""
    usable = [k for k in ks if k <= logits.shape[1]]
    if not usable:
        return {}
    top = logits.topk(max(usable), dim=1).indices
    hits = top == labels.unsqueeze(1)
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in usable}


def build_transform(resize: int, crop: int) -> T.Compose:
    return T.Compose([
        T.ToImage(),
        T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(crop),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


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
            # Mixed precision only where it pays and is exact enough: CUDA.
            with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                out = model(images.to(device, non_blocking=True))
            yield out.float().cpu(), labels
            bar.update(len(labels))


def score(model: nn.Module, eval_plan: EvalPlan, transform, batch_size: int,
          device: torch.device, desc: str) -> dict:
    """Top-1/top-5 (percent) of `model` on the planned images; top-5 is None under 5 logits."""
    columns = torch.tensor(eval_plan.columns)
    hits = {1: 0, 5: 0}
    data = loader(eval_plan.samples, transform, batch_size, device)
    for logits, labels in forward_batches(model, data, device, desc):
        for k, n in topk_correct(logits[:, columns], labels).items():
            hits[k] += n
    total = len(eval_plan.samples)

    def pct(k: int):
        return round(100.0 * hits[k] / total, 2) if total and k <= len(eval_plan.columns) else None
    return {"top1": pct(1), "top5": pct(5), "classes": eval_plan.classes, "images": total,
            "logits": len(eval_plan.columns)}


# --------------------------------------------------------------------------- stage

def validate(params) -> dict[str, dict[str, list[Path]]]:
    """Scan every configured test set up front, so a bad root fails before any work."""
    return {name: scan_test_set(params.profile, TEST_SETS[name], root)
            for name, root in configured_roots(params).items() if root is not None}


def run(params, model_path: Path, metrics_path: Path, plot_path: Path) -> dict:
    scanned = validate(params)
    loaded = load_checkpoint(model_path)
    device = device_module.resolve(params.evaluate.device, f"profiles.{params.profile}.evaluate.device")
    transform = build_transform(params.evaluate.resize, params.evaluate.crop)
    skipped = [name for name in TEST_SETS if name not in scanned]
    for name in skipped:
        print(f"{name}: skipped (profiles.{params.profile}.data.{name} is not configured)")
    metrics: dict = {}
    for name, by_wnid in scanned.items():
        eval_plan = plan(TEST_SETS[name], by_wnid, loaded.wnids)
        if not eval_plan.samples:
            print(f"{name}: no images of the model's {len(loaded.classes)} classes; nothing to score")
            metrics[name] = {"top1": None, "top5": None, "classes": 0, "images": 0,
                             "logits": len(eval_plan.columns)}
            continue
        metrics[name] = score(loaded.model, eval_plan, transform, params.evaluate.batch_size, device, name)
    metrics["skipped"] = skipped
    write_json(metrics_path, metrics)
    write_tsv(plot_path, ["test_set", "top1", "top5"], _plot_rows(metrics))
    print(summary_table(metrics))
    return metrics


def _plot_rows(metrics: dict) -> list[list]:
    return [[name, m["top1"], "" if m["top5"] is None else m["top5"]]
            for name, m in metrics.items() if name in TEST_SETS and m["images"]]


def summary_table(metrics: dict) -> str:
    lines = [f"{'test set':<8} {'top1':>7} {'top5':>7} {'classes':>8} {'images':>8}"]
    for name, m in metrics.items():
        if name not in TEST_SETS:
            continue
        top1 = "-" if m["top1"] is None else f"{m['top1']:.2f}"
        top5 = "-" if m["top5"] is None else f"{m['top5']:.2f}"
        lines.append(f"{name:<8} {top1:>7} {top5:>7} {m['classes']:>8} {m['images']:>8}")
    for name in metrics.get("skipped", []):
        lines.append(f"{name:<8} {'skipped (not configured)':>33}")
    return "\n".join(lines)
