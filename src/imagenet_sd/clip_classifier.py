"""He et al.'s classifier tuning (the clip-tune stage): a linear head on a frozen CLIP image
encoder, initialised from CLIP's class-name text embeddings (the zero-shot classifier) and tuned
on the synthetic images, plus the K real images a class in the few-shot setting.

He et al., "Is synthetic data from generative models ready for image recognition?" (ICLR 2023).
What their code does, read for the facts (github.com/CVMI-Lab/SyntheticData at commit 062ac23,
`src/classifier-tuning/`: `src/ct_zsl.py`, `src/ct_fsl.py`, `src/models/finetune.py`,
`src/models/zeroshot.py`, `src/models/modeling.py`, `src/models/utils.py`, `src/args.py`, and
the two commands of their README's "Classifier-Tuning with CLIP" sections):

- encoder: OpenAI's CLIP, `--model RN50` or `ViT-B/16`, frozen (`--freeze-encoder`); the
  images' embeddings are computed once, without augmentation (Resize 224 bicubic, CenterCrop
  224, CLIP's mean and std: CLIP's own preprocessing), and cached;
- head: a linear layer on the unit-length image embedding whose weights are the zero-shot
  classifier, logit_scale x the unit mean of the class's unit text embeddings over a
  template list (`--template`; prompt ensembling), bias 0, both trained. Their README shows
  the command for EuroSAT only; the ImageNet list among their per-dataset ones
  (`src/templates/transfer_ds_template.py`) is `imagenet_template`, CLIP's 7-template
  ensemble, TEMPLATES here (WiSE-FT's 80-template `openai_imagenet_template`, which their
  code base also has, is the other candidate);
- loss on synthetic images: soft_label x soft cross-entropy against the zero-shot head's
  softmax at temperature T (a frozen copy of the initial head; only the teacher is divided
  by T) + (1 - soft_label) x cross-entropy with the label; `--sl 0.5 --sl_T 2`;
- optimiser: AdamW (betas 0.9, 0.999, eps 1e-8), weight decay 0.1, gradient norm clipped at
  1.0, lr cosine from its peak to 0 over every step, updated before each step, no warm-up
  (`--warmup_length 0`); 30 epochs; zero-shot: lr 2e-3, batch 512;
- few-shot (`ct_fsl.py`): every step takes one synthetic batch and one real batch (the real
  loader reshuffled at each epoch and whenever it runs out) and adds the real batch's
  cross-entropy (weight 1.0, no soft label) to the synthetic loss (weight 1.0); lr 1e-3;
  `--batch-size-syn 512 --batch-size-real 32`, an epoch being one pass over the synthetic images.

Where this module differs, and why:

- Model: transformers' CLIPModel (module clip_filter's loading path and library); RN50 exists
  in no transformers format, so the paper profile uses openai/clip-vit-base-patch16, their
  ViT-B/16.
- Class names: the class's first WordNet lemma (clip_filter.class_name), which exists for any
  class set, not CLIP's hand-edited ImageNet names: the zero-shot accuracy is lower than
  with CLIP's names, for both heads alike.
- Their few-shot code extracts features with loaders of 512 and 32 images but trains on
  feature loaders of `--batch-size` (128, not set by the command) for both, while its cosine
  runs over epochs x (synthetic images / 512) steps: lr goes back up after a quarter of the
  run. Here the batches are the command's 512 + 32 and the cosine spans the steps taken.
- They evaluate after every epoch and keep the checkpoint best on the test set; here the
  head after the last epoch is scored, and the per-epoch IN val top-1 is a curve only.
- Held-out synthetic images (index < holdout_per_class) are not trained on; the tuned head's
  top-1 on them is logged every epoch, as train-resnet50 does.

Cost and scale. CLIP's image embeddings of the synthetic images are cached per shard in
`clip_classifier.work_dir/<key>/shards/<shard sha256>.npz` (fp16), the key hashing the weights,
the image processor, device type and precision, library versions and the code that computes
them, not the classes, the filter or the recipe: a re-run, another experiment on the same
shards, or a change of recipe, filter or few-shot set runs no image through CLIP. A shard's
file is written when the shard is done, so a killed run resumes. Real images (test sets, K-shot
sets, transfer test splits) are cached per set, keyed by their paths, sizes and labels
(transfer.cache_key). Training streams the shards' features a buffer of BUFFER_IMAGES at a
time in a seeded order, so memory does not grow with the dataset.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import clip_filter, data, evaluation, fewshot, kept, probes, prompts, seeds, transfer, transfer_datasets
from .device import resolve
from .errors import UserError
from .inference import forward_batches, loader
from .io import replacing, write_json, write_tsv
from .params import Params, writable_dir
from .publish import read_index
from .transfer_datasets import Split

# CLIP's 7-template ImageNet ensemble, He et al.'s `imagenet_template` (module doc: why this one).
TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
             "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
# He et al.'s template of each transfer dataset (transfer_ds_template.py), by this project's dataset names.
TRANSFER_TEMPLATES = {
    "aircraft": ("a photo of a {}, a type of aircraft.",),
    "cars": ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
             "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}."),
    "dtd": ("{} texture.",),
    "eurosat": ("a centered satellite photo of {}.",),
    "flowers": ("a photo of a {}, a type of flower.",),
    "food": ("a photo of a {}, a type of food.",),
    "pets": ("a photo of a {}, a type of pet.",),
    "sun397": ("a photo of a {}.", "a photo of the {}."),
}
PLAIN_TEMPLATES = ("a photo of a {}.",)          # any other dataset (a folder of class folders)
# Datasets whose classes have no names to write a text from (torchvision lists iNaturalist's 2018
# and 2019 categories as numbered folders).
UNNAMED = ("inat2018", "inat2019")
GRADIENT_CLIP = 1.0
BETAS, EPS = (0.9, 0.999), 1e-8
BUFFER_IMAGES = 1 << 18       # synthetic features shuffled together: 256 MiB of fp16 512-d rows
EVAL_CHUNK = 8192
RECIPE_FILE = "recipe.json"
HEADS = ("zero_shot", "tuned")
CURVE = ("epoch", "loss", "lr", "holdout_top1", "val_top1")


# --------------------------------------------------------------------------- the zero-shot head

def class_directions(clip: clip_filter.Clip, names: list[str], templates: tuple[str, ...],
                     device: torch.device) -> torch.Tensor:
    """One unit row a class: the mean of its templates' unit text embeddings, made unit again
    (CLIP's prompt ensembling, He et al.'s zero-shot classifier). float32, on the CPU."""
    texts = [template.format(name) for name in names for template in templates]
    embedded = clip_filter.text_features(clip, texts, device).reshape(len(names), len(templates), -1)
    return F.normalize(embedded.mean(dim=1), dim=-1).cpu()


def zero_shot_head(directions: torch.Tensor, logit_scale: float) -> nn.Linear:
    """The linear head CLIP's zero-shot classifier is: weights logit_scale x directions, bias 0."""
    head = nn.Linear(directions.shape[1], directions.shape[0])
    with torch.no_grad():
        head.weight.copy_(logit_scale * directions)
        head.bias.zero_()
    return head


def logit_scale(clip: clip_filter.Clip) -> float:
    return float(clip.model.logit_scale.detach().exp())


# --------------------------------------------------------------------------- image features

class ImageTower(nn.Module):
    """CLIP's image embedding, unit length: what the head reads."""

    def __init__(self, clip: clip_filter.Clip):
        super().__init__()
        self.model = clip.model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # fp16 on a GPU (tensor cores); CPUs have no fast fp16 kernels.
        with torch.autocast(pixels.device.type, dtype=torch.float16, enabled=pixels.device.type == "cuda"):
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)


def threads_for(tower: ImageTower, batch_size: int):
    """probes.threads_for of a batch through the image tower (weights x images as its size): the
    embedded tiny CLIP's batches run 20x faster on one thread than on two busy cores (README)."""
    return probes.threads_for(batch_size * sum(w.numel() for w in tower.model.vision_model.parameters()))


class Preprocess:
    """CLIP's own image processor on one PIL image (He et al. extract with CLIP's preprocessing)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def code_identity() -> str:
    """The code that decides a feature (not the training or the reporting, which change freely)."""
    parts = (ImageTower, Preprocess, encode_shards, clip_filter.ShardImages, clip_filter._decode,
             clip_filter.input_size)
    return hashlib.sha256("".join(inspect.getsource(p) for p in parts).encode()).hexdigest()[:16]


def features_recipe(model: str, fingerprint: str, processor, device: torch.device) -> dict:
    """What decides the image features, and nothing else (no class, filter or training setting)."""
    return {"model": model, "weights": fingerprint, "processor": json.loads(processor.to_json_string()),
            "device": device.type, "precision": clip_filter.precision(device),
            "libraries": clip_filter.library_versions(), "code": code_identity()}


def features_folder(params: Params, recipe: dict) -> Path:
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    cp = params.clip_classifier
    folder = writable_dir(f"profiles.{params.profile}.clip_classifier.work_dir", cp.work_dir, cp.work_dir / key)
    write_json(folder / RECIPE_FILE, recipe)
    return folder


def shard_file(folder: Path, entry: dict) -> Path:
    """Named by the shard's sha256: the same bytes share their features in every experiment."""
    return folder / "shards" / f"{entry['sha256']}.npz"


def save_shard(path: Path, ids: list[np.ndarray], rows: list[np.ndarray], width: int) -> None:
    ids_ = np.concatenate(ids) if ids else np.zeros((0, 2), np.int64)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, labels=ids_[:, 0].astype(np.int32), indices=ids_[:, 1].astype(np.int64),
                 features=np.concatenate(rows) if rows else np.zeros((0, width), np.float16))


def encode_shards(tower: ImageTower, processor, keys: list[str], todo: list[dict], shards_dir: Path,
                  folder: Path, params: Params, device: torch.device) -> tuple[int, int, float]:
    """Image features of every shard of `todo` (index.json entries) into `folder`;
    (images encoded, images that do not decode, seconds)."""
    cp = params.clip_classifier
    dataset = clip_filter.ShardImages([shards_dir / e["file"] for e in todo], keys, processor, cp.encode_batch_size)
    batches = DataLoader(dataset, batch_size=None, num_workers=cp.workers, pin_memory=device.type == "cuda")
    entries = {e["file"]: e for e in todo}
    width = tower.model.visual_projection.out_features
    pending: dict[str, tuple[list, list]] = {}
    encoded = undecodable = 0
    bar = tqdm(total=sum(e["images"] for e in todo), unit="img", desc="clip-tune features", dynamic_ncols=True,
               smoothing=0.05)
    started = time.perf_counter()
    with torch.inference_mode(), threads_for(tower, cp.encode_batch_size):
        for batch in batches:
            if "error" in batch:
                raise UserError(f"{shards_dir / batch['file']}: unreadable tar shard ({batch['error'][:120]}); "
                                "re-hash the shards and redo broken ones: python stages/sd_generate.py --verify")
            ids, rows = pending.setdefault(batch["file"], ([], []))
            if len(batch["ids"]):
                ids.append(batch["ids"].numpy())
                rows.append(tower(batch["pixels"].to(device)).cpu().numpy().astype(np.float16))
            encoded, undecodable = encoded + len(batch["ids"]), undecodable + len(batch["bad"])
            bar.update(len(batch["ids"]) + len(batch["bad"]))
            if batch["last"]:
                save_shard(shard_file(folder, entries[batch["file"]]), *pending.pop(batch["file"]), width)
    bar.close()
    return encoded, undecodable, time.perf_counter() - started


def encode_images(tower: ImageTower, processor, samples: list[tuple[Path, int]], name: str, folder: Path,
                  params: Params, device: torch.device) -> tuple[np.ndarray, bool]:
    """Features of real images (float32, one row a sample), cached in `folder` under `name` and a key
    of the files (paths, sizes, labels); (features, whether they came from the cache)."""
    batch_size = params.clip_classifier.encode_batch_size

    def encode() -> np.ndarray:
        with threads_for(tower, batch_size):
            images = loader(samples, Preprocess(processor), batch_size, device)
            batches = forward_batches(tower, images, device, f"clip-tune {name}")
            return np.concatenate([out.numpy() for out, _ in batches])
    key = transfer.cache_key(folder.name, name, "images", "clip-processor", Split([], samples))
    return transfer.cached(folder / "images" / f"{name}-{key}.npz", encode)


# --------------------------------------------------------------------------- the training images

class SyntheticSet:
    """The synthetic images' cached features for training: held-out images (index <
    holdout_per_class) and images the filter dropped left out, streamed in a seeded order a
    buffer of BUFFER_IMAGES at a time (memory flat at any dataset size). The held-out images'
    features are kept apart (`holdout`), for the per-epoch curve."""

    def __init__(self, files: list[Path], holdout_per_class: int, kept_set: kept.KeptSet | None):
        self.files, self.holdout_per_class, self.kept = files, holdout_per_class, kept_set
        self.counts, held_x, held_y = [], [], []
        for path in files:
            with np.load(path, allow_pickle=False) as stored:   # lazy: features are read only where needed
                labels, indices = stored["labels"], stored["indices"]
                self.counts.append(int(self._training(labels, indices).sum()))
                held = indices < holdout_per_class
                if held.any():
                    held_x.append(stored["features"][held])
                    held_y.append(labels[held])
        self.holdout = (_tensor(np.concatenate(held_x)), torch.from_numpy(np.concatenate(held_y)).long()) \
            if held_x else None

    def __len__(self) -> int:
        return sum(self.counts)

    def _training(self, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
        train = indices >= self.holdout_per_class
        return train & self.kept.keeps_all(labels, indices) if self.kept is not None else train

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        with np.load(path, allow_pickle=False) as stored:
            train = self._training(stored["labels"], stored["indices"])
            return stored["features"][train], stored["labels"][train].astype(np.int64)

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch: shards in a seeded order, each buffer shuffled by its own seed; ceil(len / batch_size) batches."""
        order = np.random.default_rng(seeds.derive(seed, "clip-tune", "shards", epoch)).permutation(len(self.files))
        xs, ys, buffered, buffer = [], [], 0, 0
        for position, i in enumerate(order):
            if self.counts[i]:
                x, y = self._read(self.files[i])
                xs.append(x)
                ys.append(y)
                buffered += len(y)
            if buffered and (buffered >= BUFFER_IMAGES or position == len(order) - 1):
                x, y = np.concatenate(xs), np.concatenate(ys)
                rng = np.random.default_rng(seeds.derive(seed, "clip-tune", "buffer", epoch, buffer))
                mix = rng.permutation(len(y))
                x, y, buffer = x[mix], y[mix], buffer + 1
                whole = len(y) if position == len(order) - 1 else len(y) - len(y) % batch_size
                for start in range(0, whole, batch_size):
                    yield _tensor(x[start:start + batch_size]), torch.from_numpy(y[start:start + batch_size])
                xs, ys, buffered = [x[whole:]], [y[whole:]], len(y) - whole   # the rest opens the next buffer


def _tensor(features: np.ndarray) -> torch.Tensor:
    """float32 rows made unit again (stored in fp16)."""
    return F.normalize(torch.from_numpy(features).float(), dim=-1)


def real_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, epoch: int):
    """The K-shot images' features, one batch a step, reshuffled whenever they run out (He et al.'s reader)."""
    for rounds in itertools.count():
        order = torch.from_numpy(np.random.default_rng(
            seeds.derive(seed, "clip-tune", "real", epoch, rounds)).permutation(len(y)))
        for start in range(0, len(y), batch_size):
            chosen = order[start:start + batch_size]
            yield x[chosen], y[chosen]


# --------------------------------------------------------------------------- training

def soft_cross_entropy(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy against the teacher's softmax at `temperature` (the student's logits as they are)."""
    return -(teacher.div(temperature).softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def synthetic_loss(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, params: Params) -> torch.Tensor:
    cp = params.clip_classifier
    hard = F.cross_entropy(logits, labels)
    if not cp.soft_label:
        return hard
    return cp.soft_label * soft_cross_entropy(logits, teacher, cp.soft_label_temperature) + (1 - cp.soft_label) * hard


Monitor = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]   # features, labels, logit columns (None: all)


@torch.no_grad()
def top1(head: nn.Linear, monitor: Monitor, device: torch.device) -> float:
    x, y, columns = monitor
    hits = 0
    for start in range(0, len(y), EVAL_CHUNK):
        logits = head(x[start:start + EVAL_CHUNK].to(device)).cpu()
        logits = logits if columns is None else logits[:, columns]
        hits += int((logits.argmax(dim=1) == y[start:start + EVAL_CHUNK]).sum())
    return round(100.0 * hits / len(y), 2)


def train_head(head: nn.Linear, synthetic: SyntheticSet, real: tuple[torch.Tensor, torch.Tensor] | None,
               params: Params, device: torch.device, monitors: dict[str, Monitor]) -> list[dict]:
    """Tune `head` in place (He et al.'s recipe, module doc); returns one row an epoch: mean loss,
    last lr, and the top-1 of every monitor."""
    cp = params.clip_classifier
    lr = cp.few_shot_lr if real is not None else cp.lr
    head.to(device).train()
    teacher = copy.deepcopy(head).requires_grad_(False)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cp.weight_decay, betas=BETAS, eps=EPS)
    schedule = Schedule(lr, cp.epochs * math.ceil(len(synthetic) / cp.batch_size))
    history = []
    # A head on a CPU is small work a step: one thread (probes.threads_for says why).
    with probes.threads_for(cp.batch_size * head.in_features * head.out_features), \
            tqdm(total=schedule.total, unit="step", desc="clip-tune head", dynamic_ncols=True) as bar:
        for epoch in range(cp.epochs):
            reals = real_batches(*real, cp.real_batch_size, params.seed, epoch) if real is not None else None
            loss_sum, seen = 0.0, 0
            for x, y in synthetic.batches(epoch, cp.batch_size, params.seed):
                loss = step(head, teacher, optimizer, schedule, x.to(device), y.to(device), reals, params)
                loss_sum, seen = loss_sum + loss * len(y), seen + len(y)
                bar.update(1)
            if not math.isfinite(loss_sum):
                raise UserError(f"clip-tune: the loss is {loss_sum} at epoch {epoch + 1}; lower "
                                f"profiles.{params.profile}.clip_classifier.lr (and few_shot_lr)")
            history.append({"epoch": epoch + 1, "loss": round(loss_sum / seen, 6), "lr": float(f"{schedule.last:.6g}"),
                            **{f"{name}_top1": top1(head, m, device) for name, m in monitors.items()}})
    return history


@dataclass
class Schedule:
    """He et al.'s cosine_lr without warm-up, set before each step: peak at step 0, 0 after the last."""
    peak: float
    total: int
    done: int = 0
    last: float = 0.0

    def next(self) -> float:
        self.last = 0.5 * (1 + math.cos(math.pi * self.done / self.total)) * self.peak
        self.done += 1
        return self.last


def step(head: nn.Linear, teacher: nn.Linear, optimizer, schedule: Schedule, x: torch.Tensor, y: torch.Tensor,
         reals, params: Params) -> float:
    """One optimiser step on a synthetic batch (and the next real batch, few-shot); its loss."""
    for group in optimizer.param_groups:
        group["lr"] = schedule.next()
    loss = synthetic_loss(head(x), teacher(x), y, params)
    if reals is not None:
        real_x, real_y = next(reals)
        loss = loss + F.cross_entropy(head(real_x.to(x.device)), real_y.to(x.device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), GRADIENT_CLIP)
    optimizer.step()
    return loss.item()


# --------------------------------------------------------------------------- evaluation

@dataclass
class TestFeatures:
    """A test set's images (evaluation's plan: labels, logit columns) and their features."""
    plan: evaluation.EvalPlan
    features: torch.Tensor
    cached: bool


def encode_test_sets(scanned: dict[str, dict[str, list[Path]]], wnids: list[str], tower: ImageTower, processor,
              folder: Path, params: Params, device: torch.device) -> dict[str, TestFeatures]:
    """eval-imagenet's test sets (its discovery, labels and IN-R/IN-A class subsets), their images' features."""
    found = {}
    for name, by_wnid in scanned.items():
        plan = evaluation.plan(evaluation.TEST_SETS[name], by_wnid, wnids)
        if not plan.samples:
            print(f"clip-tune {name}: no images of the {len(wnids)} classes; nothing to score")
            continue
        features, hit = encode_images(tower, processor, plan.samples, name, folder, params, device)
        found[name] = TestFeatures(plan, torch.from_numpy(features), hit)
    return found


@torch.no_grad()
def score_head(head: nn.Linear, tests: dict[str, TestFeatures], device: torch.device) -> dict[str, dict]:
    """eval-imagenet's scores (evaluation.tally) of the head on every test set."""
    head.to(device).eval()

    def batches(test: TestFeatures):
        labels = torch.tensor([label for _, label in test.plan.samples])
        for start in range(0, len(labels), EVAL_CHUNK):
            yield head(test.features[start:start + EVAL_CHUNK].to(device)).cpu(), labels[start:start + EVAL_CHUNK]
    return {name: evaluation.tally(batches(test), test.plan) for name, test in tests.items()}


def monitor_of(test: TestFeatures) -> Monitor:
    return test.features, torch.tensor([label for _, label in test.plan.samples]), torch.tensor(test.plan.columns)


# --------------------------------------------------------------------------- transfer datasets

def readable(name: str) -> str:
    """A class folder or label as words: "apple_pie" -> "apple pie", "AnnualCrop" -> "Annual Crop"."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name.replace("_", " ")).strip()


def transfer_zero_shot(datasets: dict[str, transfer_datasets.TransferSet], clip: clip_filter.Clip,
                       tower: ImageTower, folder: Path, params: Params, device: torch.device) -> dict:
    """Zero-shot CLIP on each transfer dataset's test split, over its own class names. A head tuned on
    the synthetic images' classes does not apply to another label space, so there is no tuned row."""
    results = {}
    for name, dataset in datasets.items():
        if name in UNNAMED:
            results[name] = {"skipped": "its classes are numbered folders, with no names to write a text from"}
            continue
        test = dataset.splits["test"]
        templates = TRANSFER_TEMPLATES.get(name, PLAIN_TEMPLATES)
        directions = class_directions(clip, [readable(c) for c in test.classes], templates, device)
        features, _ = encode_images(tower, clip.processor, test.samples, f"transfer-{name}", folder, params, device)
        predicted = (torch.from_numpy(features) @ directions.T).argmax(dim=1).numpy()
        top1_, per_class = probes.accuracies(predicted, np.array([y for _, y in test.samples]))
        results[name] = {"top1": round(top1_, 2), "mean_per_class": round(per_class, 2),
                         "classes": len(test.classes), "test_images": len(test.samples), "templates": list(templates)}
    scored = [m["top1"] for m in results.values() if "top1" in m]
    results["average_top1"] = round(float(np.mean(scored)), 2) if scored else None
    return results


# --------------------------------------------------------------------------- the stage

def real_shots(params: Params, shots_path: Path, keys: list[str]) -> list[tuple[Path, int]]:
    """(path, label) of the K-shot images (shots.tsv of the few-shot stage, checked against `shots`)."""
    table = fewshot.load(shots_path, keys, params.shots)
    if params.shots and params.data.train is None:
        raise UserError(f"params.yaml: shots = {params.shots} needs profiles.{params.profile}.data.train, the "
                        "folder shots.tsv's paths are relative to; set it, or set shots: 0")
    return [(params.data.train / path, label) for label, key in enumerate(keys) for path in table.paths[key]]


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
        details = _tune(params, prompts_path, shards_dir, kept_dir, shots_path)
        curve = details["training"]["history"]
    write_json(metrics_path, headline(details))
    write_json(details_path, details)
    columns = [c for c in CURVE if not curve or c in curve[0]]
    write_tsv(plot_path, columns, [[row[c] for c in columns] for row in curve])
    return details


def _tune(params: Params, prompts_path: Path, shards_dir: Path, kept_dir: Path, shots_path: Path) -> dict:
    cp, key = params.clip_classifier, f"profiles.{params.profile}.clip_classifier"
    # Everything that can be wrong is checked before the model loads.
    rows = prompts.read(prompts_path)
    keys = data.class_keys(rows)
    ordered = sorted(rows, key=lambda r: r.index)
    index = read_index(shards_dir)
    data.check_index_classes(index, keys, shards_dir)
    kept_set = kept.read(kept_dir, shards_dir)
    shots = real_shots(params, shots_path, keys)
    scanned = evaluation.validate(params)
    datasets, transfer_skipped = transfer_datasets.validate(params)
    device = resolve(cp.device, f"{key}.device")
    fingerprint = clip_filter.weights(cp.model, f"{key}.model")

    clip = clip_filter.load(cp.model, f"{key}.model", device)
    tower = ImageTower(clip).eval()
    folder = features_folder(params, features_recipe(cp.model, fingerprint, clip.processor, device))
    (folder / "shards").mkdir(exist_ok=True)
    done = {entry.name for entry in (folder / "shards").iterdir()}        # one listing, at any scale
    todo = [e for e in index["shards"] if shard_file(folder, e).name not in done]
    print(f"clip-tune: {len(index['shards']) - len(todo)} of {len(index['shards'])} shards' features already in "
          f"{folder}; {len(todo)} to encode", file=sys.stderr)
    encoded, undecodable, seconds = encode_shards(tower, clip.processor, keys, todo, shards_dir, folder, params,
                                                  device) if todo else (0, 0, 0.0)

    synthetic = SyntheticSet([shard_file(folder, e) for e in index["shards"]], index.get("holdout_per_class", 0),
                             kept_set)
    if not len(synthetic):
        raise UserError(f"{shards_dir}: no synthetic training image left (all held out, dropped by the filter or "
                        "undecodable); generate more (scale) or loosen the filter")
    real = None
    if shots:
        real_x, _ = encode_images(tower, clip.processor, shots, "shots", folder, params, device)
        real = (torch.from_numpy(real_x), torch.tensor([label for _, label in shots]))
    tests = encode_test_sets(scanned, [r.wnid for r in ordered], tower, clip.processor, folder, params, device)

    head = zero_shot_head(class_directions(clip, [clip_filter.class_name(r) for r in ordered], TEMPLATES, device),
                          logit_scale(clip))
    zero_shot = copy.deepcopy(head)
    monitors: dict[str, Monitor] = {}
    if synthetic.holdout is not None:
        monitors["holdout"] = (*synthetic.holdout, None)
    if "val" in tests:
        monitors["val"] = monitor_of(tests["val"])
    started = time.perf_counter()
    history = train_head(head, synthetic, real, params, device, monitors)
    training_seconds = time.perf_counter() - started
    transfer_scores = transfer_zero_shot(datasets, clip, tower, folder, params, device)
    for name in transfer_skipped:
        transfer_scores[name] = {"skipped": "root not configured ('')"}

    details = {
        "model": cp.model, "weights": fingerprint, "templates": list(TEMPLATES), "setting": "few-shot" if real
        else "zero-shot", "shots": params.shots, "train_images": len(synthetic), "real_images": len(shots),
        "holdout_images": len(synthetic.holdout[1]) if synthetic.holdout else 0, "classes": len(keys),
        "zero_shot": score_head(zero_shot, tests, device), "tuned": score_head(head, tests, device),
        "transfer_zero_shot": transfer_scores,
        "skipped_test_sets": [n for n in evaluation.TEST_SETS if n not in tests],
        "features": {"folder": str(folder), "encoded": encoded, "undecodable": undecodable,
                     "reused_shards": len(index["shards"]) - len(todo), "seconds": round(seconds, 2),
                     "images_per_second": round(encoded / seconds, 1) if encoded and seconds > 0 else None,
                     "test_sets_from_cache": sorted(n for n, t in tests.items() if t.cached)},
        "training": {"epochs": cp.epochs, "steps": cp.epochs * math.ceil(len(synthetic) / cp.batch_size),
                     "lr": cp.few_shot_lr if real else cp.lr, "seconds": round(training_seconds, 2),
                     "history": history},
    }
    print(summary_table(details))
    return details


def summary_table(details: dict) -> str:
    lines = [f"{'test set':<10} {'zero-shot':>9} {'tuned':>9}"]
    for name, m in details["zero_shot"].items():
        tuned = details["tuned"][name]["top1"]
        lines.append(f"{name:<10} {_pct(m['top1']):>9} {_pct(tuned):>9}")
    for name, m in details["transfer_zero_shot"].items():
        if isinstance(m, dict) and "top1" in m:
            lines.append(f"{name:<10} {_pct(m['top1']):>9} {'-':>9}   (transfer, zero-shot only)")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
