"""The DVC output of sd-generate: the work folder's finished shards under plain names, and index.json.

`data/synthetic` is refilled on every run with hard links (no bytes copied; a copy
across file systems), so DVC may delete and restore it freely while the shards
stay in the work folder. `index.json` is the dataset's table of contents and the
one place later stages learn counts from: classes, images per class, images per
class per shard (from which every shard's class counts follow, see plan.Layout),
and every shard's size and sha256. `README.md` beside it is the dataset card: what the
images are, how they were made, and what to keep in mind when training on them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import atomic_write_text, replacing, write_json
from imagenet_sd.core.params import Params
from imagenet_sd.datasets import shards
from imagenet_sd.datasets.plan import overgenerate_for
from imagenet_sd.prompts.prompts import MATCHED, SENTENCES, TEMPLATES


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
    for entry in os.scandir(out_dir):
        if entry.name.startswith(("shard-", ".shard-")) or entry.name in (shards.INDEX_FILE, CARD_FILE):
            os.unlink(entry.path)


def publish(plan, params: Params, out_dir: Path) -> dict:
    """Fill `out_dir` with the finished shards under their plain names, and write index.json."""
    finished = shards.finished_in(plan.folder)
    missing = next((s for s in plan.layout if s.file_name not in finished), None)
    if missing is not None:
        raise UserError(f"{plan.path(missing)}: not finished (no manifest matching it), so {out_dir} cannot be "
                        "published; run the same command again to make it")
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_outputs(out_dir)
    listed, flagged, regenerated = [], 0, 0
    for shard in plan.layout:
        manifest = finished[shard.file_name]
        link_or_copy(plan.path(shard), out_dir / shard.name)
        listed.append({"file": shard.name, "images": manifest["images"], "bytes": manifest["bytes"],
                       "sha256": manifest["sha256"]})
        flagged += manifest["flagged"]
        regenerated += manifest["regenerated"]
    ordered = plan.layout.rows
    index = {
        "classes": [r.key for r in ordered],
        "wnids": [r.wnid for r in ordered],
        "counts": {r.key: plan.counts[r.key] for r in ordered},       # held-out images included
        "holdout_per_class": params.train.holdout_per_class,          # image indices below it: held out
        "images": plan.images,
        "images_per_class_per_shard": plan.layout.per_class,
        "shards": listed,
        "bytes": sum(s["bytes"] for s in listed),
        "flagged": flagged,
        "safety_regenerated": regenerated,
        "work_key": plan.folder.name,      # not the path: the output must not depend on who made it
        "scale": params.scale,
        "prompt": params.prompt,
        **{k: plan.recipe[k] for k in ("model", "resolution", "stored_size", "dtype", "scheduler", "guidance",
                                       "steps", "seed", "safety_checker", "jpeg_quality", "libraries", "device")},
    }
    index["generator"] = dict(plan.facts or {})        # weights, pipeline, sampler (also in every record)
    index["splits"] = splits(plan, params)
    if overgenerate_for(params):      # the filter's over-generation; only then, like the keys below
        index["overgenerate"] = params.filtering.overgenerate
        index["train_targets"] = {r.key: plan.targets[r.key] for r in ordered}
    if params.prompt == MATCHED:      # only then: the index of every other variant stays as it was
        index["background_top_k"] = params.background_top_k
    if params.init_strength:          # real guidance; likewise only then
        index["shots"], index["init_strength"] = params.shots, params.init_strength
    if params.prompt == SENTENCES:    # language enhancement; likewise
        index["language_model"] = params.generate.language_model
    write_json(out_dir / shards.INDEX_FILE, index)
    atomic_write_text(out_dir / CARD_FILE, dataset_card(index, params))
    return index


CARD_FILE = "README.md"


def splits(plan, params: Params) -> dict[str, int]:
    """Images of each split (datasets.plan.SPLITS), from the counts; every record names its own."""
    held = params.train.holdout_per_class * len(plan.rows)
    train = sum(plan.targets[r.key] for r in plan.rows)
    return {"holdout": held, "train": train, "overgenerated": plan.images - held - train}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def licence(model: str) -> str:
    """What the generator's licence says about the images, as far as this repository knows it."""
    if "stable-diffusion-v1-4" in model.lower():
        return ("Stable Diffusion v1.4 is released under the CreativeML OpenRAIL-M licence "
                "(https://huggingface.co/spaces/CompVis/stable-diffusion-license); its use-based "
                "restrictions (Attachment A) apply to these images and to models trained on them.")
    if model == "rehearsal":
        return "Stand-in pixels (src/imagenet_sd/models/rehearsal.py), not a generative model: nothing to license."
    if Path(model).name == "tiny-sd":
        return "A tiny random-weight model built by this repository's setup: no third-party licence."
    return f"See the licence in the model card of {model}."


def dataset_card(index: dict, params: Params) -> str:
    """data/synthetic/README.md: what, how, safety counts, licence and the paper's caveats (Sec. 6)."""
    counts = list(index["counts"].values())
    held = index.get("holdout_per_class", 0)
    lines = [
        f"# Synthetic ImageNet clone: {len(counts)} classes, {index['images']:,} images",
        "",
        "Made by the sd-generate stage of imagenet-sd (`dvc repro`), after Sariyildiz et al., \"Fake it till you",
        "make it: learning transferable representations from synthetic ImageNet clones\" (CVPR 2023).",
        "",
        "## What",
        "",
        f"- Classes: {len(counts)} (`classes: {params.classes}`), listed in order in `index.json`.",
        f"- Images: {index['images']:,}, {min(counts)} to {max(counts)} a class: the real train folder's count x "
        f"`scale` {index['scale']:g}" + (f", plus {held} held out a class (image indices 0..{held - 1}, never "
                                         "trained on)" if held else "")
        + (f", plus {index['overgenerate']:g} x that more for the CLIP filter to choose among (`train_targets` in "
           "`index.json`: how many of each class it keeps)" if "overgenerate" in index else "") + ".",
        f"- Stored as {len(index['shards'])} WebDataset tar shards ({_size(index['bytes'])}): "
        "`<label>_<index>.jpg` + `.json` (class, prompt, seed, ...) per image.",
        "",
        "## How",
        "",
        f"- Generator: `{index['model']}`, {index['resolution']} px"
        + (f" stored at {index['stored_size']} px" if index.get("stored_size") else "")
        + f", {index['dtype']}, JPEG quality {index['jpeg_quality']}.",
        f"- Prompt: `{index['prompt']}`, \"{TEMPLATES[index['prompt']].replace('{', '').replace('}', '')}\" (c: class "
        "name, h_c: its WordNet hypernym, d_c: its definition, b: a Places365 scene"
        + (f", drawn among the class's {index['background_top_k']} scenes closest to it under the generator's "
           "text encoder, beyond the paper (its Sec. 4.3 future work; data/backgrounds/matched.tsv)"
           if index["prompt"] == MATCHED else "")
        + (f", s: a sentence `{index.get('language_model')}` wrote from the class name, one for each image "
           "(language enhancement, He et al., ICLR 2023; data/prompts/sentences)" if index["prompt"] == SENTENCES
           else "") + "); "
        f"guidance {index['guidance']:g}, "
        f"{index['steps']} steps, scheduler `{index['scheduler']}`, seed {index['seed']} (every image's seed "
        "derives from it, its class and its index).",
        *_real_guidance_lines(index),
        "- Libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(index.get("libraries", {}).items()))
        + f"; {index['dtype']} on {index['device']}.",
        *_generator_lines(index),
        "",
        "## Splits",
        "",
        "Every image's record (`.json`) names its `split`: "
        + ", ".join(f"`{name}` {n:,}" for name, n in index["splits"].items() if n) + ".",
        "`holdout` images are never trained on (train-resnet50 scores them every epoch); `overgenerated` ones are",
        "the candidates the CLIP filter chooses among (data/filtered/kept.json lists what it kept).",
        "With Hugging Face `datasets`:",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("webdataset", data_files={"all": "data/synthetic/shard-*.tar"}, split="all")',
        'train = ds.filter(lambda r: r["json"]["split"] == "train")',
        'holdout = ds.filter(lambda r: r["json"]["split"] == "holdout")',
        "```",
        "",
        "Each record holds what decides its pixels, so `python -m imagenet_sd.generate.regenerate SHARD` draws",
        "a shard again and says whether the bytes match.",
        "",
        "## Safety checker",
        "",
        "- `safety_checker: none`: the checker did not run." if index["safety_checker"] == "none" else
        f"- `safety_checker: {index['safety_checker']}`: {index['flagged']} images flagged and kept black, "
        f"{index['safety_regenerated']} regenerated with a new seed.",
        "",
        "## Licence",
        "",
        f"- {licence(index['model'])}",
        "",
        "## Caveats (the paper, Sec. 6)",
        "",
        "- Synthetic clones have no reason to be immune to ImageNet's biases.",
        "- Stable Diffusion (the paper's generator) was trained on LAION-2B, scraped from the internet and filtered automatically with",
        "  CLIP; LAION contains problematic content, and Stable Diffusion models memorise part of their",
        "  training set.",
        "- The generator narrows diversity: images of a class look alike, which reinforces stereotypes; the",
        "  prompt variants mitigate this only in part.",
        "",
    ]
    return "\n".join(lines)


def _generator_lines(index: dict) -> list[str]:
    facts = index.get("generator") or {}
    if "pipeline" not in facts:
        return []
    extras = [f"{k} {facts[k]!r}" for k in ("negative_prompt", "max_sequence_length", "lora", "lora_scale",
                                             "deepcache_interval", "token_merging") if k in facts]
    return [f"- Pipeline `{facts['pipeline']}`, sampler `{facts['scheduler_class']}` (config sha256 "
            f"`{facts['scheduler_config']}`), weights `{facts['weights']}`" + (": " + ", ".join(extras) if extras
                                                                                else "") + "."]


def _real_guidance_lines(index: dict) -> list[str]:
    if not index.get("init_strength"):
        return []
    return [f"- Real guidance (He et al., ICLR 2023): image i of a class starts from its class's real image "
            f"i mod {index['shots']} (of the {index['shots']}-shot subset in data/fewshot/shots.tsv), noised to "
            f"strength {index['init_strength']:g} and denoised with the prompt (diffusers' img2img); each record "
            "names its `init_image`."]


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
