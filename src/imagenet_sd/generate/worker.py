"""What each process of sd-generate does: draw its shards' images and write the shards.

A shard is drawn `batch_size` images at a time by the configured generator
(Stable Diffusion, or the rehearsal stand-in), JPEG-encoded, and written with its
records as one tar (shards.write_shard), then given its manifest. Images that an
older version of the shard already holds (another scale) are copied, not drawn.
Each shard is built under its file lock (module locks), so separate runs sharing
a work folder never write the same one. With real guidance (`init_strength` > 0) each
image starts from its real shot (`draw_batch`), and its record names it (`init_record`).
"""
from __future__ import annotations

import os
import time
from functools import cached_property
from io import BytesIO
from pathlib import Path

from PIL import Image

from imagenet_sd.core.locks import try_lock
from imagenet_sd.core.params import Params
from imagenet_sd.datasets import fewshot, shards
from imagenet_sd.datasets.plan import Item, Shard
from imagenet_sd.models import families, rehearsal, sd_model

MAX_ATTEMPTS = 4                # safety_checker: regenerate tries 3 new seeds, then keeps the image flagged


class Diffusers:
    """A loaded diffusers pipeline of any family (models/families.py) behind the two calls generation makes.

    `settings`: the family's own call arguments (negative prompt, max_sequence_length), the same
    for every call of the run.
    """

    def __init__(self, pipe, family: families.Family, settings: families.CallSettings):
        self.pipe, self.family, self.settings = pipe, family, settings

    def draw(self, prompts: list[str], seeds: list[int], **settings):
        return sd_model.draw(self.pipe, prompts, seeds, **settings, **self.settings.options(self.family, len(prompts)))

    @cached_property
    def guided(self):
        return sd_model.img2img(self.pipe)      # built at the first real-guided batch

    def draw_from(self, prompts: list[str], seeds: list[int], starts, *, strength: float, guidance: float,
                  steps: int, resolution: int):
        return sd_model.draw_from(self.guided, prompts, seeds, starts, strength=strength, guidance=guidance,
                                  steps=steps, resolution=resolution,
                                  **self.settings.options(self.family, len(prompts)))

    def truncated_prompts(self, prompts: list[str]) -> list[str]:
        return sd_model.truncated_prompts(*self._tokenizer, prompts)

    @property
    def token_limit(self) -> int:
        return self._tokenizer[1]

    @cached_property
    def _tokenizer(self):
        return sd_model.prompt_tokenizer(self.pipe, self.family, self.settings.max_sequence_length)


def load_generator(params: Params, device, dtype):
    """The pixel source: a diffusers pipeline, or the rehearsal stand-in (module rehearsal)."""
    g = params.generate
    if rehearsal.is_rehearsal(g.model):
        return rehearsal.Pipeline()
    key = f"profiles.{params.profile}.generate.model"
    family = sd_model.family(g.model, key)       # its model_index.json: cheap, and the settings' check first
    pipe = sd_model.load_pipeline(
        g.model, device, dtype, scheduler=params.scheduler, safety_checker=params.safety_checker != "none",
        key=key, attention=g.attention, channels_last=g.channels_last, compile=g.compile, lora=g.lora,
        lora_scale=g.lora_scale, deepcache_interval=g.deepcache_interval, token_merging=g.token_merging)
    return Diffusers(pipe, family, call_settings(params, family))


def call_settings(params: Params, family: families.Family) -> families.CallSettings:
    """The run's family arguments, checked (families.settings_for)."""
    g = params.generate
    return families.settings_for(family, params.negative_prompt, g.max_sequence_length,
                                 f"profiles.{params.profile}.generate", g.model, params.guidance)


def encode(image: Image.Image, quality: int, size: int | None) -> bytes:
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    buffer = BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def record(item: Item, attempt: int, flagged: bool, params: Params, facts: dict) -> dict:
    """The JSON stored beside each image in its shard: everything that decides its pixels (with
    `facts`, generation.generator_facts: weights, pipeline, sampler config, family settings) and its
    split (datasets.plan.SPLITS), so that a reader not ours can redraw it or leave held-out images out."""
    return {"wnid": item.cls.wnid, "class": item.cls.key, "label": item.cls.index,
            "image_index": item.image_index, "split": item.split, "prompt": item.prompt,
            "seed": item.seed(params.seed, attempt), "attempt": attempt, "guidance": params.guidance,
            "steps": params.steps, "scheduler": params.scheduler, "model": params.generate.model,
            "resolution": params.generate.resolution, **facts, "flagged": flagged}


def init_record(item: Item, params: Params) -> dict:
    """Real guidance's part of the record: the real image the image started from, and how strongly
    it was noised; {} without real guidance (the records of text-to-image runs stay as they were)."""
    if item.init is None:
        return {}
    return {"init_image": item.init, "init_shot": item.image_index % params.shots,
            "init_strength": params.init_strength}


def draw_batch(generator, batch: list[tuple[Item, int]], params: Params):
    """(images, flags) of (item, attempt) pairs: text-to-image, or from each item's real image."""
    g = params.generate
    prompts = [it.prompt for it, _ in batch]
    seeds = [it.seed(params.seed, attempt) for it, attempt in batch]
    if not params.init_strength:
        return generator.draw(prompts, seeds, guidance=params.guidance, steps=params.steps, resolution=g.resolution)
    starts = [fewshot.init_image(params.data.train / it.init, g.resolution) for it, _ in batch]
    return generator.draw_from(prompts, seeds, starts, strength=params.init_strength, guidance=params.guidance,
                               steps=params.steps, resolution=g.resolution)


class Stopwatch:
    """Seconds spent inside `with stopwatch:` blocks, summed."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._start


def render(generator, items: list[Item], params: Params, facts: dict, on_done=lambda n: None,
           pixels: Stopwatch | None = None) -> dict[str, tuple[bytes, dict]]:
    """key -> (JPEG, record) for every item, drawn `batch_size` at a time in the given order.

    With safety_checker: regenerate, a flagged image is queued again with its next
    attempt's seed; after MAX_ATTEMPTS it is kept, black and flagged. `pixels` times
    drawing and JPEG encoding, so that what is left of a shard's time is bookkeeping.
    """
    g = params.generate
    pixels = pixels or Stopwatch()
    queue = [(item, 0) for item in items]
    done: dict[str, tuple[bytes, dict]] = {}
    start = 0
    while start < len(queue):
        batch = queue[start:start + g.batch_size]
        start += len(batch)
        with pixels:
            images, flags = draw_batch(generator, batch, params)
        finished = 0
        for (item, attempt), image, flagged in zip(batch, images, flags):
            if flagged and params.safety_checker == "regenerate" and attempt + 1 < MAX_ATTEMPTS:
                queue.append((item, attempt + 1))
                continue
            with pixels:
                jpeg = encode(image, g.jpeg_quality, g.stored_size)
            done[item.key] = (jpeg, record(item, attempt, flagged, params, facts) | init_record(item, params))
            finished += 1
        on_done(finished)
    return done


def reusable(plan, shard: Shard, older: list[str]) -> dict[str, tuple[bytes, dict]]:
    """Images of `shard` already made by other finished versions of it (other scales), with the split
    this version gives them (a scale-up turns over-generated images into training ones)."""
    wanted, found = {it.key: it for it in shard.items}, {}
    for name in older:
        if name == shard.file_name:
            continue
        for key, jpeg, rec in shards.iter_shard(plan.folder / name):
            if key in wanted and rec is not None:
                found[key] = (jpeg, rec | {"split": wanted[key].split})
    return found


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary shards left by killed processes (their pid is gone), from one listing of the folder."""
    for entry in os.scandir(folder):
        if not (entry.name.startswith(".shard-") and entry.name.endswith(".tmp")):
            continue
        try:
            os.kill(int(entry.name.split(".")[-2]), 0)
        except ProcessLookupError:
            Path(entry.path).unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass        # not ours to judge: a foreign name, or a live process of another user


def build_shard(generator, plan, shard: Shard, params: Params, older: list[str] = (),
                on_done=lambda n: None) -> dict:
    """Make `shard` in the work folder (reusing what `older` versions hold); return its manifest.

    The caller holds the shard's lock.
    """
    started, pixels = time.perf_counter(), Stopwatch()
    have = reusable(plan, shard, older)
    on_done(len(have))
    todo = [it for it in shard.items if it.key not in have]
    made = render(generator, todo, params, plan.facts, on_done, pixels) if todo else {}
    samples = [(it.key, *(have.get(it.key) or made[it.key])) for it in shard.items]
    return finish_shard(plan, shard, samples, generated=len(made), started=started, pixel_seconds=pixels.seconds,
                        batch_size=params.generate.batch_size)


def finish_shard(plan, shard: Shard, samples: list[tuple[str, bytes, dict]], generated: int,
                 started: float | None = None, pixel_seconds: float = 0.0, batch_size: int | None = None,
                 **extra) -> dict:
    """Write `shard`'s tar into the work folder, then its manifest (which says it is finished); the manifest.

    `started`: perf_counter when the shard was begun (None: made without drawing, 0 seconds).
    """
    path = plan.path(shard)
    size, sha256 = shards.write_shard(path, samples)
    records = [rec for _, _, rec in samples]
    manifest = {"contents": shard.tag, "bytes": size, "sha256": sha256,
                "images": len(samples), "generated": generated, "reused": len(samples) - generated,
                "flagged": sum(r["flagged"] for r in records), "regenerated": sum(r["attempt"] > 0 for r in records),
                # seconds: the whole shard; pixel_seconds: drawing and JPEG encoding within it.
                "seconds": 0.0 if started is None else round(time.perf_counter() - started, 4),
                "pixel_seconds": round(pixel_seconds, 4), "batch_size": batch_size, "device": str(plan.device),
                **extra}
    return shards.write_manifest(path, manifest)


def build_shards(generator, plan, mine: list[Shard], params: Params, finished: list[str],
                 on_done=lambda n: None, verify: bool = False) -> int:
    """Build this process's shards, each under its lock; return the images generated.

    A shard locked by another run is put off to the end, then waited for: by then its
    holder has usually finished it, and it is only checked, not built again.
    """
    older = shards.versions(finished)
    generated = 0
    waiting = list(mine)
    for wait in (False, True):
        put_off = []
        for shard in waiting:
            path = plan.path(shard)
            lock = try_lock(path, wait)
            if lock is None:
                put_off.append(shard)
                continue
            try:
                if shards.is_finished(path, verify):      # finished by another run meanwhile
                    on_done(len(shard))
                    continue
                generated += build_shard(generator, plan, shard, params, older.get(shard.number, []),
                                         on_done)["generated"]
            finally:
                lock.release()
        waiting = put_off
    return generated


