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

Docs: docs/generating.md#regenerating-images-from-their-records
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from imagenet_sd.core.device import resolve
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.params import Params, load
from imagenet_sd.datasets import fewshot, shards
from imagenet_sd.generate import worker
from imagenet_sd.models import families, sd_model

SETTINGS = ("model", "weights", "guidance", "steps", "scheduler", "resolution")   # one value a shard (one run made it)


def read(shard: Path) -> tuple[list[tuple[str, bytes, dict]], dict]:
    """(the shard's samples, the index.json beside it) with one-line errors for anything missing."""
    if not shard.is_file():
        raise UserError(f"{shard}: no such shard; pass a shard-NNNNNN.tar of a published dataset (data/synthetic)")
    index_path = shard.parent / shards.INDEX_FILE
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{index_path}: missing or not JSON; regenerate reads a published shard, beside its "
                        "index.json (dvc repro sd-generate writes both)") from None
    samples = [(key, jpeg, rec) for key, jpeg, rec in shards.iter_shard(shard) if isinstance(rec, dict)]
    if not samples:
        raise UserError(f"{shard}: no image with a record in it")
    for name in SETTINGS:
        if len({json.dumps(rec.get(name)) for _, _, rec in samples}) != 1:
            raise UserError(f"{shard}: its records disagree on {name}; a shard is one run's, so it cannot be redrawn")
    return samples, index


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
        return 2
    verdict = "identical" if summary["identical"] == summary["images"] else (
        f"{summary['images'] - summary['identical']} differ, by up to {summary['largest_pixel_difference']} grey "
        "levels (float rounding: the batch size, machine type or libraries differ from the run's)")
    print(f"{summary['identical']} of {summary['images']} images identical to {args.shard}: {verdict}"
          + (f"; shard written to {summary['written']}" + (", same sha256" if summary.get("same_sha256") else "")
             if "written" in summary else ""))
    return 0 if summary["identical"] == summary["images"] else 1


if __name__ == "__main__":
    sys.exit(main())
