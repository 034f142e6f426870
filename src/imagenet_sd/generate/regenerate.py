"""Draw a shard's images again from their records, and say whether the bytes match.

    python -m imagenet_sd.generate.regenerate data/synthetic/shard-000000.tar
    python -m imagenet_sd.generate.regenerate data/synthetic/shard-000000.tar --key 00003_0000007 --out /tmp/again
    python -m imagenet_sd.generate.regenerate SHARD --batch-size 16     # the batch size it was made with

Each image's record holds what decides its pixels (model and its weights' fingerprint, pipeline,
sampler with its config's hash, prompt, seed, guidance, steps, resolution, the family's settings,
LoRA and speed-ups; real guidance's start image and strength); the index.json beside a published
shard holds the rest (dtype, device type, libraries, JPEG quality, stored size, safety checker).
The weights, pipeline and sampler that load are checked against the records before drawing. The images are drawn in the
shard's order, `--batch-size` at a time: the same seed and prompt give the same image in any
batch up to float rounding (CPU and GPU kernels are not batch-invariant, which can move a rare
pixel one grey level), so identical bytes need the batch size the shard was made with (its work
folder's manifest says it; sd-generate's `batch_size`) and the same machine type and libraries.
Reports images identical, and the largest pixel difference of the others; `--out` writes the
drawn shard (a tar of the same layout) and compares its sha256 with the original's.

Before drawing, the shard is checked against the index.json that lists it (only this shard is read
and hashed), and anything but the published file stops in one line, exit status 3: damaged (not a
readable tar, or fewer images than listed: a cut copy), or edited (a record's key, class or seed is
not the one index.json's seed derives for it; or the shard reads whole but its size or sha256 is not
the one listed: an image or record, a prompt say, was changed). Exit status: 0 every image identical,
1 drawn differently, 2 bad input, 3 the shard is not as published.

Docs: docs/generating.md#regenerating-images-from-their-records
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from imagenet_sd.core.device import resolve
from imagenet_sd.core.errors import UserError, first_line
from imagenet_sd.core.params import Params, load
from imagenet_sd.datasets import fewshot, shards
from imagenet_sd.datasets.plan import Item
from imagenet_sd.generate import worker
from imagenet_sd.models import families, sd_model
from imagenet_sd.prompts.prompts import ClassPrompt

SETTINGS = ("model", "weights", "guidance", "steps", "scheduler", "resolution")   # one value a shard (one run made it)


NOT_AS_PUBLISHED = 3        # exit status: the shard is damaged or edited (main)
REFETCH = "fetch the published shard again (dvc pull, or dvc repro sd-generate) and compare its sha256 with index.json's"


class NotAsPublished(UserError):
    """The shard is not the file its index.json lists: damaged (unreadable, cut short) or edited."""


def read(shard: Path) -> tuple[list[tuple[str, bytes, dict]], dict]:
    """(the shard's samples, the index.json beside it) with one-line errors for anything missing, and
    NotAsPublished for a shard that is not the one index.json lists (`verified`)."""
    if not shard.is_file():
        raise UserError(f"{shard}: no such shard; pass a shard-NNNNNN.tar of a published dataset (data/synthetic)")
    index_path = shard.parent / shards.INDEX_FILE
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{index_path}: missing or not JSON; regenerate reads a published shard, beside its "
                        "index.json (dvc repro sd-generate writes both)") from None
    samples = verified(shard, index, index_path)
    if not samples:
        raise UserError(f"{shard}: no image with a record in it")
    for name in SETTINGS:
        if len({json.dumps(rec.get(name)) for _, _, rec in samples}) != 1:
            raise UserError(f"{shard}: its records disagree on {name}; a shard is one run's, so it cannot be redrawn")
    return samples, index


def verified(shard: Path, index: dict, index_path: Path) -> list[tuple[str, bytes, dict]]:
    """The shard's samples, if it is the file index.json lists; NotAsPublished (one line) saying whether it is
    damaged or edited otherwise. Only this shard is read and hashed, whatever the dataset's size."""
    entry = next((e for e in index.get("shards") or [] if isinstance(e, dict) and e.get("file") == shard.name), None)
    if entry is None:
        raise UserError(f"{shard}: not listed in {index_path}; regenerate reads a published shard beside the "
                        "index.json that lists it (dvc repro sd-generate writes both)")
    size, listed = shard.stat().st_size, entry.get("bytes")
    sizes = f"{size:,} bytes" + (f" of the {listed:,} it lists" if isinstance(listed, int) and listed != size else "")
    try:
        samples = list(shards.iter_shard(shard))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise NotAsPublished(f"{shard} is damaged: not a readable tar ({first_line(exc)}; {sizes}); {REFETCH}") from None
    if "images" in entry and len(samples) != entry["images"]:
        raise NotAsPublished(f"{shard} is damaged: {index_path} lists {entry['images']} images, it holds "
                             f"{len(samples)} ({sizes}; a cut copy?); {REFETCH}")
    for key, _, rec in samples:
        if rec is None:
            raise NotAsPublished(f"{shard} is damaged: the record of image {key} is not a JSON object; {REFETCH}")
        edit = edited(key, rec, index)
        if edit:
            raise NotAsPublished(f"{shard} was edited: image {key}'s record {edit}, so it no longer says how the "
                                 f"image was drawn; {REFETCH}")
    resized = isinstance(listed, int) and size != listed
    if resized or ("sha256" in entry and shards.sha256(shard) != entry["sha256"]):
        what = "size" if resized else "sha256"
        raise NotAsPublished(f"{shard} was edited: it reads whole ({len(samples)} images, as listed), but its {what} "
                             f"is not the one {index_path} lists ({sizes}), so an image or a record (a prompt, "
                             f"say) was changed; {REFETCH}")
    return samples


def edited(key: str, rec: dict, index: dict) -> str | None:
    """What in an image's record is not what the plan gives it (datasets/plan.py: its key, class and seed
    follow from its label, image index, attempt and index.json's classes and seed); None if nothing is."""
    label, number, attempt = rec.get("label"), rec.get("image_index"), rec.get("attempt", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (label, number, attempt)):
        return "lacks its label, image index or attempt"
    if key != shards.sample_key(label, number):
        return f"says label {label}, image {number}, whose key is {shards.sample_key(label, number)}"
    classes = index.get("classes") or []
    if not 0 <= label < len(classes) or rec.get("class") != classes[label]:
        return f"says class {rec.get('class')!r} for label {label}, which index.json's classes do not"
    if isinstance(index.get("seed"), int):
        cls = ClassPrompt(wnid="", index=label, c=rec["class"], h_c="", d_c="", prompt="")   # key: the class key
        seed = Item(cls, number, rec.get("prompt", "")).seed(index["seed"], attempt)
        if rec.get("seed") != seed:
            return (f"says seed {rec.get('seed')!r}, but index.json's seed {index['seed']} gives image {number} of "
                    f"class {rec['class']} (attempt {attempt}) seed {seed}")
    return None


def draw(samples: list[tuple[str, bytes, dict]], index: dict, params: Params, device, batch_size: int,
         on_done=lambda n: None) -> list[bytes]:
    """The JPEG of every sample, drawn again from its record, `batch_size` at a time in shard order."""
    first = samples[0][2]
    dtype = sd_model.DTYPES[index["dtype"]]
    # The profile's attention and layout, as the run had them: they can move a rare pixel a grey level.
    pipe = sd_model.load_pipeline(
        first["model"], device, dtype, scheduler=first["scheduler"], key="the records' model",
        safety_checker=index.get("safety_checker", "none") != "none", attention=params.generate.attention,
        channels_last=params.generate.channels_last, lora=first.get("lora", ""),
        lora_scale=first.get("lora_scale", 1.0), deepcache_interval=first.get("deepcache_interval", 0),
        token_merging=first.get("token_merging", 0.0))
    generator = worker.Diffusers(pipe, families.of(pipe), families.CallSettings(
        first.get("negative_prompt", ""), first.get("max_sequence_length")))
    check_weights(first, generator)
    settings = dict(guidance=first["guidance"], steps=first["steps"], resolution=first["resolution"])
    jpegs = []
    for start in range(0, len(samples), batch_size):
        batch = [rec for _, _, rec in samples[start:start + batch_size]]
        prompts, seeds = [r["prompt"] for r in batch], [r["seed"] for r in batch]
        if "init_image" in first:
            if params.data.train is None:
                raise UserError(f"these images start from real ones (real guidance); set profiles.{params.profile}"
                                ".data.train to the real train folder their init_image paths are relative to")
            starts = [fewshot.init_image(params.data.train / r["init_image"], first["resolution"]) for r in batch]
            images, _ = generator.draw_from(prompts, seeds, starts, strength=first["init_strength"], **settings)
        else:
            images, _ = generator.draw(prompts, seeds, **settings)
        jpegs += [worker.encode(image, index["jpeg_quality"], index.get("stored_size") or None) for image in images]
        on_done(len(batch))
    return jpegs


def check_weights(first: dict, generator) -> None:
    """The records name the weights, the pipeline and the sampler: stop before drawing if what loaded is other."""
    pipe = generator.pipe
    found = {"weights": sd_model.fingerprint(first["model"], "the records' model"),
             "pipeline": type(pipe).__name__, "scheduler_class": type(pipe.scheduler).__name__,
             "scheduler_config": families.config_digest(pipe.scheduler.config)}
    for name, value in found.items():
        if name in first and first[name] != value:
            raise UserError(f"the records say {name} {first[name]!r}, but {first['model']!r} gives {value!r} here; "
                            "these images came from other weights or another sampler, so they cannot be redrawn")


def largest_difference(a: bytes, b: bytes) -> int:
    """The largest difference of one pixel channel between two JPEGs (grey levels)."""
    with Image.open(io.BytesIO(a)) as x, Image.open(io.BytesIO(b)) as y:
        if x.size != y.size:
            return 255
        return int(np.abs(np.asarray(x.convert("RGB"), int) - np.asarray(y.convert("RGB"), int)).max())


def regenerate(shard: Path, params: Params, batch_size: int, key: str | None = None, out: Path | None = None,
               device: str = "auto") -> dict:
    """Draw `shard` (or its image `key`) again; a summary of what matched. `out`: also write the drawn shard."""
    samples, index = read(shard)
    if key is not None:
        samples = [s for s in samples if s[0] == key]
        if not samples:
            raise UserError(f"{shard}: no image {key!r} in it; keys are <label>_<image index> as the shard names "
                            f"them, e.g. {shards.sample_key(3, 7)}")
    from tqdm import tqdm
    bar = tqdm(total=len(samples), unit="img", desc="regenerate", dynamic_ncols=True)
    jpegs = draw(samples, index, params, resolve(device, "--device"), batch_size, bar.update)
    bar.close()
    same = [new == old for new, (_, old, _) in zip(jpegs, samples)]
    differences = [largest_difference(new, old) for new, (_, old, _), s in zip(jpegs, samples, same) if not s]
    summary = {"shard": str(shard), "images": len(samples), "identical": sum(same),
               "largest_pixel_difference": max(differences, default=0), "batch_size": batch_size}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        drawn = [(k, jpeg, rec) for jpeg, (k, _, rec) in zip(jpegs, samples)]
        _, sha = shards.write_shard(out / shard.name, drawn)
        summary.update(written=str(out / shard.name),
                       same_sha256=key is None and sha == shards.sha256(shard))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagenet_sd.generate.regenerate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shard", type=Path, help="a published shard (beside its index.json)")
    parser.add_argument("--key", help="only this image, <label>_<image index> as in the shard, e.g. 00003_0000007")
    parser.add_argument("--out", type=Path, help="write the drawn shard into this folder")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images a pipeline call (default: the profile's generate.batch_size)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="for real-guided images: where data.train is")
    args = parser.parse_args(argv)
    try:
        params = load(args.params)
        batch_size = args.batch_size or params.generate.batch_size
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: expected 1 or more")
        summary = regenerate(args.shard, params, batch_size, args.key, args.out, args.device)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return NOT_AS_PUBLISHED if isinstance(exc, NotAsPublished) else 2
    verdict = "identical" if summary["identical"] == summary["images"] else (
        f"drawn differently: {summary['images'] - summary['identical']} differ, by up to "
        f"{summary['largest_pixel_difference']} grey levels (float rounding: the batch size, machine type or "
        "libraries differ from the run's)")
    print(f"{summary['identical']} of {summary['images']} images identical to {args.shard}: {verdict}"
          + (f"; shard written to {summary['written']}" + (", same sha256" if summary.get("same_sha256") else "")
             if "written" in summary else ""))
    return 0 if summary["identical"] == summary["images"] else 1


if __name__ == "__main__":
    sys.exit(main())
