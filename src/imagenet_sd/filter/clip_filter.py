"""CLIP filtering of the synthetic images (the clip-filter stage), after He et al., "Is synthetic
data from generative models ready for image recognition?" (ICLR 2023).

A CLIP model (transformers' CLIPModel, module models.clip_model) scores every synthetic image
against one direction per class: its name (CLIP's curated ImageNet name, or the first WordNet
lemma: `clip_class_names`) in the stage's templates (`clip_templates`; He et al.'s one "a photo
of a {c}."), several templates averaged (`class_directions`; module prompts.clip_texts).
An image's scores are the softmax over all the classes of
logit_scale x cosine similarity, taken at its own class, and CLIP's top-1 class. `rule:
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
precision, the library versions and `code_identity()`, not the rule, threshold or count: a
change of those reads the cached scores and runs no model.

Docs (what He et al.'s code does, where this differs and why): docs/he2023.md#clip-filtering
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from imagenet_sd.core import seeds
from imagenet_sd.core.device import resolve
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import replacing, write_json
from imagenet_sd.core.params import Params, writable_dir
from imagenet_sd.datasets import kept, shards
from imagenet_sd.datasets.shards import read_index
from imagenet_sd.filter.base import Decision, Filter, summary, targets
from imagenet_sd.models import clip_model
from imagenet_sd.models.clip_model import Clip
from imagenet_sd.prompts import clip_texts, prompts

NAME = "clip"                  # params.yaml `filter: clip` (filter/registry.py)
RECIPE_FILE = "recipe.json"
TEXT_BATCH = 256


def _autocast(device: torch.device):
    # fp16 on a GPU: ViT-B/32 in fp16 runs at tensor-core speed; CPUs have no fast fp16 kernels.
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


@torch.inference_mode()
def text_features(clip: Clip, texts: list[str], device: torch.device) -> torch.Tensor:
    """Unit-length projected text embeddings, one row a text, float32."""
    rows = []
    for start in range(0, len(texts), TEXT_BATCH):
        tokens = clip.tokenizer(texts[start:start + TEXT_BATCH], padding=True, truncation=True,
                                max_length=clip.tokenizer.model_max_length, return_tensors="pt").to(device)
        with _autocast(device):
            pooled = clip.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
            rows.append(clip.model.text_projection(pooled).float())
    return F.normalize(torch.cat(rows), dim=-1)


@torch.inference_mode()
def score_batch(clip: Clip, pixels: torch.Tensor, texts: torch.Tensor,
                labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(probability of the own class, CLIP's top-1 class) of each image: softmax over all classes
    of logit_scale x cosine similarity, as CLIP's zero-shot classifier (and He et al.) compute it."""
    with _autocast(texts.device):
        pooled = clip.model.vision_model(pixel_values=pixels.to(texts.device)).pooler_output
        image = F.normalize(clip.model.visual_projection(pooled).float(), dim=-1)
    probability = (clip.model.logit_scale.exp().float() * image @ texts.T).softmax(dim=-1)
    own = probability.gather(1, labels.to(texts.device)[:, None])[:, 0]
    return own.cpu().numpy().astype(np.float32), probability.argmax(dim=-1).cpu().numpy().astype(np.int32)


def class_directions(clip: Clip, names: list[str], templates: tuple[str, ...],
                     device: torch.device) -> torch.Tensor:
    """One unit row a class: the mean of its templates' unit text embeddings, made unit again
    (CLIP's prompt ensembling, He et al.'s zero-shot classifier; one template: its embedding).
    float32, on the CPU."""
    texts = [template.format(name) for name in names for template in templates]
    embedded = text_features(clip, texts, device).reshape(len(names), len(templates), -1)
    return F.normalize(embedded.mean(dim=1), dim=-1).cpu()


# --------------------------------------------------------------------------- reading the shards

def input_size(processor) -> int:
    """The largest side the image processor resizes or crops to (0: unknown)."""
    sides = [sizes.get(name) for sizes in (getattr(processor, "size", None), getattr(processor, "crop_size", None))
             if sizes is not None for name in ("shortest_edge", "height", "width")]
    return max((side for side in sides if isinstance(side, int)), default=0)


def _decode(jpeg: bytes, side: int) -> Image.Image | None:
    """The image, decoded by JPEG's DCT scaling at 1/2, 1/4 or 1/8 when that stays at least `side`
    a side (PIL's draft): less work than a full decode, and a smaller image to resize (measured
    in README "CLIP filtering")."""
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            if side:
                image.draft("RGB", (side, side))
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


class ShardImages(IterableDataset):
    """The images of the given shards, preprocessed for CLIP in the loader workers, as batches
    of one shard (whole shards go to worker i mod workers). Each batch is a dict: shard file,
    labels, image indices, pixels, the (labels, indices) of images that do not decode, and
    `last` on a shard's final batch. A record that is not an image of the class set (bad
    JSON, wrong label) is passed over, as training passes it over."""

    def __init__(self, paths: list[Path], keys: list[str], processor, batch_size: int):
        self.paths, self.keys, self.processor, self.batch_size = paths, keys, processor, batch_size
        self.side = input_size(processor)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for path in self.paths[worker::workers]:
            try:
                yield from self._batches(path)
            except (tarfile.TarError, OSError) as exc:
                # Handed to the main process as data: an exception raised in a worker comes back as a traceback.
                yield {"file": path.name, "error": f"{type(exc).__name__}: {exc}"}

    def _identify(self, record: dict | None) -> tuple[int, int] | None:
        if not isinstance(record, dict):
            return None
        label, index = record.get("label"), record.get("image_index")
        if (isinstance(label, int) and 0 <= label < len(self.keys) and self.keys[label] == record.get("class")
                and isinstance(index, int) and index >= 0):
            return label, index
        return None

    def _batches(self, path: Path):
        images, ids, bad = [], [], []
        for _, jpeg, record in shards.iter_shard(path):
            identified = self._identify(record)
            if identified is None:
                continue
            image = _decode(jpeg, self.side)
            if image is None:
                bad.append(identified)
                continue
            images.append(image)
            ids.append(identified)
            if len(images) == self.batch_size:
                yield self._batch(path, images, ids, bad, last=False)
                images, ids, bad = [], [], []
        yield self._batch(path, images, ids, bad, last=True)

    def _batch(self, path: Path, images, ids, bad, last: bool) -> dict:
        pixels = (self.processor(images=images, return_tensors="pt")["pixel_values"] if images
                  else torch.zeros(0))
        return {"file": path.name, "ids": torch.tensor(ids, dtype=torch.int64).reshape(-1, 2), "pixels": pixels,
                "bad": torch.tensor(bad, dtype=torch.int64).reshape(-1, 2), "last": last}


# --------------------------------------------------------------------------- the score cache

def code_identity() -> str:
    """The functions that decide a score (not the whole module: its reporting may change freely)."""
    functions = (text_features, score_batch, input_size, _decode, ShardImages, class_directions)
    return hashlib.sha256("".join(inspect.getsource(f) for f in functions).encode()).hexdigest()[:16]


def scores_recipe(model: str, fingerprint: str, names: list[str], templates: tuple[str, ...],
                  device: torch.device) -> dict:
    """What decides the scores, and nothing else (not the rule, threshold, batch size or workers)."""
    return {"model": model, "weights": fingerprint, "names": names, "templates": list(templates), "device": device.type,
            "precision": clip_model.precision(device), "libraries": clip_model.library_versions(), "code": code_identity()}


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
    dataset = ShardImages([shards_dir / entry["file"] for entry in todo], keys, clip.processor, fp.batch_size)
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
            probability, top1 = score_batch(clip, batch["pixels"], texts, batch["ids"][:, 0])
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
    """Apply the rule and the count to the cached scores of every shard of `index`; no model involved.

    Each class keeps its target (`targets`) out of its training images: when more pass the rule, a
    random target's worth of the passing ones (the lowest `seeds.ranks` under the seed and the
    class, so the choice does not depend on the order of shards); when fewer pass, every passing one
    and, with `keep: per_class`, the most confident failing ones (own-class probability, then image
    index) up to the target, as He et al.'s selection. Memory: 6 bytes an image (pass bit, confidence).
    """
    starts = kept.offsets(index)
    counts = np.diff(starts)
    holdout, total = index.get("holdout_per_class", 0), int(starts[-1])
    ok = np.zeros(total, dtype=bool)
    confidence = np.full(total, -np.inf, dtype=np.float32)     # not scored or not decoded: least confident
    for entry in index["shards"]:
        scores = load_scores(scores_file(folder, entry))
        labels, indices = scores["labels"].astype(np.int64), scores["indices"]
        inside = indices < counts[labels]      # images of this index only; anything else the loader judges
        positions = starts[labels[inside]] + indices[inside]
        ok[positions] = passes(scores, rule, threshold)[inside]
        confidence[positions] = np.nan_to_num(scores["own"][inside], nan=-np.inf)
    wanted = targets(index)
    per_shard = index["images_per_class_per_shard"]
    chosen = np.zeros(total, dtype=bool)
    stats = np.zeros((4, len(counts)), dtype=np.int64)          # scored, passed, kept, topped up
    dropped_per_shard = np.zeros(len(index["shards"]), dtype=np.int64)
    holdout_would_drop = 0
    for c, key in enumerate(index["classes"]):
        first, held = int(starts[c]), min(holdout, int(counts[c]))
        holdout_would_drop += int((~ok[first:first + held]).sum())
        chosen[first:first + held] = True        # held-out images are never filtered (module kept)
        candidates = np.arange(first + held, int(starts[c + 1]))
        passing = candidates[ok[candidates]]
        n = int(wanted[c])
        if len(passing) > n:
            take = passing[np.argsort(seeds.ranks(seeds.derive(seed, "clip-filter keep", key), passing - first),
                                      kind="stable")[:n]]
        elif len(passing) < n and keep == "per_class":
            failing = candidates[~ok[candidates]]
            order = np.argsort(-confidence[failing], kind="stable")     # ties: lower image index first
            take = np.concatenate([passing, failing[order[:n - len(passing)]]])
        else:
            take = passing
        chosen[take] = True
        left_out = candidates[~chosen[candidates]] - first
        dropped_per_shard += np.bincount(left_out // per_shard, minlength=len(dropped_per_shard))
        stats[:, c] = len(candidates), len(passing), len(take), int((~ok[take]).sum())
    return Decision(chosen, *stats, {entry["file"]: int(n) for entry, n in zip(index["shards"], dropped_per_shard) if n},
                    holdout_would_drop)


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
        directions = class_directions(clip, names, templates, device).to(device)
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
    return {"filter": NAME, "model": fp.model, **how, **texts_used, **totals,
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
