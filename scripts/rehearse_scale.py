"""Rehearse sd-generate and the stored dataset at real scale, on a CPU, and measure what scale costs.

Runs the real path (`dvc repro sd-generate` in a throw-away copy of this project,
torchrun ranks, plan, work folder, locks, kill and resume, publish, index.json,
DVC hashing, push and pull, the training loader) at the full image count, with
the rehearsal generator (src/imagenet_sd/models/rehearsal.py: a seeded 32 px picture in
microseconds) instead of Stable Diffusion. Only the pixels differ from a GPU run.

    python scripts/rehearse_scale.py                          # ImageNet-1K at 1x: 1,281,167 images, 2 processes
    python scripts/rehearse_scale.py --images 20000 --json out.json
    python scripts/rehearse_scale.py --plan-only --images 64000000   # plan time and memory, nothing written

Real counts: a stand-in ImageNet train folder of empty files (1000 wnid folders,
732 to 1300 files each, as many files as `--images` up to 1,281,167; beyond that
the 1,281,167 folder at `scale` = images / 1,281,167) is built once under
`--work` and kept, so the stage lists and caches it as it would ImageNet's.
Prints one JSON object (and writes it to `--json`); docs/benchmarks.md "Scale" has
the figures and what each key means.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
SETUP_STAGES = ("embedded-assets", "digits-assets")     # what scripts/setup.sh builds with dvc repro
IMAGENET_1K = 1_281_167              # ImageNet-1K train images (the paper's IN-1K-SD at 1x)
LARGEST, SMALLEST = 1300, 732        # images of ImageNet-1K's largest and smallest classes
BATCH = 256


def log(text: str) -> None:
    print(f"[rehearse] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the stand-in real data

def class_counts(images: int, classes: int) -> list[int]:
    """Per-class real counts summing to `images`: ImageNet's shape (most classes 1300, a tail
    down to 732) when that fits, else an even split."""
    if not SMALLEST * classes <= images <= LARGEST * classes:
        return [images // classes + (i < images % classes) for i in range(classes)]
    counts, short = [LARGEST] * classes, LARGEST * classes - images
    rng = random.Random(0)
    while short:
        i = rng.randrange(classes)
        cut = min(short, counts[i] - SMALLEST, rng.randint(1, LARGEST - SMALLEST))
        counts[i] -= cut
        short -= cut
    return counts


def train_folder(work: Path, wnids: list[str], counts: list[int]) -> Path:
    """`work/train-<images>`: one folder a wnid holding that many empty .JPEG files (built once)."""
    root = work / f"train-{sum(counts)}"
    done = root / ".complete"
    if done.exists():
        return root
    log(f"building the stand-in train folder {root} ({sum(counts):,} empty files, once)")
    shutil.rmtree(root, ignore_errors=True)
    for wnid, n in zip(wnids, counts):
        folder = root / wnid
        folder.mkdir(parents=True)
        for i in range(n):
            open(folder / f"{wnid}_{i}.JPEG", "wb").close()
    done.touch()
    return root


# --------------------------------------------------------------------------- the throw-away project

def write_params(path: Path, settings: dict) -> Path:
    """This repository's params.yaml with the rehearsal profile, ImageNet-1K and `settings`."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(profile="rehearsal", classes="imagenet1k", prompt="c", seed=0, scale=settings["scale"])
    block = raw["profiles"]["rehearsal"]
    block["data"]["train"] = str(settings["train"])
    block["generate"].update(processes=settings["processes"], work_dir=str(settings["work_dir"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_project(work: Path, settings: dict) -> Path:
    """A git + DVC copy of this repository's files in `work/project`, with the rehearsal params."""
    project = work / "project"
    shutil.rmtree(project, ignore_errors=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    write_params(project / "params.yaml", settings)
    # docs/generating.md#queued-experiments-and-dvcs-cache: hard links keep one copy of each shard for the work folder,
    # the workspace and DVC's cache, and DVC never re-hashes an inode it has hashed.
    (project / ".dvc" / "config.local").write_text(f"[cache]\n    type = {settings['cache_type']}\n")
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=rehearsal", "-c", "user.email=rehearsal@localhost",
                     "commit", "-qm", "rehearsal"]):
        subprocess.run(command, cwd=project, check=True)
    reuse_setup_outputs(project)
    return project


def reuse_setup_outputs(project: Path) -> None:
    """The outputs of setup's stages (the tiny models, fixtures, the digits generator) copied from this work
    tree and recorded with `dvc commit` where `dvc status` finds them current here: otherwise the first
    `dvc repro sd-generate` would build them all again (minutes, the digits generator's training most),
    which is setup's cost, not the storage path's."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in SETUP_STAGES:
        status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", stage], cwd=ROOT, env=environment(),
                                capture_output=True, text=True)
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stages[stage].get("outs", [])]
        if status.returncode != 0 or json.loads(status.stdout or "{}") or not all((ROOT / o).exists() for o in outs):
            continue        # not current here: dvc repro builds them in the project
        for out in outs:
            shutil.copytree(ROOT / out, project / out, symlinks=True, dirs_exist_ok=True)
        dvc(project, "commit", "-q", "-f", stage)


def environment() -> dict:
    # The project's stage commands call `python` and `dvc`: this interpreter's.
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), HF_HUB_OFFLINE="1")


def dvc(project: Path, *args: str, timeout: float = 7200) -> float:
    """Run `dvc args` in the project; its wall seconds. Fails loudly with dvc's output."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=environment(),
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        sys.exit(f"rehearse: dvc {' '.join(args)} failed ({result.returncode}):\n"
                 f"{(result.stdout + result.stderr)[-3000:]}")
    return time.perf_counter() - started


def manifests(work_dir: Path) -> int:
    return sum(1 for _ in work_dir.glob("*/shard-*.json"))


def killed_half_way(project: Path, work_dir: Path, shards: int, fraction: float) -> float:
    """Start `dvc repro sd-generate`, SIGKILL its whole process group once `fraction` of the shards
    are finished; the seconds it ran."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "sd-generate"], cwd=project,
                               env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while manifests(work_dir) < fraction * shards:
        if process.poll() is not None:
            sys.exit(f"rehearse: the run ended before it could be killed:\n{process.stderr.read()[-3000:].decode()}")
        time.sleep(0.2)
    # Every process of the run, torchrun's workers included (they run in sessions of their own):
    # what a node failure or `kill -9` of the job leaves behind is nothing at all.
    tree = psutil.Process(process.pid)
    for victim in [tree, *tree.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    process.wait()
    return time.perf_counter() - started


def resumed(project: Path, work_dir: Path) -> tuple[float, float]:
    """`dvc repro sd-generate` after the kill: (seconds until its first new shard, seconds in all)."""
    before = manifests(work_dir)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "sd-generate"], cwd=project,
                               env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while process.poll() is None:
        if first is None and manifests(work_dir) > before:
            first = time.perf_counter() - started
        time.sleep(0.05)
    if process.returncode:
        sys.exit(f"rehearse: the resumed run failed:\n{process.stderr.read()[-3000:].decode()}")
    total = time.perf_counter() - started
    return (first if first is not None else total), total


def set_scale(project: Path, scale: float) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["scale"] = scale
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def fresh_clone_pull(project: Path, work: Path) -> float:
    """`git clone` of the project and `dvc pull` into it from the local remote: its seconds."""
    for command in (["git", "add", "-A"],
                    ["git", "-c", "user.name=rehearsal", "-c", "user.email=rehearsal@localhost",
                     "commit", "-qm", "rehearsal outputs"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)
    clone = work / "clone"
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    return dvc(clone, "pull", "-q", "sd-generate")


# --------------------------------------------------------------------------- measured in a fresh process

def measure_plan(params_file: Path, classes: str, prompt: str) -> dict:
    """What the stage's launcher pays before the first image: counts, layout, shard names, work listing.
    The prompt table is the project's (data/prompts/prompts.tsv beside params_file) where wordnet-prompts
    wrote it, as the stage reads it; else it is built from WordNet for `classes` and `prompt`."""
    from imagenet_sd.core import params as params_module
    from imagenet_sd.datasets import shards
    from imagenet_sd.generate import generation
    from imagenet_sd.prompts import classes as class_sets
    from imagenet_sd.prompts import prompts
    from imagenet_sd.prompts.backgrounds import build

    params = params_module.load(params_file)
    table = params_file.parent / "data" / "prompts" / "prompts.tsv"
    rows = prompts.read(table) if table.is_file() else prompts.build(class_sets.load_class_set(classes), prompt)
    phrases = [phrase for _, _, phrase in build()]
    gc.collect()
    rss_before = psutil.Process().memory_info().rss / 2**20
    tracemalloc.start()
    started = time.perf_counter()
    plan = generation.make_plan(params, rows, phrases)
    todo = generation.unfinished(plan, shards.finished_in(plan.folder))
    seconds = time.perf_counter() - started
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    # The plan's own memory is what grows with the dataset; the process around it holds torch
    # (about 500 MB of mapped CUDA libraries here) and WordNet whatever the dataset's size.
    return {"plan_seconds": round(seconds, 3), "plan_images": plan.images, "plan_shards": len(plan.layout),
            "plan_unfinished": len(todo), "plan_memory_mb": round(traced, 1),
            "plan_process_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
            "plan_rss_before_mb": round(rss_before, 1)}


def plan_in_child(params_file: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--measure-plan", str(params_file)],
                            capture_output=True, text=True, env=environment())
    if result.returncode:
        sys.exit(f"rehearse: planning failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the training loader

def batch_mix(shard_dir: Path, batches: int) -> dict:
    """How random the training loader's batches are: distinct classes and label spread of `batches`
    batches of 256, each over what uniform random batches of the same dataset give."""
    import numpy as np
    from torch.utils.data import DataLoader

    from imagenet_sd.datasets import readers
    from imagenet_sd.datasets.shards import read_index

    index = read_index(shard_dir)
    keys = index["classes"]
    paths = [shard_dir / entry["file"] for entry in index["shards"]]
    train, _ = readers.shard_splits(paths, keys, 0, 0, lambda image: 0, lambda image: 0, index)
    train.set_epoch(0)
    labels = []
    for _, batch_labels in DataLoader(train, batch_size=BATCH, num_workers=0):
        labels.append(batch_labels.numpy())
        if len(labels) == batches:
            break
    counts = np.array([index["counts"][k] for k in keys])
    return {**readers.batch_mix(labels, counts), "batches_read": len(labels)}


# --------------------------------------------------------------------------- the rehearsal

def rehearse(args) -> dict:
    from imagenet_sd.prompts import classes as class_sets

    work = args.work.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    wnids = list(class_sets.imagenet1k_wnids())
    real = class_counts(min(args.images, IMAGENET_1K), len(wnids))
    scale = args.images / sum(real)
    if scale > 50:
        sys.exit(f"rehearse: --images {args.images:,} is more than 50x ImageNet-1K (the params' limit of scale)")
    train = train_folder(work, wnids, real)
    settings = {"scale": round(scale, 6), "train": train, "processes": args.processes, "cache_type": args.cache_type}
    result = {"images": None, "processes": args.processes, "scale": round(scale, 6), "cache_type": args.cache_type}
    if args.plan_only:          # its own empty work folder: nothing of a rehearsal run is touched
        plan_work = work / "plan-only"
        shutil.rmtree(plan_work, ignore_errors=True)
        params_file = write_params(plan_work / "params.yaml", {**settings, "work_dir": plan_work / "generate"})
        result["plan_first_seconds"] = plan_in_child(params_file)["plan_seconds"]
        result.update(plan_in_child(params_file))
        result["images"] = result["plan_images"]
        shutil.rmtree(plan_work, ignore_errors=True)
        return result
    work_dir = work / "generate"
    shutil.rmtree(work_dir, ignore_errors=True)       # the first run starts from nothing
    project = make_project(work, {**settings, "work_dir": work_dir})
    dvc(project, "repro", "wordnet-prompts", "places-backgrounds")
    # The first plan lists the train folder and caches its counts; the second is what every later run pays.
    result["plan_first_seconds"] = plan_in_child(project / "params.yaml")["plan_seconds"]
    result.update(plan_in_child(project / "params.yaml"))
    log(f"plan: {result['plan_images']:,} images in {result['plan_shards']:,} shards, "
        f"{result['plan_seconds']} s, {result['plan_memory_mb']} MB")

    shards = result["plan_shards"]
    log(f"generating; killing the run once {args.kill_at:.0%} of {shards:,} shards are finished")
    to_kill = killed_half_way(project, work_dir, shards, args.kill_at)
    result["killed_after_shards"] = manifests(work_dir)
    result["resume_seconds"], rest = resumed(project, work_dir)
    result["seconds"] = round(to_kill + rest, 2)
    log(f"finished: {to_kill:.1f} s before the kill, {rest:.1f} s after; first new shard "
        f"{result['resume_seconds']:.1f} s after the restart")

    metrics = json.loads((project / "metrics" / "generate.json").read_text())
    index = json.loads((project / "data" / "synthetic" / "index.json").read_text())
    stats = [json.loads(p.read_text()) for p in work_dir.glob("*/shard-*.json")]
    busy = sum(m["seconds"] for m in stats)
    pixels = sum(m["pixel_seconds"] for m in stats)
    result.update(images=index["images"], shards=len(index["shards"]), dataset_bytes=index["bytes"],
                  images_per_second=round(index["images"] / result["seconds"], 1),
                  bookkeeping_ms_per_image=round((busy - pixels) / index["images"] * 1000, 4),
                  pixel_ms_per_image=round(pixels / index["images"] * 1000, 4))
    assert metrics["images"] == index["images"] == result["plan_images"]

    # Every shard finished: the stage alone, forced (-s: its upstream stages are not re-run).
    result["rerun_seconds"] = round(dvc(project, "repro", "-f", "-s", "sd-generate"), 2)
    result["dvc_status_seconds"] = round(dvc(project, "status"), 2)
    result["dvc_commit_seconds"] = round(dvc(project, "commit", "-f", "sd-generate"), 2)
    log(f"re-run {result['rerun_seconds']} s, dvc status {result['dvc_status_seconds']} s")
    result.update(batch_mix(project / "data" / "synthetic", args.batches))

    if not args.skip_push:
        remote = work / "remote"
        shutil.rmtree(remote, ignore_errors=True)
        dvc(project, "remote", "add", "-f", "-d", "rehearsal", str(remote))
        result["dvc_push_seconds"] = round(dvc(project, "push", "-q"), 2)
        result["dvc_pull_seconds"] = round(fresh_clone_pull(project, work), 2)
        log(f"dvc push {result['dvc_push_seconds']} s, pull into a fresh clone {result['dvc_pull_seconds']} s")

    if not args.skip_scale_up:
        set_scale(project, round(2 * scale, 6))
        result["scale_up_seconds"] = round(dvc(project, "repro", "sd-generate"), 2)
        up = json.loads((project / "reports" / "generate.json").read_text())     # metrics/ has the headline only
        result.update(scale_up_images=up["images"], scale_up_generated=up["generated"],
                      scale_up_reused=up["reused"])
        log(f"scale-up to 2x: {result['scale_up_seconds']} s for {up['generated']:,} new images")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["peak_rss_mb"] = round(max(children, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=IMAGENET_1K, help="images at 1x (default: ImageNet-1K's)")
    parser.add_argument("--processes", type=int, default=2, help="torchrun ranks (default 2)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--work", type=Path, default=Path("~/.cache/imagenet-sd/rehearsal"),
                        help="where the stand-in train folder, work folder, project and remote go")
    parser.add_argument("--plan-only", action="store_true", help="measure the plan only; write nothing")
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of shards after which to SIGKILL")
    parser.add_argument("--batches", type=int, default=300, help="training-loader batches of 256 to read")
    parser.add_argument("--cache-type", default="hardlink", choices=["hardlink", "copy", "reflink,copy"],
                        help="DVC's cache.type in the project (default hardlink, as docs/generating.md advises at scale)")
    parser.add_argument("--skip-push", action="store_true", help="no dvc push / pull")
    parser.add_argument("--skip-scale-up", action="store_true", help="no 1x -> 2x run")
    parser.add_argument("--measure-plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_plan:
        print(json.dumps(measure_plan(args.measure_plan, "imagenet1k", "c")))
        return
    result = rehearse(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
