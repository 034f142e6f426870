"""Stable Diffusion -> the synthetic ImageNet clone, as tar shards (the paper's Sec. 4).

How many images: images per class = round(real images of the class x `scale`),
at least 1 (the paper's dataset scale is relative to ImageNet's own class sizes).
Real counts come from the configured real train folder. Without one (and for
free-form classes, which have no real folder) every class counts as 1300 real
images, ImageNet-1k's largest class size, which most of its classes have.

Which images: every (class, image index) gets its own seed
`seeds.derive(seed, "image", class key, image index)` and its own torch
generator, so an image does not depend on batch size, batch composition,
image order or which other classes are generated (up to float rounding of the
batched kernels, which can move a few pixels by one grey level). Items are
ordered round-robin (image 0 of every class, then image 1, ...) so that every
shard mixes classes and the first shards hold a sample of every class.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from tqdm import tqdm

from . import backgrounds, data, seeds, shards
from .device import resolve
from .errors import UserError
from .io import write_json
from .params import Params, require_dir
from .prompts import BACKGROUND_SLOT, ClassPrompt

FALLBACK_REAL_COUNT = 1300      # ImageNet-1k's largest (and most common) class size
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)      # slots: a paper-size plan has 1.3M items
class Item:
    """One image to generate."""
    cls: ClassPrompt
    image_index: int
    seed: int
    prompt: str

    @property
    def key(self) -> str:
        return shards.sample_key(self.cls.key, self.image_index)


# --------------------------------------------------------------------------- model

def dtype_for(device: torch.device) -> torch.dtype:
    """fp16 halves memory and time on a GPU; CPUs have no fast fp16 kernels."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _offline() -> bool:
    # Read the environment at call time as well: huggingface_hub reads it once, at import.
    from huggingface_hub import constants
    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return (len(parts) == 2 and all(parts) and not model.startswith((".", "~"))
            and all(c.isalnum() or c in "-_." for part in parts for c in part))


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _not_found(model: str, key: str, reason: str) -> UserError:
    from huggingface_hub.constants import HF_HUB_CACHE
    hint, default = "", embedded_default()
    if Path(model) == default:
        hint = f"; the embedded default is built by: python -m imagenet_sd.embedded {default}"
    return UserError(
        f"{key} = {model!r}: model not found ({reason}); looked for the local folder "
        f"{str(Path(model).expanduser().resolve())!r} and in the Hugging Face cache {HF_HUB_CACHE!r}; "
        f"download it into the cache (hf download {model}) or set {key} to a local folder{hint}")


def _not_a_pipeline(folder: Path, key: str, reason: str) -> UserError:
    return UserError(
        f"{key} = {str(folder)!r}: not a complete Stable Diffusion pipeline folder ({reason}); "
        f"fill it with StableDiffusionPipeline.save_pretrained, or set {key} to another folder or a Hugging Face id")


def embedded_default() -> Path:
    from .embedded import DEFAULT_DIR
    return DEFAULT_DIR


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype,
                  key: str = "profiles.<profile>.generate.model"):
    """A StableDiffusionPipeline from a local folder, or else from a Hugging Face id via its cache.

    The tiny embedded model and real SD v1.4 load through this same call. Offline
    mode (HF_HUB_OFFLINE=1) only looks in the cache, so a missing model fails at once.
    """
    from diffusers import StableDiffusionPipeline
    local = Path(model).expanduser()
    if not local.is_dir() and not _looks_like_hub_id(model):
        raise _not_found(model, key, "no such folder, and not a Hugging Face id")
    options = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if importlib.util.find_spec("accelerate") is None:
        options["low_cpu_mem_usage"] = False     # what diffusers falls back to anyway, minus its warning
    if not local.is_dir() and _offline():
        options["local_files_only"] = True
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(local) if local.is_dir() else model, **options)
    except (OSError, ValueError) as exc:
        # diffusers and huggingface_hub report a missing or incomplete model as OSError
        # (EnvironmentError) subclasses or ValueError.
        if local.is_dir():
            raise _not_a_pipeline(local, key, _reason(exc)) from None
        raise _not_found(model, key, _reason(exc)) from None
    pipe.set_progress_bar_config(disable=True)   # one bar over images instead, in `render`
    return pipe.to(device)


# --------------------------------------------------------------------------- plan

def real_counts(rows: list[ClassPrompt], train_root: Path | None, profile: str) -> dict[str, int]:
    """Real images per class: from the real train folder, or the fallback (see module doc)."""
    key = f"profiles.{profile}.data.train"
    if train_root is None:
        print(f"warning: {key} is not configured; counting {FALLBACK_REAL_COUNT} real images per class "
              "(ImageNet's maximum) for images per class = real x scale", file=sys.stderr)
        return {r.key: FALLBACK_REAL_COUNT for r in rows}
    found = data.image_files(require_dir(key, train_root))
    counts = {}
    for r in rows:
        if not r.wnid:
            counts[r.key] = FALLBACK_REAL_COUNT
        elif r.wnid in found:
            counts[r.key] = len(found[r.wnid])
        else:
            raise UserError(f"{key} = {str(train_root)!r} has no images of class {r.wnid} ({r.c.split(',')[0]}); "
                            f"add its folder {train_root / r.wnid} or set {key} to '' to use "
                            f"{FALLBACK_REAL_COUNT} per class")
    free_form = sum(1 for r in rows if not r.wnid)
    if free_form:
        print(f"warning: {free_form} free-form classes have no real folder; counting {FALLBACK_REAL_COUNT} "
              "real images for each", file=sys.stderr)
    return counts


def images_per_class(real: dict[str, int], scale: float) -> dict[str, int]:
    # floor(x + 0.5), not round(): Python's round() sends halves to even (2.5 -> 2).
    return {k: max(1, math.floor(n * scale + 0.5)) for k, n in real.items()}


def plan(rows: list[ClassPrompt], counts: dict[str, int], seed: int, phrases: list[str]) -> list[Item]:
    """Every image to generate, round-robin over classes in logit order."""
    ordered = sorted(rows, key=lambda r: r.index)
    items = []
    for i in range(max(counts.values(), default=0)):
        for r in ordered:
            if i < counts[r.key]:
                items.append(Item(cls=r, image_index=i, seed=seeds.derive(seed, "image", r.key, i),
                                  prompt=_prompt(r, i, phrases)))
    return items


def _prompt(row: ClassPrompt, image_index: int, phrases: list[str]) -> str:
    if BACKGROUND_SLOT not in row.prompt:
        return row.text()
    return row.text(phrases[backgrounds.scene_for(row.key, image_index, len(phrases))])


# --------------------------------------------------------------------------- generation

def render(pipe, items: list[Item], *, batch_size: int, guidance: float, steps: int,
           resolution: int, progress: tqdm | None = None) -> Iterator[tuple[Item, Image.Image, bool]]:
    """(item, PIL image, flagged) for every item, in order, generated `batch_size` at a time."""
    from diffusers.utils import logging as diffusers_logging
    # The pipeline warns about truncated prompts once per batch; `warn_truncated` says it once.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            out = pipe(prompt=[it.prompt for it in batch], height=resolution, width=resolution,
                       num_inference_steps=steps, guidance_scale=guidance, output_type="pil",
                       # CPU generators: the same starting noise on every device.
                       generator=[torch.Generator("cpu").manual_seed(it.seed) for it in batch])
            flags = getattr(out, "nsfw_content_detected", None) or [False] * len(batch)
            for item, image, flagged in zip(batch, out.images, flags):
                yield item, image, bool(flagged)
            if progress is not None:
                progress.update(len(batch))
    finally:
        diffusers_logging.set_verbosity(verbosity)


def warn_truncated(pipe, items: list[Item], sample: int = 3) -> None:
    """One line saying how many classes' prompts the text encoder truncates (checked on a few images each)."""
    limit = pipe.tokenizer.model_max_length
    checked = [it for it in items if it.image_index < sample]
    over = sorted({it.cls.key for it in checked if len(pipe.tokenizer(it.prompt, verbose=False).input_ids) > limit})
    if over:
        classes = len({it.cls.key for it in checked})
        print(f"note: prompts of {len(over)} of {classes} classes are longer than the text encoder's {limit} "
              f"tokens and get truncated, as in Stable Diffusion (e.g. {over[0]})", file=sys.stderr)


def record(item: Item, flagged: bool, params: Params) -> dict:
    """The JSON stored beside each image in its shard."""
    return {"wnid": item.cls.wnid, "class": item.cls.key, "label": item.cls.index,
            "image_index": item.image_index, "prompt": item.prompt, "seed": item.seed,
            "guidance": params.guidance, "steps": params.steps, "model": params.generate.model,
            "flagged": flagged}


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def clear_outputs(out_dir: Path) -> None:
    """Remove shards and index of an earlier run, so no stale shard is read with the new ones."""
    for path in list(out_dir.glob("shard-*.tar")) + list(out_dir.glob(".shard-*.tar.tmp")):
        path.unlink()
    (out_dir / shards.INDEX_FILE).unlink(missing_ok=True)


@dataclass
class Prepared:
    """Everything checked and loaded before any output is touched."""
    rows: list[ClassPrompt]
    counts: dict[str, int]
    items: list[Item]
    pipe: object
    load_seconds: float


def prepare(params: Params, rows: list[ClassPrompt], phrases: list[str]) -> Prepared:
    counts = images_per_class(real_counts(rows, params.data.train, params.profile), params.scale)
    items = plan(rows, counts, params.seed, phrases)
    key = f"profiles.{params.profile}.generate"
    device = resolve(params.generate.device, f"{key}.device")
    started = time.perf_counter()
    pipe = load_pipeline(params.generate.model, device, dtype_for(device), key=f"{key}.model")
    return Prepared(rows, counts, items, pipe, time.perf_counter() - started)


def generate(params: Params, prepared: Prepared, out_dir: Path, metrics_path: Path) -> dict:
    """Generate every planned image into shards in `out_dir`; write index.json and the metrics."""
    g = params.generate
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_outputs(out_dir)
    warn_truncated(prepared.pipe, prepared.items)
    shard_log, samples, flagged = [], [], 0

    def flush() -> None:
        name = shards.SHARD_PATTERN.format(len(shard_log))
        shard_log.append({"file": name, "images": len(samples),
                          "bytes": shards.write_shard(out_dir / name, samples)})
        samples.clear()

    started = time.perf_counter()
    with tqdm(total=len(prepared.items), unit="img", desc="sd-generate", dynamic_ncols=True) as bar:
        for item, image, is_flagged in render(prepared.pipe, prepared.items, batch_size=g.batch_size,
                                              guidance=params.guidance, steps=params.steps,
                                              resolution=g.resolution, progress=bar):
            samples.append((item.key, jpeg(image, g.jpeg_quality), record(item, is_flagged, params)))
            flagged += is_flagged
            if len(samples) == g.images_per_shard:
                flush()
        if samples:
            flush()
    seconds = time.perf_counter() - started
    index = _index(params, prepared, shard_log, flagged)
    write_json(out_dir / shards.INDEX_FILE, index)
    metrics = _metrics(index, seconds, prepared.load_seconds)
    write_json(metrics_path, metrics)
    return metrics


def _index(params: Params, prepared: Prepared, shard_log: list[dict], flagged: int) -> dict:
    ordered = sorted(prepared.rows, key=lambda r: r.index)
    return {
        "classes": [r.key for r in ordered],
        "wnids": [r.wnid for r in ordered],
        "counts": {r.key: prepared.counts[r.key] for r in ordered},
        "images": len(prepared.items),
        "shards": shard_log,
        "bytes": sum(s["bytes"] for s in shard_log),
        "flagged": flagged,
        "resolution": params.generate.resolution,
        "model": params.generate.model,
        "guidance": params.guidance,
        "steps": params.steps,
        "seed": params.seed,
        "scale": params.scale,
        "prompt": params.prompt,
    }


def _metrics(index: dict, seconds: float, load_seconds: float) -> dict:
    counts = list(index["counts"].values())
    return {
        "images": index["images"],
        "images_per_second": round(index["images"] / seconds, 3) if seconds > 0 else None,
        "seconds": round(seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "bytes": index["bytes"],
        "shards": len(index["shards"]),
        "flagged": index["flagged"],
        "per_class_min": min(counts),
        "per_class_max": max(counts),
        "classes": len(counts),
    }
