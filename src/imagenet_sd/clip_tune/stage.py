"""He et al.'s classifier tuning (the clip-tune stage): a linear head on a frozen CLIP image
encoder, initialised from CLIP's class-name text embeddings (the zero-shot classifier) and tuned
on the synthetic images, plus the K real images a class in the few-shot setting (`shots` > 0).

Inputs: the synthetic shards and the kept set clip-filter wrote, the K-shot table of the
few-shot stage, eval-imagenet's test sets and the transfer datasets. The image features come
from the frozen tower, cached per shard (module features); the zero-shot head is built from the
classes' CLIP texts (prompts.clip_texts: `clip_class_names`, `clip_templates`) and tuned with He et al.'s recipe
(module tuning); both heads are scored on the test sets, and zero-shot CLIP on the transfer
datasets (module scoring). The head after the last epoch is scored: no checkpoint is picked on
a test set. Held-out synthetic images (index < holdout_per_class) are not trained on; the tuned
head's top-1 on them is logged every epoch, as train-resnet50 does.

The work itself is module classifier's, imported only when tuning runs.

Outputs: metrics/clip.json, reports/clip.json and the per-epoch curve reports/clip.tsv; with
`clip_tune: false` the metrics are {"skipped": true} and no model is loaded.

Docs (what He et al.'s code does, where this differs and why): docs/he2023.md#clip-classifier-tuning
"""
from __future__ import annotations

from pathlib import Path

from imagenet_sd.core.io import write_json, write_tsv
from imagenet_sd.core.params import Params

HEADS = ("zero_shot", "tuned")
CURVE = ("epoch", "loss", "lr", "holdout_top1", "val_top1")


def headline(details: dict) -> dict:
    """metrics/clip.json: each head's top-1 per test set and the zero-shot transfer average."""
    if details.get("skipped"):
        return {"skipped": True}
    out = {head: {name: {"top1": m["top1"]} for name, m in details[head].items() if m.get("top1") is not None}
           for head in HEADS}
    if details["transfer_zero_shot"].get("average_top1") is not None:
        out["zero_shot"]["transfer"] = {"average_top1": details["transfer_zero_shot"]["average_top1"]}
    return out


def run(params: Params, prompts_path: Path, shards_dir: Path, kept_dir: Path, shots_path: Path,
        metrics_path: Path, details_path: Path, plot_path: Path) -> dict:
    """The clip-tune stage: metrics, details and the per-epoch curve; returns the details."""
    if not params.clip_tune:
        details = {"skipped": "clip_tune: false"}
        curve: list[dict] = []
    else:
        # Imported only to tune: a skipped run (every queued Sariyildiz et al. row) writes its metrics
        # without importing torch and the CLIP stack, about 4 s of a process.
        from imagenet_sd.clip_tune import classifier
        details = classifier.tune(params, prompts_path, shards_dir, kept_dir, shots_path)
        curve = details["training"]["history"]
    write_json(metrics_path, headline(details))
    write_json(details_path, details)
    columns = [c for c in CURVE if not curve or c in curve[0]]
    write_tsv(plot_path, columns, [[row[c] for c in columns] for row in curve])
    return details
