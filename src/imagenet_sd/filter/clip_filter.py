"""CLIP filtering of the synthetic images (the clip-filter stage), after He et al., "Is synthetic
data from generative models ready for image recognition?" (ICLR 2023).

A CLIP model (transformers' CLIPModel or an OpenCLIP model such as He et al.'s RN50, module
models.clip_model) scores every synthetic image
against one direction per class: its name (CLIP's curated ImageNet name, or the first WordNet
lemma: `clip_class_names`) in the stage's templates (`clip_templates`; He et al.'s one "a photo
of a {c}."), several templates averaged (`clip_model.class_directions`; module prompts.clip_texts).
An image's scores are the softmax over all the classes of
logit_scale x cosine similarity, taken at its own class, and CLIP's top-1 class
(`clip_model.score_batch`, on the shards' images as datasets.shard_images reads them). `rule:
threshold` keeps an image whose own-class probability is strictly above `threshold` (`chance` =
1 / classes, He et al.'s rule); `rule: top1` keeps one whose own class is CLIP's first choice.
Each class then keeps its real x scale target (`decide`): with `keep: per_class` exactly that,
passing images first and the most confident failing ones when too few pass (He et al.'s
selection); with `keep: passing` only passing ones. sd-generate over-generates for it
(`filter.overgenerate`; index.json's `train_targets`). Held-out images are always kept, and
`holdout_would_drop` counts those the rule fails. The result is the kept set (module datasets.kept).

Scores (8 bytes an image) are cached per shard as `work_dir/<key>/<shard sha256>.npz`, written
atomically when the shard is done, so a killed run resumes and experiments share them. The key
(`scores_recipe`) hashes the weights' fingerprint, the class names and templates, the device type and
precision, the library versions and `code_identity()` (the source of the functions above, in
models/clip_model.py and datasets/shard_images.py; for an OpenCLIP model also its backend's,
`clip_model.backend_key`), not the rule, threshold or count: a change of those reads the cached
scores and runs no model. reports/filter.json names the CLIP it ran (`backbone`: model, backend, weights).

Docs (what He et al.'s code does, where this differs and why): docs/he2023.md#clip-filtering
"""
from __future__ import annotations

import hashlib
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from imagenet_sd.core.device import resolve
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import replacing, write_json
from imagenet_sd.core.params import Params, writable_dir
from imagenet_sd.datasets import kept, shard_images, shards
from imagenet_sd.datasets.shards import read_index
from imagenet_sd.filter.base import Decision, Filter, choose, summary
from imagenet_sd.models import clip_model
from imagenet_sd.models.clip_model import Clip
from imagenet_sd.prompts import clip_texts, prompts

NAME = "clip"                  # params.yaml `filter: clip` (filter/registry.py)
RECIPE_FILE = "recipe.json"


# --------------------------------------------------------------------------- the score cache

def code_identity() -> str:
    """The functions that decide a score (not the whole module: its reporting may change freely)."""
    functions = (clip_model.text_features, clip_model.score_batch, shard_images.input_size, shard_images._decode,
                 shard_images.ShardImages, clip_model.class_directions)
    return hashlib.sha256("".join(inspect.getsource(f) for f in functions).encode()).hexdigest()[:16]


def scores_recipe(model: str, fingerprint: str, names: list[str], templates: tuple[str, ...],
                  device: torch.device) -> dict:
    """What decides the scores, and nothing else (not the rule, threshold, batch size or workers)."""
    return {"model": model, "weights": fingerprint, "names": names, "templates": list(templates), "device": device.type,
            "precision": clip_model.precision(device), "libraries": clip_model.library_versions(model), "code": code_identity(),
            **clip_model.backend_key(model)}


def scores_folder(params: Params, recipe: dict) -> Path:
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    fp = params.filtering
    return writable_dir(f"profiles.{params.profile}.filter.work_dir", fp.work_dir, fp.work_dir / key)


def scores_file(folder: Path, shard_entry: dict) -> Path:
    """Named by the shard's sha256: the same bytes (in any experiment or work folder) share their scores."""
    return folder / f"{shard_entry['sha256']}.npz"


def save_scores(path: Path, ids: list[np.ndarray], own: list[np.ndarray], best: list[np.ndarray]) -> None:
    ids_ = np.concatenate(ids) if ids else np.zeros((0, 2), np.int64)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, labels=ids_[:, 0].astype(np.int32), indices=ids_[:, 1].astype(np.int64),
                 own=np.concatenate(own) if own else np.zeros(0, np.float32),
                 best=np.concatenate(best) if best else np.zeros(0, np.int32))


def load_scores(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as stored:
        return {name: stored[name] for name in ("labels", "indices", "own", "best")}


def score_shards(params: Params, clip: Clip, texts: torch.Tensor, keys: list[str], todo: list[dict],
                 shards_dir: Path, folder: Path, device: torch.device) -> tuple[int, float]:
    """Score every shard of `todo` (index.json entries) into `folder`; (images scored, seconds)."""
    fp = params.filtering
    dataset = shard_images.ShardImages([shards_dir / entry["file"] for entry in todo], keys, clip.processor, fp.batch_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=fp.workers, pin_memory=device.type == "cuda")
    entries = {entry["file"]: entry for entry in todo}
    pending: dict[str, tuple[list, list, list]] = {}
    bar = tqdm(total=sum(entry["images"] for entry in todo), unit="img", desc="clip-filter", dynamic_ncols=True,
               smoothing=0.05)
    scored, started = 0, time.perf_counter()
    for batch in loader:
        if "error" in batch:
            raise UserError(f"{shards_dir / batch['file']}: unreadable tar shard ({batch['error'][:120]}); "
                            "re-hash the shards and redo broken ones: python stages/sd_generate.py --verify")
        ids, own, best = pending.setdefault(batch["file"], ([], [], []))
        if len(batch["ids"]):
            probability, top1 = clip_model.score_batch(clip, batch["pixels"], texts, batch["ids"][:, 0])
            ids.append(batch["ids"].numpy())
            own.append(probability)
            best.append(top1)
        if len(batch["bad"]):          # undecodable: scored as never confident, so dropped
            ids.append(batch["bad"].numpy())
            own.append(np.full(len(batch["bad"]), np.nan, np.float32))
            best.append(np.full(len(batch["bad"]), -1, np.int32))
        done = len(batch["ids"]) + len(batch["bad"])
        scored += done
        bar.update(done)
        if batch["last"]:
            save_scores(scores_file(folder, entries[batch["file"]]), *pending.pop(batch["file"]))
    bar.close()
    return scored, time.perf_counter() - started


# --------------------------------------------------------------------------- the rule

def resolved_threshold(params: Params, classes: int) -> float:
    """The probability an image's own class needs under rule threshold: `chance` is 1 / classes."""
    threshold = params.filtering.threshold
    return 1.0 / classes if threshold is None else threshold


def passes(scores: dict[str, np.ndarray], rule: str, threshold: float) -> np.ndarray:
    """Whether each scored image passes the rule (an image that did not decode never does)."""
    if rule == "top1":
        return scores["best"] == scores["labels"]
    with np.errstate(invalid="ignore"):
        return scores["own"] > threshold         # strictly above, as He et al.; NaN is never above


def decide(index: dict, folder: Path, rule: str, threshold: float, keep: str = "per_class", seed: int = 0) -> Decision:
    """Apply the rule to the cached scores of every shard of `index` (no model involved), then each
    class's choice (`base.choose`, under the seed's "clip-filter keep" draw). Memory: 6 bytes an image
    (pass bit, confidence)."""
    starts = kept.offsets(index)
    counts = np.diff(starts)
    total = int(starts[-1])
    ok = np.zeros(total, dtype=bool)
    confidence = np.full(total, -np.inf, dtype=np.float32)     # not scored or not decoded: least confident
    for entry in index["shards"]:
        scores = load_scores(scores_file(folder, entry))
        labels, indices = scores["labels"].astype(np.int64), scores["indices"]
        inside = indices < counts[labels]      # images of this index only; anything else the loader judges
        positions = starts[labels[inside]] + indices[inside]
        ok[positions] = passes(scores, rule, threshold)[inside]
        confidence[positions] = np.nan_to_num(scores["own"][inside], nan=-np.inf)
    return choose(index, ok, confidence, keep, seed, "clip-filter keep")


# --------------------------------------------------------------------------- the filter

def run(params: Params, prompts_path: Path, shards_dir: Path, out_dir: Path) -> dict:
    """Score, decide and write the kept set in `out_dir`; the details (base.summary's keys, rule, speed)."""
    index = read_index(shards_dir)
    fp, key = params.filtering, f"profiles.{params.profile}.filter"
    rows = prompts.read(prompts_path)
    keys = [r.key for r in sorted(rows, key=lambda r: r.index)]
    if index["classes"] != keys:
        raise UserError(f"{shards_dir / shards.INDEX_FILE}: the shards hold {len(index['classes'])} classes that do "
                        f"not match the prompt table ({len(keys)} classes); regenerate: dvc repro sd-generate")
    device = resolve(fp.device, f"{key}.device")
    names = clip_texts.names(rows, params.clip_class_names)
    templates = clip_texts.templates(params.clip_templates, "filter")
    recipe = scores_recipe(fp.model, clip_model.weights(fp.model, f"{key}.model"), names, templates, device)
    folder = scores_folder(params, recipe)
    write_json(folder / RECIPE_FILE, recipe)
    done = {entry.name for entry in folder.iterdir() if entry.suffix == ".npz"}   # one listing, at any scale
    todo = [entry for entry in index["shards"] if scores_file(folder, entry).name not in done]
    print(f"clip-filter: {len(index['shards']) - len(todo)} of {len(index['shards'])} shards already scored in "
          f"{folder}; {len(todo)} to score", file=sys.stderr)
    scored, seconds = 0, 0.0
    if todo:
        clip = clip_model.load(fp.model, f"{key}.model", device)
        directions = clip_model.class_directions(clip, names, templates, device).to(device)
        scored, seconds = score_shards(params, clip, directions, keys, todo, shards_dir, folder, device)
    texts_used = {"class_names": params.clip_class_names, "templates": list(templates)}
    threshold = resolved_threshold(params, len(keys))
    decision = decide(index, folder, fp.rule, threshold, fp.keep, params.seed)
    totals = summary(index, decision)
    how = {"rule": fp.rule, "threshold": threshold if fp.rule == "threshold" else None, "keep": fp.keep,
           "overgenerate": index.get("overgenerate", 0), "seed": params.seed}
    kept.write(out_dir, shards_dir, decision.keep, {
        "filter": NAME, "model": fp.model, "weights": recipe["weights"], **texts_used, **how,
        "holdout_per_class": index.get("holdout_per_class", 0),
        "kept": totals["kept"], "dropped": totals["dropped"], "dropped_per_shard": decision.dropped_per_shard})
    if fp.keep == "per_class" and totals["candidates"] == totals["targets"]:
        print(f"warning: filter.keep = per_class keeps every image when nothing is over-generated (the shards "
              f"hold exactly real x scale a class); set profiles.{params.profile}.filter.overgenerate > 0 "
              "(He et al.: 1.5)", file=sys.stderr)
    if totals["empty_classes"]:
        print(f"warning: clip-filter leaves {totals['empty_classes']} of {len(keys)} classes without a training image "
              f"(e.g. {totals['empty_class_keys'][0]}); train-resnet50 learns nothing of them", file=sys.stderr)
    return {"filter": NAME, "model": fp.model, "backbone": clip_model.backbone(fp.model, recipe["weights"]),
            **how, **texts_used, **totals,
            "holdout_would_drop": decision.holdout_would_drop, "scored": scored,
            "reused_shards": len(index["shards"]) - len(todo), "seconds": round(seconds, 2),
            "images_per_second": round(scored / seconds, 1) if scored and seconds > 0 else None,
            "scores": folder.name}


def protocol(run_params: dict) -> list[str]:
    """The report's protocol parts of a run with `filter: clip`: the count it keeps and CLIP's texts.
    A key a run predates reads as what the code did then: every passing image kept, WordNet names."""
    block = (run_params.get("profiles") or {}).get(run_params.get("profile"), {}) or {}
    filtering = block.get("filter") or {}
    return [f"CLIP filter keeps {filtering.get('keep', 'passing')}, "
            f"over-generates {filtering.get('overgenerate', 0):g}",
            f"CLIP names {run_params.get('clip_class_names', 'wordnet')}, "
            f"templates {run_params.get('clip_templates', 'he2023')}"]


FILTER = Filter(name=NAME, run=run, device=lambda params: params.filtering.device, protocol=protocol)
