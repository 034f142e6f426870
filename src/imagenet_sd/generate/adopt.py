"""Adopting the shards of a work folder made before records named their generator (issue 23).

Issue 23 re-keyed every generation work folder: records gained `weights`, `pipeline`,
`scheduler_class`, `scheduler_config` and `split`, and a record is part of its shard's bytes.
The pixels did not change: an SD 1.x/2.x pipeline is called exactly as before (499 of 499
embedded JPEGs were byte-identical). So sd-generate, before drawing anything, looks for the
folder the same run had under the old key; when there is one, each of its finished shards
whose images the new layout wants is copied into the new folder with its records completed,
without a GPU. Drawing resumes from whatever is left.

The old key is the new recipe without the generator facts the old one lacked, and with the
old code identities (PREVIOUS_CODE), so only a folder whose every other input is the run's
own is adopted. Runs of other families, or with a negative prompt, LoRA or speed-up, never
had an old folder.

Docs: docs/caching.md#upgrading-to-any-family-generation-issue-23
"""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from imagenet_sd.core.locks import try_lock
from imagenet_sd.datasets import shards
from imagenet_sd.generate import worker

# generation.code_identity() before issue 23: (text-to-image, real guidance); tests/test_code_identity.py.
PREVIOUS_CODE = ("e9fb5286f8055ff0", "61ac5751d3056579")
NEW_FACTS = ("pipeline", "scheduler_class", "scheduler_config")     # recipe keys the old recipe did not have
OLD_FAMILY = "StableDiffusionPipeline"


def previous_recipe(recipe: dict) -> dict | None:
    """The recipe the same run had before issue 23, or None if it could not have run then."""
    if recipe.get("pipeline") != OLD_FAMILY:
        return None
    settings = {"negative_prompt", "max_sequence_length", "lora", "deepcache_interval", "token_merging"}
    if settings & set(recipe):      # none of these existed before issue 23
        return None
    old = {k: v for k, v in recipe.items() if k not in NEW_FACTS}
    old["code"] = PREVIOUS_CODE[0]
    if "real_guidance" in old:
        old["real_guidance"] = dict(old["real_guidance"], code=PREVIOUS_CODE[1])
    return old


def adopt(plan, finished: dict[str, dict], old_folder: Path) -> int:
    """Copy the finished shards of the run's pre-issue-23 folder (`old_folder`, named by the key of
    previous_recipe) that the new one lacks; return how many.

    `finished`: the new folder's finished shards (shards.finished_in). Each shard is written
    under its lock, as the workers write theirs; the old folder is only read.
    """
    if not old_folder.is_dir():
        return 0
    old = shards.versions(shards.finished_in(old_folder))
    wanted = [s for s in plan.layout if s.file_name not in finished and s.number in old]
    if not wanted:
        return 0
    print(f"sd-generate: adopting the finished shards of {old_folder} (made before records named their "
          f"generator; the same images) into {plan.folder}", file=sys.stderr)
    adopted = 0
    for shard in tqdm(wanted, unit="shard", desc="adopt", dynamic_ncols=True):
        if _adopt_one(plan, shard, [old_folder / name for name in old[shard.number]]):
            adopted += 1
    return adopted


def _adopt_one(plan, shard, versions: list[Path]) -> bool:
    items = {it.key: it for it in shard.items}
    found: dict[str, tuple[bytes, dict]] = {}
    for path in versions:
        for key, jpeg, record in shards.iter_shard(path):
            if key in items and record is not None and key not in found:
                found[key] = (jpeg, record)
    if len(found) < len(items):
        return False                 # a smaller old version: the workers draw the rest
    path = plan.path(shard)
    lock = try_lock(path)
    if lock is None:
        return False                 # another process is on it
    try:
        if shards.manifest_path(path).exists():
            return False
        samples = [(it.key, found[it.key][0], found[it.key][1] | plan.facts | {"split": it.split})
                   for it in shard.items]
        worker.finish_shard(plan, shard, samples, generated=0, adopted_from=versions[0].parent.name)
        return True
    finally:
        lock.release()
