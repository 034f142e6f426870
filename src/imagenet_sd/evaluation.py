"""eval-imagenet: the trained classifier (encoder + head) on real ImageNet test sets.

Test sets and their folder layouts (roots from `profiles.<profile>.data`):

- val:    <root>/<wnid>/*.JPEG       ILSVRC-2012 validation, class folders, or
          <root>/ILSVRC2012_val_*.JPEG  flat, as distributed, labelled by the devkit
                                     (`data.val_labels`, or found beside the folder)
- v2:     <root>/<0..999>/*.jpeg     ImageNetV2; folder = ImageNet-1K class index
- sketch: <root>/<wnid>/*            ImageNet-Sketch
- r:      <root>/<wnid>/*            ImageNet-R, 200 classes
- a:      <root>/<wnid>/*            ImageNet-A, 200 classes

Only images of classes the model knows are counted. For val, v2 and sketch the
prediction is over all the model's logits. IN-R and IN-A cover 200 classes each.
The paper's Table 1 footnote computes their metrics "only on the common classes"
without saying whether the logits are restricted too, so both are reported: `top1`
/ `top5` with the logits restricted to the classes shared by the model and the test
set (for an ImageNet-1K model the standard 200-way evaluation; what the reports
compare with the paper), and `top1_all_logits` / `top5_all_logits` over every logit
of the model, the same images.

Reference models (Table 1 rows 13-14, `evaluate.reference_models`): torchvision's
ResNet-50 and timm's resnet50.a1_in1k from local weight files, scored by the same
code as ImageNet-1K models on the full test sets, whatever the experiment's class
set, as the paper reports them. Their scores depend only on the weight file, the
test images, the preprocessing, this module's code and the device type (AMP on
CUDA), none of which an experiment changes, so they are kept in
`evaluate.work_dir/reference-scores/` under a key of those and reused: a grid of
experiments scores each reference model once.

Preprocessing, for every model (timm's own recipe for resnet50.a1_in1k differs: crop
0.95, bicubic; RSB-A1 is also scored with it, see OWN_PREPROCESSING): shorter side resized to `evaluate.resize` with bilinear
interpolation (torchvision's ResNet-50 reference recipe), centre crop to
`evaluate.crop`, ImageNet mean/std normalisation. Accuracies are in percent.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T
from tqdm import tqdm

from . import classes, device as device_module
from .data import ImageList, image_files
from .errors import UserError
from .io import file_sha256, write_json, write_tsv
from .params import writable_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATION = "bilinear"
RETRAIN_HINT = "run `dvc repro train-resnet50` to (re)build it"
TRAINED = "trained"   # the model column of this run's own rows in the plot and the summary


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__


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
        raise UserError(f"{path}: not a readable checkpoint ({_first_line(exc)}); {RETRAIN_HINT}") from None
    keys, wnids = _checked_fields(path, ck)
    model = torchvision.models.resnet50(num_classes=len(keys))
    misfit = weights_misfit(model, ck["state_dict"])
    if misfit:
        raise UserError(f"{path}: weights do not fit a ResNet-50 with {len(keys)} classes ({misfit}); "
                        f"{RETRAIN_HINT}")
    model.load_state_dict(ck["state_dict"])
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
        raise UserError(f"params.yaml: {key} = {str(path)!r}: not a readable weight file ({_first_line(exc)}); "
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


# --------------------------------------------------------------------------- test sets

@dataclass(frozen=True)
class TestSet:
    name: str
    layout: str                              # shown in errors: what the root should contain
    folder_wnid: Callable[[str], str | None]  # class folder name -> wnid; None if not of this layout
    restrict: bool                           # logits limited to classes shared with the model
    class_set: Callable[[], frozenset[str]] | None = None  # the set's full class list, if restricted
    flat: bool = False                       # also the flat ILSVRC-2012 val layout, labelled by the devkit


def _wnid_folder(name: str) -> str | None:
    return name if classes.WNID.match(name) else None


def _index_folder(name: str) -> str | None:
    in1k = classes.imagenet1k_wnids()
    return in1k[int(name)] if name.isdigit() and int(name) < len(in1k) else None


WNID_FOLDERS = "class folders named by wnid (<root>/n01440764/...)"
TEST_SETS: dict[str, TestSet] = {
    "val": TestSet("val", f"{WNID_FOLDERS}, or the flat ILSVRC2012_val_*.JPEG files in <root> labelled by "
                          "the devkit (data.val_labels)", _wnid_folder, False, flat=True),
    "v2": TestSet("v2", "class folders named 0..999 by ImageNet-1K class index (<root>/0/...)",
                  _index_folder, False),
    "sketch": TestSet("sketch", WNID_FOLDERS, _wnid_folder, False),
    "r": TestSet("r", "class folders named by wnid, 200 ImageNet-R classes (<root>/n01443537/...)",
                 _wnid_folder, True, classes.imagenet_r_wnids),
    "a": TestSet("a", "class folders named by wnid, 200 ImageNet-A classes (<root>/n01498041/...)",
                 _wnid_folder, True, classes.imagenet_a_wnids),
}


def configured_roots(params) -> dict[str, Path | None]:
    return {name: getattr(params.data, name) for name in TEST_SETS}


def scan_test_set(profile: str, spec: TestSet, root: Path, labels: Path | None = None) -> dict[str, list[Path]]:
    """{wnid: image paths} of a test set root; UserError if the root is missing or malformed.

    `labels`: the devkit or .csv labelling a flat val folder (None: looked for beside it).
    """
    key = f"profiles.{profile}.data.{spec.name}"
    expected = f"expected {spec.layout}"
    if not root.is_dir():
        raise UserError(f"params.yaml: {key} = {str(root)!r}: no such folder; {expected}, "
                        f"or set {key}: '' to skip this test set")
    folders = image_files(root)
    flat = flat_val_images(root) if spec.flat else []
    if folders and flat:
        raise UserError(f"params.yaml: {key} = {str(root)!r}: holds both class folders and flat "
                        f"ILSVRC2012_val_*.JPEG files; {expected}, not both")
    if flat:
        return flat_val_by_wnid(profile, root, flat, labels)
    if labels is not None and folders:
        print(f"{spec.name}: class-folder layout; profiles.{profile}.data.val_labels is not used")
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


# --------------------------------------------------------------------------- flat ILSVRC-2012 val
# The val images as distributed: ILSVRC2012_val_00000001.JPEG ... _00050000.JPEG in one
# folder. Their labels are in the devkit: line n of the ground-truth file is the
# ILSVRC2012_ID (1..1000, NOT the sorted-wnid class index) of image n, and meta.mat
# maps IDs to wnids. Kaggle's LOC_val_solution.csv gives the wnid of each image directly.

VAL_IMAGE = re.compile(r"^ILSVRC2012_val_\d{8}\.jpe?g$", re.IGNORECASE)
DEVKIT = "ILSVRC2012_devkit_t12"
DEVKIT_GROUND_TRUTH = f"{DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = f"{DEVKIT}/data/meta.mat"
SOLUTION_CSV = "LOC_val_solution.csv"
VAL_LABEL_FORMS = (f"the devkit folder {DEVKIT} (data/meta.mat + data/ILSVRC2012_validation_ground_truth.txt), "
                   f"its archive {DEVKIT}.tar.gz, or Kaggle's {SOLUTION_CSV}")


class _BadLabels(ValueError):
    """A label file that is not what VAL_LABEL_FORMS describes; the message says why."""


def flat_val_images(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if VAL_IMAGE.match(p.name) and p.is_file())


def find_val_labels(root: Path) -> Path | None:
    """The devkit folder, devkit archive or solution .csv in the val folder or beside it, if any."""
    for folder in (root, root.parent):
        for name in (DEVKIT, f"{DEVKIT}.tar.gz", SOLUTION_CSV):
            if (folder / name).exists():
                return folder / name
    return None


def flat_val_by_wnid(profile: str, root: Path, images: list[Path], labels: Path | None) -> dict[str, list[Path]]:
    """{wnid: image paths} of a flat val folder, labelled from `labels` or the label file found beside it."""
    labels_key = f"profiles.{profile}.data.val_labels"
    source = labels or find_val_labels(root)
    if source is None:
        raise UserError(f"params.yaml: profiles.{profile}.data.val = {str(root)!r}: flat ILSVRC2012_val_*.JPEG "
                        f"files but no labels in or beside the folder; set {labels_key} to {VAL_LABEL_FORMS}")
    where = (f"params.yaml: {labels_key} = {str(source)!r}" if labels
             else f"{source} (found beside profiles.{profile}.data.val)")
    label_of = read_val_labels(where, source)
    unlabelled = [p.name for p in images if p.stem not in label_of]
    if unlabelled:
        raise UserError(f"{where}: no label for {len(unlabelled)} of the {len(images)} images in {root} "
                        f"(e.g. {unlabelled[0]}); expected the ILSVRC-2012 labels of these images: {VAL_LABEL_FORMS}")
    print(f"val: flat layout, {len(images)} images labelled by {source}")
    by_wnid: dict[str, list[Path]] = {}
    for path in images:
        by_wnid.setdefault(label_of[path.stem], []).append(path)
    return by_wnid


def read_val_labels(where: str, path: Path) -> dict[str, str]:
    """{image name without extension: wnid} from a devkit folder, devkit archive or solution .csv."""
    try:
        if path.is_dir():
            # The devkit folder itself (any name), or the folder holding ILSVRC2012_devkit_t12/.
            data = path / "data" if (path / "data").is_dir() else path / DEVKIT / "data"
            ground_truth, meta = data / Path(DEVKIT_GROUND_TRUTH).name, data / "meta.mat"
            for needed in (ground_truth, meta):
                if not needed.is_file():
                    raise _BadLabels(f"no {needed}")
            labels = devkit_labels(ground_truth.read_text(), meta)
        elif path.name.endswith((".tar.gz", ".tgz", ".tar")):
            labels = _archive_labels(path)
        elif path.suffix == ".csv":
            labels = solution_labels(path.read_text())
        else:
            raise _BadLabels("not a folder, .tar.gz or .csv")
    except (_BadLabels, OSError, EOFError, UnicodeDecodeError, tarfile.TarError) as exc:
        raise UserError(f"{where}: {_first_line(exc)}; expected {VAL_LABEL_FORMS}") from None
    foreign = sorted(set(labels.values()) - set(classes.imagenet1k_wnids()))
    if foreign:
        raise UserError(f"{where}: labels name {foreign[0]!r}, not an ImageNet-1K wnid; "
                        f"expected the ILSVRC-2012 labels: {VAL_LABEL_FORMS}")
    return labels


def _archive_labels(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> bytes:
            if name not in members:
                raise _BadLabels(f"the archive has no {name}")
            return tar.extractfile(members[name]).read()
        return devkit_labels(read(DEVKIT_GROUND_TRUTH).decode(), io.BytesIO(read(DEVKIT_META)))


def devkit_labels(ground_truth: str, meta) -> dict[str, str]:
    """{ILSVRC2012_val_0000000n: wnid} from the ground-truth text and meta.mat (a path or file object)."""
    wnid_of = ilsvrc_ids(meta)
    labels = {}
    for n, token in enumerate(ground_truth.split(), start=1):
        if not token.isdigit() or int(token) not in wnid_of:
            raise _BadLabels(f"ground-truth line {n} ({token!r}) is not an ILSVRC2012_ID of meta.mat")
        labels[f"ILSVRC2012_val_{n:08d}"] = wnid_of[int(token)]
    if not labels:
        raise _BadLabels("the ground-truth file is empty")
    return labels


def ilsvrc_ids(meta) -> dict[int, str]:
    """{ILSVRC2012_ID: wnid} of the devkit's meta.mat (its 'synsets' struct array)."""
    import scipy.io  # here: only the flat val layout needs it
    try:
        synsets = scipy.io.loadmat(meta, squeeze_me=True)["synsets"]
        ids, wnids = np.atleast_1d(synsets["ILSVRC2012_ID"]), np.atleast_1d(synsets["WNID"])
        return {int(i): str(w) for i, w in zip(ids, wnids)}
    except Exception as exc:  # loadmat raises many types for a file that is not a MAT file
        raise _BadLabels(f"meta.mat has no 'synsets' with ILSVRC2012_ID and WNID ({_first_line(exc)})") from None


def solution_labels(text: str) -> dict[str, str]:
    """{ImageId: wnid} of Kaggle's LOC_val_solution.csv: the first wnid of each PredictionString."""
    rows = list(csv.reader(text.splitlines()))
    if not rows or [cell.strip() for cell in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise _BadLabels("the .csv does not start with the header ImageId,PredictionString")
    labels = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[1].split():
            raise _BadLabels(f"line {n} of the .csv is not ImageId,PredictionString")
        labels[row[0].strip()] = row[1].split()[0]
    return labels


# --------------------------------------------------------------------------- plans

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
            # Mixed precision only where it pays: CUDA. fp16 rather than bf16 (which
            # training prefers for its range): inference has no gradients to overflow,
            # and fp16's 3 extra mantissa bits keep the logits, hence top-k, closer to fp32.
            with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                out = model(images.to(device, non_blocking=True))
            yield out.float().cpu(), labels
            bar.update(len(labels))


def score(model: nn.Module, eval_plan: EvalPlan, transform, batch_size: int,
          device: torch.device, desc: str) -> dict:
    """Top-1/top-5 (percent) of `model` on the planned images; top-5 is None under 5 logits."""
    columns = torch.tensor(eval_plan.columns)
    hits, hits_all, width = {1: 0, 5: 0}, {1: 0, 5: 0}, None
    data = loader(eval_plan.samples, transform, batch_size, device)
    for logits, labels in forward_batches(model, data, device, desc):
        width = logits.shape[1]
        for k, n in topk_correct(logits[:, columns], labels).items():
            hits[k] += n
        if len(columns) < width:       # restricted (IN-R, IN-A): also over every logit
            for k, n in topk_correct(logits, columns[labels]).items():
                hits_all[k] += n
    total = len(eval_plan.samples)

    def pct(counts: dict[int, int], k: int, logits: int):
        return round(100.0 * counts[k] / total, 2) if total and k <= logits else None
    result = {"top1": pct(hits, 1, len(columns)), "top5": pct(hits, 5, len(columns)),
              "classes": eval_plan.classes, "images": total, "logits": len(eval_plan.columns)}
    if width is not None and len(columns) < width:
        result.update(top1_all_logits=pct(hits_all, 1, width), top5_all_logits=pct(hits_all, 5, width))
    return result


def evaluate_model(loaded: LoadedModel, scanned: dict[str, dict[str, list[Path]]], transform,
                   batch_size: int, device: torch.device, label: str) -> dict[str, dict]:
    """{test set: metrics} of one model on every scanned test set; `label` names it in messages."""
    metrics = {}
    for name, by_wnid in scanned.items():
        eval_plan = plan(TEST_SETS[name], by_wnid, loaded.wnids)
        if not eval_plan.samples:
            print(f"{label} on {name}: no images of the model's {len(loaded.classes)} classes; nothing to score")
            metrics[name] = {"top1": None, "top5": None, "classes": 0, "images": 0,
                             "logits": len(eval_plan.columns)}
            continue
        desc = name if label == TRAINED else f"{label} {name}"
        metrics[name] = score(loaded.model, eval_plan, transform, batch_size, device, desc)
    return metrics


# RSB-A1 is also scored with timm's own evaluation preprocessing (its pretrained config: bicubic
# resize to 224 / 0.95 = 235, centre crop 224), beside the shared one: the paper does not say which
# it used, and the recipe the weights were tuned for is worth knowing.
OWN_PREPROCESSING = {"timm-resnet50-a1": "timm-resnet50-a1-own-preprocessing"}


def timm_transform(model: nn.Module) -> tuple[Callable, dict]:
    """(timm's evaluation transform for `model`, the data config it comes from)."""
    from timm.data import create_transform, resolve_data_config
    config = resolve_data_config({}, model=model)
    return create_transform(**config), config


def reference_scores(name: str, ref: LoadedModel, weights: Path, scanned: dict[str, dict[str, list[Path]]],
                     params, transform, device: torch.device, folder: Path,
                     preprocessing: object = None) -> dict[str, dict]:
    """`evaluate_model` of a reference model, from `folder` when these exact scores are there.
    `preprocessing` describes `transform` for that key (default: the shared one's settings)."""
    ev = params.evaluate
    images = {test_set: {w: [f"{p}:{p.stat().st_size}" for p in paths] for w, paths in sorted(by_wnid.items())}
              for test_set, by_wnid in sorted(scanned.items())}
    preprocessing = preprocessing or [ev.resize, ev.crop, INTERPOLATION]
    text = json.dumps([file_sha256(weights), file_sha256(__file__), preprocessing, device.type, images],
                      default=str)
    path = folder / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"
    try:
        metrics = json.loads(path.read_text())
        print(f"{name}: scores from {path}")
        return metrics
    except (OSError, ValueError):
        pass        # not there yet, or damaged: scored again
    metrics = evaluate_model(ref, scanned, transform, ev.batch_size, device, name)
    write_json(path, metrics)
    return metrics


# --------------------------------------------------------------------------- stage

def validate(params) -> dict[str, dict[str, list[Path]]]:
    """Scan every configured test set up front, so a bad root fails before any work."""
    return {name: scan_val(params) if name == "val" else scan_test_set(params.profile, TEST_SETS[name], root)
            for name, root in configured_roots(params).items() if root is not None}


def scan_val(params) -> dict[str, list[Path]]:
    """{wnid: image paths} of ImageNet val (data.val, either layout; data.val_labels for the flat one)."""
    labels = params.data.val_labels
    if labels is not None and not labels.exists():
        key = f"profiles.{params.profile}.data.val_labels"
        raise UserError(f"params.yaml: {key} = {str(labels)!r}: no such file or folder; expected "
                        f"{VAL_LABEL_FORMS}, or set {key}: '' to look for them beside the val folder")
    return scan_test_set(params.profile, TEST_SETS["val"], params.data.val, labels)


SCORES = ("top1", "top5", "top1_all_logits", "top5_all_logits")


def headline(result: dict) -> dict:
    """metrics/imagenet.json: the scores alone, per test set, and the reference models' top-1/top-5.

    What each covers (classes, images, logits) and what was skipped go to the details
    file; a score that could not be computed is left out, never written as 0.
    """
    def scores(m: dict, keys=SCORES) -> dict:
        return {k: m[k] for k in keys if m.get(k) is not None}
    out: dict = {name: scores(m) for name, m in result.items() if name in TEST_SETS and scores(m)}
    references = {model: {name: scores(m, ("top1", "top5")) for name, m in sets.items() if scores(m)}
                  for model, sets in result.get("reference", {}).items()}
    if references:
        out["reference"] = references
    return out


def run(params, model_path: Path, metrics_path: Path, plot_path: Path, details_path: Path | None = None) -> dict:
    """The stage: scores to `metrics_path` (`headline`), everything to `details_path`; returns everything."""
    scanned = validate(params)
    references = reference_models(params)   # loaded before any scoring: a bad file fails at once
    scores_dir = writable_dir(f"profiles.{params.profile}.evaluate.work_dir", params.evaluate.work_dir,
                              params.evaluate.work_dir / "reference-scores") if references else None
    loaded = load_checkpoint(model_path)
    device = device_module.resolve(params.evaluate.device, f"profiles.{params.profile}.evaluate.device")
    transform = build_transform(params.evaluate.resize, params.evaluate.crop)
    skipped = [name for name in TEST_SETS if name not in scanned]
    for name in skipped:
        print(f"{name}: skipped (profiles.{params.profile}.data.{name} is not configured)")
    references_skipped = [name for name in params.evaluate.reference_models if name not in references]
    for name in references_skipped:
        print(f"{name}: skipped ({reference_key(params, name)} is not configured)")
    batch_size = params.evaluate.batch_size
    metrics: dict = evaluate_model(loaded, scanned, transform, batch_size, device, TRAINED)
    metrics["skipped"] = skipped
    metrics["reference"] = {name: reference_scores(name, ref, params.evaluate.reference_models[name], scanned,
                                                   params, transform, device, scores_dir)
                            for name, ref in references.items()}
    for name, own_name in OWN_PREPROCESSING.items():
        if name in references:
            own, config = timm_transform(references[name].model)
            metrics["reference"][own_name] = reference_scores(
                own_name, references[name], params.evaluate.reference_models[name], scanned, params, own, device,
                scores_dir, preprocessing=config)
    metrics["reference_skipped"] = references_skipped
    write_json(metrics_path, headline(metrics))
    if details_path is not None:
        write_json(details_path, metrics)
    write_tsv(plot_path, ["test_set", "model", "top1", "top5"], _plot_rows(metrics))
    print(summary_table(metrics))
    return metrics


def _model_rows(metrics: dict) -> list[tuple[str, str, dict]]:
    """(model, test set, its metrics) of the trained model, then of each reference model."""
    rows = [(TRAINED, name, m) for name, m in metrics.items() if name in TEST_SETS]
    for model, sets in metrics.get("reference", {}).items():
        rows += [(model, name, m) for name, m in sets.items()]
    return rows


def _plot_rows(metrics: dict) -> list[list]:
    # The plot's y axis is test_set: reference rows name their model there too, so
    # their bars do not land on the trained model's.
    return [[name if model == TRAINED else f"{name} ({model})", model, m["top1"],
             "" if m["top5"] is None else m["top5"]]
            for model, name, m in _model_rows(metrics) if m["images"]]


def summary_table(metrics: dict) -> str:
    lines = [f"{'model':<20} {'test set':<8} {'top1':>7} {'top5':>7} {'classes':>8} {'images':>8}"]
    for model, name, m in _model_rows(metrics):
        top1 = "-" if m["top1"] is None else f"{m['top1']:.2f}"
        top5 = "-" if m["top5"] is None else f"{m['top5']:.2f}"
        lines.append(f"{model:<20} {name:<8} {top1:>7} {top5:>7} {m['classes']:>8} {m['images']:>8}")
    for name in metrics.get("skipped", []):
        lines.append(f"{'':<20} {name:<8} skipped (not configured)")
    for model in metrics.get("reference_skipped", []):
        lines.append(f"{model:<20} {'':<8} skipped (not configured)")
    return "\n".join(lines)
