"""eval-imagenet: the trained classifier (encoder + head) on real ImageNet test sets.

The test sets are datasets/imagenet_sets.py's (roots from `profiles.<profile>.data.<name>`),
scanned by their folder layouts and planned by datasets/imagenet_scan.py, run and tallied by
datasets/inference.py (code clip-tune shares).

Only images of classes the model knows are counted. For a set of all ImageNet-1K classes the
prediction is over all the model's logits. For a set of a class subset (IN-R and IN-A, 200
classes each) both are reported: `top1` /
`top5` with the logits restricted to the classes shared by the model and the test set (for
an ImageNet-1K model the standard 200-way evaluation; what the reports compare with the
paper), and `top1_all_logits` / `top5_all_logits` over every logit, the same images.

Reference models (Table 1 rows 13-14, `checkpoints.reference_models`) are scored by the same
code as ImageNet-1K models on the full test sets, whatever the experiment's class set. Their
scores are kept in `evaluate.work_dir/reference-scores/`, keyed by the weight file, the test
images, the preprocessing, the whole files of SCORING_CODE and the device type (AMP on CUDA).

Preprocessing, for every model: `transforms.build_transform` (bilinear resize to
`evaluate.resize`, centre crop to `evaluate.crop`, ImageNet normalisation); RSB-A1 is
also scored with timm's own recipe (crop 0.95, bicubic), see OWN_PREPROCESSING.
Accuracies are in percent. Representation statistics of the trained encoder's features on
IN val come from the same pass (module representation), under `representation`.

Docs: docs/evaluation.md#eval-imagenet
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from imagenet_sd.core import device as device_module
from imagenet_sd.core.io import file_sha256, write_json, write_tsv
from imagenet_sd.core.params import writable_dir
from imagenet_sd.datasets import imagenet_scan, inference, transforms
from imagenet_sd.datasets.imagenet_scan import EvalPlan, plan, skipped_test_sets, validate
from imagenet_sd.datasets.imagenet_sets import TEST_SETS
from imagenet_sd.datasets.inference import forward_batches, loader, tally
from imagenet_sd.datasets.transforms import INTERPOLATION, build_transform
from imagenet_sd.evaluate import checkpoints, representation
from imagenet_sd.evaluate.checkpoints import (
    LoadedModel,
    load_checkpoint,
    reference_key,
    reference_models,
    timm_transform,
)

TRAINED = "trained"   # the model column of this run's own rows in the plot and the summary


# --------------------------------------------------------------------------- scoring

def score(model: nn.Module, eval_plan: EvalPlan, transform, batch_size: int,
          device: torch.device, desc: str, features: list | None = None) -> dict:
    """Top-1/top-5 (percent) of `model` on the planned images (`tally`).

    `features`: a list that receives (encoder features, labels) per batch, the input of the
    model's `fc` taken in the same pass (module representation's statistics)."""
    data = loader(eval_plan.samples, transform, batch_size, device)
    pooled: list[torch.Tensor] = []
    if not isinstance(getattr(model, "fc", None), nn.Module):   # not a ResNet: no encoder output to take
        features = None
    hook = None if features is None else model.fc.register_forward_pre_hook(
        lambda _, inputs: pooled.append(inputs[0].float().cpu()))

    def batches():
        for logits, labels in forward_batches(model, data, device, desc):
            if features is not None:
                features.append((pooled.pop(), labels))
            yield logits, labels
    try:
        return tally(batches(), eval_plan)
    finally:
        if hook is not None:
            hook.remove()


def evaluate_model(loaded: LoadedModel, scanned: dict[str, dict[str, list[Path]]], transform,
                   batch_size: int, device: torch.device, label: str,
                   features: dict[str, list] | None = None) -> dict[str, dict]:
    """{test set: metrics} of one model on every scanned test set; `label` names it in messages.
    `features`: {test set: list}, filled with that set's encoder features (see `score`)."""
    metrics = {}
    for name, by_wnid in scanned.items():
        eval_plan = plan(TEST_SETS[name], by_wnid, loaded.wnids)
        if not eval_plan.samples:
            print(f"{label} on {name}: no images of the model's {len(loaded.classes)} classes; nothing to score")
            metrics[name] = {"top1": None, "top5": None, "classes": 0, "images": 0,
                             "logits": len(eval_plan.columns)}
            continue
        desc = name if label == TRAINED else f"{label} {name}"
        metrics[name] = score(loaded.model, eval_plan, transform, batch_size, device, desc,
                              (features or {}).get(name))
        # Per class (the details file only): where the model fails, not only its average.
        metrics[name]["per_class_top1"] = {loaded.classes[c]: v for c, v in
                                           zip(eval_plan.columns, metrics[name].pop("column_top1")) if v is not None}
    return metrics


# RSB-A1 is also scored with timm's own evaluation preprocessing (its pretrained config: bicubic
# resize to 224 / 0.95 = 235, centre crop 224), beside the shared one: the paper does not say which
# it used, and the recipe the weights were tuned for is worth knowing.
OWN_PREPROCESSING = {"timm-resnet50-a1": "timm-resnet50-a1-own-preprocessing"}

# The code the reference models' scores come from: a change to any of it scores them again. Besides
# this file and the checkpoints' loading: the preprocessing, the loader, forward loop and tally
# (datasets/inference.py) and the plan of each test set's images and logits (datasets/imagenet_scan.py).
SCORING_CODE = (__file__, transforms.__file__, inference.__file__, imagenet_scan.__file__, checkpoints.__file__)


def reference_scores(name: str, ref: LoadedModel, weights: Path, scanned: dict[str, dict[str, list[Path]]],
                     params, transform, device: torch.device, folder: Path,
                     preprocessing: object = None) -> dict[str, dict]:
    """`evaluate_model` of a reference model, from `folder` when these exact scores are there.
    `preprocessing` describes `transform` for that key (default: the shared one's settings)."""
    ev = params.evaluate
    images = {test_set: {w: [f"{p}:{p.stat().st_size}" for p in paths] for w, paths in sorted(by_wnid.items())}
              for test_set, by_wnid in sorted(scanned.items())}
    preprocessing = preprocessing or [ev.resize, ev.crop, INTERPOLATION]
    code = [file_sha256(f) for f in SCORING_CODE]
    text = json.dumps([file_sha256(weights), code, preprocessing, device.type, images], default=str)
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

SCORES = ("top1", "top5", "top1_all_logits", "top5_all_logits")


def headline(result: dict) -> dict:
    """metrics/imagenet.json: the scores alone, per test set, the reference models' top-1/top-5, and
    the encoder's feature statistics on IN val.

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
    if result.get("representation"):
        out["representation"] = result["representation"]
    return out


def representation_of(batches: list) -> tuple[dict[str, float], dict[str, str]]:
    """The encoder's feature statistics on IN val (module representation), and why any is left out."""
    if not batches:
        return {}, {"all": "no IN val features (val not configured, or a model without an fc layer)"}
    features = torch.cat([f for f, _ in batches]).numpy()
    labels = torch.cat([y for _, y in batches]).numpy()
    values, reasons = representation.available(features, labels)
    for key, why in reasons.items():
        print(f"representation {key}: skipped ({why})")
    return {k: round(v, 4) for k, v in values.items()}, reasons


def run(params, model_path: Path, metrics_path: Path, plot_path: Path, details_path: Path | None = None) -> dict:
    """The stage: scores to `metrics_path` (`headline`), everything to `details_path`; returns everything."""
    scanned = validate(params)
    references = reference_models(params)   # loaded before any scoring: a bad file fails at once
    scores_dir = writable_dir(f"profiles.{params.profile}.evaluate.work_dir", params.evaluate.work_dir,
                              params.evaluate.work_dir / "reference-scores") if references else None
    loaded = load_checkpoint(model_path)
    device = device_module.resolve(params.evaluate.device, f"profiles.{params.profile}.evaluate.device")
    transform = build_transform(params.evaluate.resize, params.evaluate.crop)
    skipped = skipped_test_sets(params, scanned)
    for name in skipped:
        print(f"{name}: skipped (profiles.{params.profile}.data.{name} is not configured)")
    references_skipped = [name for name in params.evaluate.reference_models if name not in references]
    for name in references_skipped:
        print(f"{name}: skipped ({reference_key(params, name)} is not configured)")
    batch_size = params.evaluate.batch_size
    val_features: list = []
    metrics: dict = evaluate_model(loaded, scanned, transform, batch_size, device, TRAINED, {"val": val_features})
    metrics["representation"], metrics["representation_skipped"] = representation_of(val_features)
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
