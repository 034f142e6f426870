"""The DVC output of sd-generate: the work folder's finished shards under plain names, and index.json.

`data/synthetic` is refilled on every run with hard links (no bytes copied; a copy
across file systems), so DVC may delete and restore it freely while the shards
stay in the work folder. `index.json` is the dataset's table of contents and the
one place later stages learn counts from: classes, images per class, images per
class per shard (from which every shard's class counts follow, see plan.Layout),
and every shard's size and sha256.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import shards
from .errors import UserError
from .io import replacing, write_json
from .params import Params


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
        if entry.name.startswith(("shard-", ".shard-")) or entry.name == shards.INDEX_FILE:
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
                                       "steps", "seed", "safety_checker", "jpeg_quality", "libraries")},
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


def read_index(folder: Path) -> dict:
    """index.json of a published dataset, with a clear error when it is missing or damaged."""
    path = folder / shards.INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}: missing or not valid JSON; run: dvc repro sd-generate") from None
    if not isinstance(index, dict) or not {"classes", "counts", "shards"} <= set(index):
        raise UserError(f"{path}: not an index written by sd-generate; run: dvc repro sd-generate")
    return index
