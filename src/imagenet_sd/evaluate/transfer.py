"""eval-transfer: linear probes on the frozen encoder (the paper's Sec. 5.3 protocol).

For each dataset in `profiles.<profile>.transfer.datasets` ({name: root}, read by
datasets/transfer_sets.py: the paper's ten through torchvision's classes, any other name
as `train/<class>/` and `test/<class>/` image folders; a '' root is skipped and
reported), for ImageNet-CoG's five levels when `transfer.cog` names its files and
for ImageNet-1K when `transfer.in1k` is true (module `cog`; metrics cog_l1..cog_l5,
averaged apart as cog_average_top1, and in1k):

1. features = the ResNet-50's pooled 2048-d output (its `fc` removed), computed
   once per (checkpoint bytes, dataset, split, preprocessing, file list) and
   cached as .npz under `transfer.work_dir/features/<dataset>/` (datasets/feature_cache.py), so that
   re-running the probe or adding a dataset does not recompute the others, and
   the baselines' features (which no experiment changes) are computed once for
   all experiments, queued ones included (the folder is outside the workspace);
2. a linear probe (`probes.probe`: L2-regularised logistic regression on standardised
   features, scikit-learn or PyTorch by `profiles.<profile>.transfer.probe`); its inverse
   regularisation C is picked from `transfer.c_points` log-spaced values over `transfer.c_range`
   (Kornblith et al.'s 45 over [1e-6, 1e5] by default) on the official val split where
   the dataset has one (Aircraft, DTD, Flowers), else on a seeded, stratified 80/20
   split of train (seed = seeds.derive(seed, "transfer", name)); then the probe is
   refit on train + val;
3. top-1 and mean per-class accuracy on test, in percent.

Preprocessing is eval-imagenet's (`profiles.<profile>.evaluate.resize` / `.crop`,
bilinear resize, centre crop, ImageNet normalisation), so both evaluations see
images the same way; batch size and device come from the transfer block.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from imagenet_sd.core import device as device_module
from imagenet_sd.core.io import file_sha256, write_json, write_tsv
from imagenet_sd.core.params import writable_dir
from imagenet_sd.core.seeds import derive
from imagenet_sd.datasets import feature_cache, transfer_sets
from imagenet_sd.datasets.inference import forward_batches, loader
from imagenet_sd.datasets.transfer_sets import Split
from imagenet_sd.datasets.transforms import INTERPOLATION, build_transform
from imagenet_sd.evaluate import cog
from imagenet_sd.evaluate.checkpoints import load_checkpoint, reference_models
from imagenet_sd.models import probes

# --------------------------------------------------------------------------- features

def encoder_of(model: nn.Module) -> nn.Module:
    """The classifier without its head: outputs the 2048-d pooled feature."""
    model.fc = nn.Identity()
    return model.eval()


def extract(encoder: nn.Module, split_data: Split, transform, batch_size: int,
            device: torch.device, desc: str) -> np.ndarray:
    data = loader(split_data.samples, transform, batch_size, device)
    return np.concatenate([out.numpy() for out, _ in forward_batches(encoder, data, device, desc)])


# --------------------------------------------------------------------------- stage

def dataset_features(encoder, model_digest: str, name: str, splits: dict[str, Split], params,
                     cache_dir: Path, device: torch.device) -> dict[str, np.ndarray]:
    resize, crop = params.evaluate.resize, params.evaluate.crop
    preprocessing = f"resize{resize}-{INTERPOLATION}-crop{crop}-imagenet-norm"
    transform = build_transform(resize, crop)
    features = {}
    for split, split_data in splits.items():
        key = feature_cache.cache_key(model_digest, name, split, preprocessing, split_data)
        features[split], hit = feature_cache.cached(
            cache_dir / name / f"{split}-{key}.npz",
            lambda: extract(encoder, split_data, transform, params.transfer.batch_size, device,
                            f"{name}/{split}"))
        if hit:
            print(f"{name}/{split}: {len(split_data.samples)} features from cache")
    return features


def labels(split: Split) -> np.ndarray:
    return np.array([y for _, y in split.samples], dtype=int)


def probe_all(encoder: nn.Module, digest: str, datasets: dict, params, cache_dir: Path,
              device: torch.device) -> dict:
    """Probe metrics of one encoder on every dataset, plus average top-1s (`averages`)."""
    metrics: dict = {}
    for name, data in datasets.items():
        splits = data.splits
        feats = dataset_features(encoder, digest, name, splits, params, cache_dir, device)
        # C is chosen on the official val where there is one (else on a seeded part of
        # train), then the probe is refit on train + val (the authors' "trainval").
        val = (feats["val"], labels(splits["val"])) if "val" in splits else None
        test_y = labels(splits["test"])
        grid = probes.c_grid(*params.transfer.c_range, params.transfer.c_points)
        result = probes.probe(feats["train"], labels(splits["train"]), feats["test"], test_y,
                              derive(params.seed, "transfer", name), params.transfer.probe, device, val, grid)
        if result["C_at_edge"]:
            print(f"warning: {name}: the probe chose C = {result['C']:.3g}, at the edge of the grid "
                  f"{params.transfer.c_range}; the best C may lie beyond it: widen profiles.{params.profile}"
                  ".transfer.c_range")
        metrics[name] = {**result, "headline": data.headline, "classes": len(splits["train"].classes),
                         "train_images": len(splits["train"].samples),
                         "val_images": len(splits["val"].samples) if "val" in splits else 0,
                         "test_images": len(test_y), "split": data.protocol}
    return {**metrics, **averages(metrics, list(datasets))}


def groups(names) -> tuple[list[str], list[str]]:
    """(the transfer datasets of Table 2's kind, CoG's levels) among `names`; in1k is in neither."""
    return [n for n in names if n not in cog.APART], [n for n in names if n in cog.NAMES]


AVERAGES = (("average_top1", "average"), ("cog_average_top1", "CoG average"))   # metrics key, printed label


def averages(metrics: dict, names: list[str]) -> dict:
    """average_top1 over the transfer datasets, cog_average_top1 over CoG's levels; None for an empty group."""
    others, levels = groups(names)

    def mean(group: list[str]) -> float | None:
        return round(float(np.mean([metrics[n]["top1"] for n in group])), 2) if group else None
    return {"average_top1": mean(others), "cog_average_top1": mean(levels)}


def random_encoder(seed: int) -> nn.Module:
    """A ResNet-50 with torchvision's random initialisation (Table 2's first row), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive(seed, "random-encoder"))
        return encoder_of(torchvision.models.resnet50(weights=None))


def baselines(params) -> dict[str, tuple[nn.Module, str]]:
    """Encoders probed beside the trained one, by name: (encoder, digest for the feature cache)."""
    if not params.transfer.baselines:
        return {}
    chosen = {"random-init": (random_encoder(params.seed), f"random-init:{params.seed}")}
    for name, loaded in reference_models(params).items():
        chosen[name] = (encoder_of(loaded.model), file_sha256(params.evaluate.reference_models[name]))
    return chosen


def headline(result: dict) -> dict:
    """metrics/transfer.json: per dataset the paper's number (top-1, and mean per-class accuracy where
    that is the dataset's headline), the averages, and each baseline's averages. Probe details
    (C, kind, counts, splits) and the baselines' per-dataset scores go to the details file."""
    out: dict = {}
    for name, m in result.items():
        if isinstance(m, dict) and "top1" in m:
            out[name] = {"top1": m["top1"], **({"mean_per_class": m["mean_per_class"]}
                                               if m.get("headline") == "mean_per_class" else {})}
    out.update({key: result[key] for key, _ in AVERAGES if result.get(key) is not None})
    baselines = {model: {key: m[key] for key, _ in AVERAGES if m.get(key) is not None}
                 for model, m in result.get("baselines", {}).items()}
    if any(baselines.values()):
        out["baselines"] = baselines
    return out


def run(params, model_path: Path, metrics_path: Path, plot_path: Path, cache_dir: Path | None = None,
        details_path: Path | None = None) -> dict:
    """The stage; features are cached in `cache_dir`, by default `transfer.work_dir/features`. Writes
    `headline` to `metrics_path` and everything to `details_path`; returns everything."""
    cache_dir = cache_dir or writable_dir(f"profiles.{params.profile}.transfer.work_dir", params.transfer.work_dir,
                                          params.transfer.work_dir / "features")
    datasets, skipped = transfer_sets.validate(params)
    apart = cog.validate_all(params)
    skipped += [name for name in cog.APART if name not in apart]
    datasets = {**datasets, **apart}
    loaded = load_checkpoint(model_path)
    device = device_module.resolve(params.transfer.device, f"profiles.{params.profile}.transfer.device")
    others = baselines(params) if datasets else {}    # loaded (and checked) before any feature is computed
    if datasets:
        metrics = probe_all(encoder_of(loaded.model), file_sha256(model_path), datasets, params, cache_dir, device)
        if others:
            metrics["baselines"] = {name: probe_all(encoder, digest, datasets, params, cache_dir, device)
                                    for name, (encoder, digest) in others.items()}
    else:
        metrics = {"average_top1": None, "cog_average_top1": None,
                   "note": f"no transfer dataset configured (profiles.{params.profile}.transfer.datasets "
                           f"and .cog)"}
        print(metrics["note"])
    # Over the datasets configured: comparable with the paper's Avg. only when it is all ten.
    metrics["average_datasets"] = len(groups(datasets)[0])
    why = {**dict.fromkeys(cog.NAMES, "ImageNet-CoG not configured (transfer.cog: '')"),
           cog.IN1K: "transfer.in1k: false"}
    for name in skipped:
        metrics[name] = {"skipped": why.get(name, "root not configured ('')")}
    write_json(metrics_path, headline(metrics))
    if details_path is not None:
        write_json(details_path, metrics)
    # The plot's y axis is dataset: baseline rows name their model there too (as eval-imagenet's
    # reference rows do), so their bars do not land on the trained model's.
    rows = [[n, "trained", metrics[n]["top1"]] for n in datasets]
    rows += [[f"{n} ({model})", model, m[n]["top1"]] for model, m in metrics.get("baselines", {}).items()
             for n in datasets]
    write_tsv(plot_path, ["dataset", "model", "top1"], rows)
    print(summary_table(metrics, list(datasets), skipped))
    return metrics


def summary_table(metrics: dict, names: list[str], skipped: list[str]) -> str:
    lines = [f"{'dataset':<24} {'top1':>7} {'mean/cls':>8} {'C':>7} {'classes':>7} {'train':>7} {'val':>7} "
             f"{'test':>7}"]
    for n in names:
        m = metrics[n]
        lines.append(f"{n:<24} {m['top1']:>7.2f} {m['mean_per_class']:>8.2f} {m['C']:>7g} "
                     f"{m['classes']:>7} {m['train_images']:>7} {m['val_images']:>7} {m['test_images']:>7}")
    lines += [f"{n:<24} skipped: {metrics[n]['skipped']}" for n in skipped]
    for (key, label), group in zip(AVERAGES, groups(names)):
        if metrics.get(key) is not None:
            lines.append(f"{label:<24} {metrics[key]:>7.2f}  (top-1 over {len(group)} datasets)")
    for model, m in metrics.get("baselines", {}).items():
        tops = "  ".join(f"{n} {m[n]['top1']:.2f}" for n in names)
        means = "; ".join(f"{label} {m[key]:.2f}" for key, label in AVERAGES if m[key] is not None)
        lines.append(f"baseline {model}: {tops}; {means}")
    return "\n".join(lines)
