"""Stable Diffusion -> the synthetic ImageNet clone, as tar shards (the paper's Sec. 4).

How many images: images per class = round(real images of the class x `scale`),
at least 1 (the paper keeps ImageNet's class sizes). Real counts come from the
configured real train folder; without one (and for free-form classes) every
class counts as 1300, ImageNet-1k's largest and most common class size.

Which image: every (class, image index) has its own seed,
`seeds.derive(seed, "image", class, index)`, and its own torch generator. A
flagged image that the safety policy regenerates gets `.., "attempt", n)`.

Shard layout: shard k holds image indices [k*b, (k+1)*b) of every class, b =
images_per_shard // classes, round-robin (index 0 of every class, then 1, ...),
so every shard mixes classes and shard k holds the same images at any `scale`
that gives every class at least (k+1)*b images. Shard k is built by one process
in fixed batches, so its bytes do not depend on the number of processes, the
order or restarts. They do depend, at float-rounding level, on the batch size
and thread count: PyTorch's CPU and GPU kernels (conv, small matmuls) are not
batch-invariant, so the same seed gives the same picture with a rare pixel one
grey level off (measured in tests/test_generation.py).

Work folder: finished shards live in `work_dir/<key>/`, keyed by everything that
decides the images (model and its weights' fingerprint, resolution, dtype, device type, scheduler, guidance,
steps, seed, safety policy, JPEG settings, class prompts, backgrounds, b), not by
`scale`, batch size or process count. A shard counts as finished when its
manifest (written after it) matches its size and sha256. A killed run resumes
from there; a scale-up rebuilds only shards whose image set grew and copies the
images they already had; the DVC output `data/synthetic` is then filled with
hard links (or copies) of the shards, so DVC may delete and restore it freely.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from . import backgrounds, data, distributed, estimates, sd_model, seeds, shards
from .device import resolve
from .errors import UserError
from .io import replacing, write_json
from .params import Params, require_dir, writable_dir
from .prompts import BACKGROUND_SLOT, ClassPrompt

FALLBACK_REAL_COUNT = 1300      # ImageNet-1k's largest (and most common) class size
MAX_ATTEMPTS = 4                # safety_checker: regenerate tries 3 new seeds, then keeps the image flagged
RECIPE_FILE = "recipe.json"


@dataclass(frozen=True, slots=True)      # slots: a paper-size plan has 1.3M items
class Item:
    """One image to generate."""
    cls: ClassPrompt
    image_index: int
    prompt: str

    @property
    def key(self) -> str:
        return shards.sample_key(self.cls.key, self.image_index)

    def seed(self, global_seed: int, attempt: int = 0) -> int:
        if attempt == 0:
            return seeds.derive(global_seed, "image", self.cls.key, self.image_index)
        return seeds.derive(global_seed, "image", self.cls.key, self.image_index, "attempt", attempt)


@dataclass(frozen=True)
class Shard:
    number: int
    items: tuple[Item, ...]

    @property
    def name(self) -> str:
        return shards.SHARD_PATTERN.format(self.number)

    @property
    def keys(self) -> list[str]:
        return [it.key for it in self.items]

    @property
    def file_name(self) -> str:
        """Name in the work folder: the content tag keeps shard k of different scales apart."""
        tag = hashlib.sha256("\n".join(self.keys).encode()).hexdigest()[:10]
        return f"{Path(self.name).stem}.{tag}.tar"


# --------------------------------------------------------------------------- how many, which

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


def prompt_for(row: ClassPrompt, image_index: int, phrases: list[str]) -> str:
    if BACKGROUND_SLOT not in row.prompt:
        return row.text()
    return row.text(phrases[backgrounds.scene_for(row.key, image_index, len(phrases))])


def layout(rows: list[ClassPrompt], counts: dict[str, int], phrases: list[str], per_class: int) -> list[Shard]:
    """Shard k: image indices [k*per_class, (k+1)*per_class) of every class, round-robin in logit order."""
    ordered = sorted(rows, key=lambda r: r.index)
    result = []
    for k in range(math.ceil(max(counts.values(), default=0) / per_class)):
        items = tuple(Item(cls=r, image_index=i, prompt=prompt_for(r, i, phrases))
                      for i in range(k * per_class, (k + 1) * per_class)
                      for r in ordered if i < counts[r.key])
        result.append(Shard(number=k, items=items))
    return result


# --------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Everything decided before a single image is drawn."""
    rows: list[ClassPrompt]
    counts: dict[str, int]
    shards: list[Shard]
    recipe: dict
    folder: Path            # work_dir/<key>
    device: object          # torch.device
    dtype: object           # torch.dtype

    @property
    def images(self) -> int:
        return sum(self.counts.values())

    def path(self, shard: Shard) -> Path:
        return self.folder / shard.file_name


def recipe(params: Params, rows: list[ClassPrompt], phrases: list[str], device, dtype, per_class: int) -> dict:
    """What decides the images, and nothing else: the work folder's key."""
    g = params.generate
    uses_backgrounds = any(BACKGROUND_SLOT in r.prompt for r in rows)
    return {
        "model": g.model, "weights": sd_model.fingerprint(g.model, f"profiles.{params.profile}.generate.model"),
        "resolution": g.resolution, "dtype": sd_model.dtype_name(dtype),
        "device": device.type, "scheduler": params.scheduler, "guidance": params.guidance,
        "steps": params.steps, "seed": params.seed, "safety_checker": params.safety_checker,
        "jpeg_quality": g.jpeg_quality, "stored_size": g.stored_size, "images_per_class_per_shard": per_class,
        "classes": [asdict(r) for r in sorted(rows, key=lambda r: r.index)],
        "backgrounds": phrases if uses_backgrounds else None,
    }


def work_key(recipe_: dict) -> str:
    return hashlib.sha256(json.dumps(recipe_, sort_keys=True).encode()).hexdigest()[:16]


def make_plan(params: Params, rows: list[ClassPrompt], phrases: list[str]) -> Plan:
    """Counts, shards and work folder; checks the train folder, device, dtype and that the model exists."""
    g, key = params.generate, f"profiles.{params.profile}.generate"
    if not rows:
        raise UserError("the prompt table is empty; run the wordnet-prompts stage (dvc repro wordnet-prompts)")
    device = resolve(g.device, f"{key}.device")
    dtype = sd_model.resolve_dtype(g.dtype, device, f"{key}.dtype")
    counts = images_per_class(real_counts(rows, params.data.train, params.profile), params.scale)
    per_class = max(1, g.images_per_shard // len(rows))
    recipe_ = recipe(params, rows, phrases, device, dtype, per_class)
    return Plan(rows=rows, counts=counts, shards=layout(rows, counts, phrases, per_class), recipe=recipe_,
                folder=g.work_dir / work_key(recipe_), device=device, dtype=dtype)


def check(params: Params, plan: Plan) -> None:
    """What can fail before the first image, checked in the launching process: the work folder."""
    writable_dir(f"profiles.{params.profile}.generate.work_dir", params.generate.work_dir, plan.folder)


# --------------------------------------------------------------------------- drawing a shard

def encode(image: Image.Image, quality: int, size: int | None) -> bytes:
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    buffer = BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def record(item: Item, attempt: int, flagged: bool, params: Params) -> dict:
    """The JSON stored beside each image in its shard."""
    return {"wnid": item.cls.wnid, "class": item.cls.key, "label": item.cls.index,
            "image_index": item.image_index, "prompt": item.prompt, "seed": item.seed(params.seed, attempt),
            "attempt": attempt, "guidance": params.guidance, "steps": params.steps,
            "scheduler": params.scheduler, "model": params.generate.model,
            "resolution": params.generate.resolution, "flagged": flagged}


def render(pipe, items: list[Item], params: Params, on_done=lambda n: None) -> dict[str, tuple[bytes, dict]]:
    """key -> (JPEG, record) for every item, drawn `batch_size` at a time in the given order.

    With safety_checker: regenerate, a flagged image is queued again with its next
    attempt's seed; after MAX_ATTEMPTS it is kept, black and flagged.
    """
    g = params.generate
    queue = [(item, 0) for item in items]
    done: dict[str, tuple[bytes, dict]] = {}
    start = 0
    while start < len(queue):
        batch = queue[start:start + g.batch_size]
        start += len(batch)
        images, flags = sd_model.draw(pipe, [it.prompt for it, _ in batch],
                                      [it.seed(params.seed, attempt) for it, attempt in batch],
                                      guidance=params.guidance, steps=params.steps, resolution=g.resolution)
        finished = 0
        for (item, attempt), image, flagged in zip(batch, images, flags):
            if flagged and params.safety_checker == "regenerate" and attempt + 1 < MAX_ATTEMPTS:
                queue.append((item, attempt + 1))
                continue
            done[item.key] = (encode(image, g.jpeg_quality, g.stored_size), record(item, attempt, flagged, params))
            finished += 1
        on_done(finished)
    return done


def reusable(plan: Plan, shard: Shard) -> dict[str, tuple[bytes, dict]]:
    """Images of `shard` already made by another version of it (another scale) in the work folder."""
    wanted, found = set(shard.keys), {}
    for other in sorted(plan.folder.glob(f"{Path(shard.name).stem}.*.tar")):
        if other.name == shard.file_name or not shards.is_finished(other):
            continue
        for key, jpeg, rec in shards.iter_shard(other):
            if key in wanted and rec is not None:
                found[key] = (jpeg, rec)
    return found


def remove_stale_temporaries(plan: Plan, shard: Shard) -> None:
    """Temporary files of this shard left by killed processes (their pid is gone)."""
    for tmp in plan.folder.glob(f".{Path(shard.file_name).stem}.*.tmp"):
        try:
            pid = int(tmp.name.split(".")[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass        # not ours to judge: a foreign name, or a live process of another user


def build_shard(pipe, plan: Plan, shard: Shard, params: Params, on_done=lambda n: None) -> dict:
    """Make `shard` in the work folder (reusing what other versions hold); return its manifest."""
    remove_stale_temporaries(plan, shard)
    have = reusable(plan, shard)
    on_done(len(have))
    todo = [it for it in shard.items if it.key not in have]
    started = time.perf_counter()
    made = render(pipe, todo, params, on_done) if todo else {}
    seconds = time.perf_counter() - started
    samples = [(it.key, *(have.get(it.key) or made[it.key])) for it in shard.items]
    path = plan.path(shard)
    size, sha256 = shards.write_shard(path, samples)
    records = [rec for _, _, rec in samples]
    manifest = {"keys": shard.keys, "bytes": size, "sha256": sha256,
                "images": len(samples), "generated": len(made), "reused": len(have),
                "flagged": sum(r["flagged"] for r in records), "regenerated": sum(r["attempt"] > 0 for r in records),
                "seconds": round(seconds, 3), "batch_size": params.generate.batch_size,
                "device": str(plan.device)}
    shards.write_manifest(path, manifest)
    return manifest


# --------------------------------------------------------------------------- the whole job

class Progress:
    """The main process's bar over every image still to make, its own and (polled) the other ranks'."""

    def __init__(self, ctx: distributed.Context, plan: Plan, todo: list[Shard], mine: list[Shard]):
        self.plan, self.own = plan, 0
        self.others = [s for s in todo if s not in mine] if ctx.main else []
        self.others_done: set[int] = set()
        self.bar = tqdm(total=sum(len(s.items) for s in todo), unit="img", desc="sd-generate",
                        dynamic_ncols=True, disable=not ctx.main or not todo)

    def add(self, n: int) -> None:
        self.own += n
        for s in self.others:
            if s.number not in self.others_done and shards.manifest_path(self.plan.path(s)).exists():
                self.others_done.add(s.number)
        others = sum(len(s.items) for s in self.others if s.number in self.others_done)
        self.bar.update(self.own + others - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def generate(params: Params, plan: Plan, out_dir: Path, metrics_path: Path) -> dict | None:
    """Make every unfinished shard (this rank's share), then on the main rank publish and measure.

    Returns the metrics on the main rank, None on the others.
    """
    ctx = distributed.start()
    try:
        if ctx.main:
            plan.folder.mkdir(parents=True, exist_ok=True)
            write_json(plan.folder / RECIPE_FILE, plan.recipe)
        # Every rank checks its slice of the shards; then all agree on what is left and split that.
        unfinished = [s.number for s in plan.shards[ctx.rank::ctx.world]
                      if not shards.is_finished(plan.path(s), s.keys)]
        todo = [plan.shards[n] for n in sorted(n for part in ctx.all_gather(unfinished) for n in part)]
        mine = todo[ctx.rank::ctx.world]
        if ctx.main:
            print(f"sd-generate: {len(plan.shards) - len(todo)} of {len(plan.shards)} shards already finished "
                  f"in {plan.folder}; {len(todo)} to make on {ctx.world} process(es)", file=sys.stderr)
        stats = {"generated": 0, "seconds": 0.0, "load_seconds": 0.0}
        if mine:
            started = time.perf_counter()
            pipe = sd_model.load_pipeline(
                params.generate.model, ctx.device(plan.device), plan.dtype, scheduler=params.scheduler,
                safety_checker=params.safety_checker != "none", key=f"profiles.{params.profile}.generate.model")
            stats["load_seconds"] = time.perf_counter() - started
            if ctx.main:
                warn_truncated(pipe, plan)
            progress = Progress(ctx, plan, todo, mine)
            started = time.perf_counter()
            for shard in mine:
                stats["generated"] += build_shard(pipe, plan, shard, params, progress.add)["generated"]
            stats["seconds"] = time.perf_counter() - started
            progress.close()
        everyone = ctx.all_gather(stats)      # also the barrier: every shard is finished after it
        if not ctx.main:
            return None
        index = publish(plan, params, out_dir)
        metrics = measure(index, everyone)
        write_json(metrics_path, metrics)
        return metrics
    finally:
        distributed.stop()


def warn_truncated(pipe, plan: Plan, shards_checked: int = 3) -> None:
    """One line saying how many classes' prompts the text encoder truncates (checked on the first shards)."""
    checked = [it for s in plan.shards[:shards_checked] for it in s.items]
    too_long = set(sd_model.truncated_prompts(pipe, sorted({it.prompt for it in checked})))
    over = sorted({it.cls.key for it in checked if it.prompt in too_long})
    if over:
        limit = pipe.tokenizer.model_max_length
        print(f"note: prompts of {len(over)} of {len(plan.rows)} classes are longer than the text encoder's {limit} "
              f"tokens and get truncated, as in Stable Diffusion (e.g. {over[0]})", file=sys.stderr)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no disk; across file systems, a copy (written under a temporary name)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        with replacing(target) as tmp:
            shutil.copyfile(source, tmp)


def clear_outputs(out_dir: Path) -> None:
    """Remove shards and index of an earlier run, so no stale shard is read with the new ones."""
    for path in list(out_dir.glob("shard-*.tar")) + list(out_dir.glob(".shard-*.tmp")):
        path.unlink()
    (out_dir / shards.INDEX_FILE).unlink(missing_ok=True)


def publish(plan: Plan, params: Params, out_dir: Path) -> dict:
    """Fill `out_dir` with the finished shards under their plain names, and write index.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_outputs(out_dir)
    listed, flagged, regenerated = [], 0, 0
    for shard in plan.shards:
        manifest = shards.read_manifest(plan.path(shard))
        link_or_copy(plan.path(shard), out_dir / shard.name)
        listed.append({"file": shard.name, "images": manifest["images"], "bytes": manifest["bytes"],
                       "sha256": manifest["sha256"]})
        flagged += manifest["flagged"]
        regenerated += manifest["regenerated"]
    ordered = sorted(plan.rows, key=lambda r: r.index)
    index = {
        "classes": [r.key for r in ordered],
        "wnids": [r.wnid for r in ordered],
        "counts": {r.key: plan.counts[r.key] for r in ordered},
        "images": plan.images,
        "shards": listed,
        "bytes": sum(s["bytes"] for s in listed),
        "flagged": flagged,
        "safety_regenerated": regenerated,
        "work_key": plan.folder.name,      # not the path: the output must not depend on who made it
        "scale": params.scale,
        "prompt": params.prompt,
        **{k: plan.recipe[k] for k in ("model", "resolution", "stored_size", "dtype", "scheduler", "guidance",
                                       "steps", "seed", "safety_checker", "jpeg_quality")},
    }
    write_json(out_dir / shards.INDEX_FILE, index)
    return index


def measure(index: dict, stats: list[dict]) -> dict:
    """metrics/generate.json: the dataset, and what this run cost."""
    counts = list(index["counts"].values())
    generated = sum(s["generated"] for s in stats)
    wall = max(s["seconds"] for s in stats)
    return {
        "images": index["images"],
        "generated": generated,
        "reused": index["images"] - generated,
        # Across all processes: images made per second of the slowest one.
        "images_per_second": round(generated / wall, 3) if generated and wall > 0 else None,
        "gpu_seconds": round(sum(s["seconds"] for s in stats), 2),
        "load_seconds": round(max(s["load_seconds"] for s in stats), 2),
        "processes": len(stats),
        "bytes": index["bytes"],
        "shards": len(index["shards"]),
        "flagged": index["flagged"],
        "safety_regenerated": index["safety_regenerated"],
        "per_class_min": min(counts),
        "per_class_max": max(counts),
        "classes": len(counts),
    }


# --------------------------------------------------------------------------- before any work: the estimate

def describe(params: Params, plan: Plan) -> list[str]:
    """The dry run: images, shards, disk and GPU-hours, from counts, finished shards and a FLOP count."""
    g = params.generate
    finished = [s for s in plan.shards if shards.is_finished(plan.path(s), s.keys, check_hash=False)]
    done = {s.number for s in finished}
    left = sum(len(s.items) for s in plan.shards if s.number not in done)
    counts = plan.counts.values()
    per_class = plan.recipe["images_per_class_per_shard"]
    manifests = [shards.read_manifest(plan.path(s)) for s in finished]
    measured = sum(m["bytes"] for m in manifests) / max(1, sum(m["images"] for m in manifests))
    side = g.stored_size or g.resolution
    per_image = measured if manifests else estimates.jpeg_bytes_per_image(side * side, g.jpeg_quality)
    how = "measured on the finished shards" if manifests else f"rough estimate for JPEG quality {g.jpeg_quality}"
    lines = [
        f"images: {plan.images:,} of {len(plan.rows)} classes ({min(counts)} to {max(counts)} a class = "
        f"real x scale {params.scale:g}), {side} px JPEG",
        f"shards: {len(plan.shards):,} of up to {per_class * len(plan.rows):,} images ({per_class} a class); "
        f"{len(finished)} already finished in {plan.folder}",
        f"to make: {left:,} images on {g.processes} process(es), batch {g.batch_size}, "
        f"{sd_model.dtype_name(plan.dtype)} on {plan.device.type}",
        f"disk: {estimates.human_bytes(plan.images * per_image)} in all "
        f"({estimates.human_bytes(per_image)} an image, {how}); the DVC cache adds a copy unless "
        f"cache.type is hardlink/reflink",
    ]
    flops = count_flops(params)
    lines.append(f"compute: {flops.per_image / 1e12:.3g} TFLOP an image ({flops.unet_calls} UNet calls of "
                 f"{flops.unet_call / 1e12:.3g} TFLOP + VAE decode {flops.vae_decode / 1e12:.3g})")
    for name, hours in estimates.gpu_hours(left, flops.per_image).items():
        lines.append(f"GPU-hours left: {hours:,.3g} at {name}")
    rate = [(m["generated"], m["seconds"]) for m in manifests if m["generated"]]
    if rate:
        per_second = sum(n for n, _ in rate) / sum(t for _, t in rate)
        lines.append(f"GPU-hours left at the rate measured in this work folder ({per_second:.3g} img/s a process): "
                     f"{left / per_second / 3600:,.2f}")
    return lines


def count_flops(params: Params) -> estimates.Flops:
    g, key = params.generate, f"profiles.{params.profile}.generate.model"
    source = sd_model.locate(g.model, key)
    offline = not Path(source).is_dir() and sd_model.offline()
    try:
        scheduler = sd_model.scheduler_for(params.scheduler, sd_model.scheduler_config(source, offline))
        return estimates.count_flops(source, g.resolution, params.steps, params.guidance, scheduler=scheduler,
                                     local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise sd_model.not_found(g.model, key, " ".join(str(exc).split())[:160]) from None
