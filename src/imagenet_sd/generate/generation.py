"""Stable Diffusion -> the synthetic ImageNet clone, as tar shards (the paper's Sec. 4).

What is drawn, and where it goes, is `plan.Layout`: per-class counts (real x
scale) and shard k = image indices [k*b, (k+1)*b) of every class, derived on
demand. This module turns a layout into shards in a work folder:

Work folder: finished shards live in `work_dir/<key>/`, keyed by everything that
decides their bytes (model and its weights' fingerprint, resolution, dtype,
device type, scheduler, guidance, steps, seed, safety policy, JPEG settings,
class prompts, backgrounds (and for c_hc_bm each class's matched scenes; with real
guidance the K-shot table and the strength; for le the language model and its sentence
streams' key), b, the versions of the libraries that draw and
encode, and the source of the functions that do), not by `scale`, batch size or
process count. A shard is finished when its manifest matches its size and mtime
(`shards.finished_in`, one listing of the folder; `verify` re-hashes). A killed
run resumes from there; a scale-up rebuilds only shards whose image set grew and
copies the images they already had.

Several writers: ranks of one run split the unfinished shards; separate runs on
the same work folder (queued experiments, nodes) take a lock per shard, so a
shard is only ever written by one process, and a process that finds a shard
locked comes back to it last, when it has probably been finished by its holder.

Which bytes: shard k is built by one process in fixed batches, so its bytes do
not depend on the number of processes, the order or restarts. They do depend,
at float-rounding level, on the batch size and thread count: PyTorch's CPU and
GPU kernels are not batch-invariant (measured in tests/test_generation.py).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from imagenet_sd.core import distributed
from imagenet_sd.core.device import resolve
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import write_json
from imagenet_sd.core.locks import locked
from imagenet_sd.core.params import Params, writable_dir
from imagenet_sd.datasets import fewshot, shards
from imagenet_sd.datasets.plan import Layout, Shard, counts_for, targets_for
from imagenet_sd.generate import adopt, estimates, memorisation, worker
from imagenet_sd.models import families, hub, rehearsal, sd_model
from imagenet_sd.prompts.prompts import BACKGROUND_SLOT, ClassPrompt

RECIPE_FILE = "recipe.json"
LIBRARIES = ("torch", "diffusers", "transformers", "pillow", "numpy")   # they decide the pixels and the JPEG


@dataclass
class Plan:
    """Everything decided before a single image is drawn."""
    rows: list[ClassPrompt]
    counts: dict[str, int]  # images a class to make
    targets: dict[str, int]  # of them, training images a class (real x scale); the rest held out or over-generated
    layout: Layout
    recipe: dict | None
    folder: Path | None     # work_dir/<key>; None in an estimate made without the weights
    device: object          # torch.device
    dtype: object           # torch.dtype
    facts: dict | None = None   # generator_facts: what every record repeats about the generator

    @property
    def images(self) -> int:
        return self.layout.images

    @property
    def shards(self) -> Layout:
        return self.layout

    def path(self, shard: Shard) -> Path:
        return self.folder / shard.file_name


# The packages of the add-ons, in the key only when a run uses them (a new peft does not re-key plain runs).
ADD_ON_LIBRARIES = {"lora": "peft", "deepcache_interval": "DeepCache", "token_merging": "tomesd"}


def library_versions(params: Params | None = None) -> dict[str, str]:
    """The versions of LIBRARIES and of the add-ons `params` uses."""
    g = params.generate if params is not None else None
    used = tuple(lib for name, lib in ADD_ON_LIBRARIES.items() if g is not None and getattr(g, name))
    return hub.library_versions(LIBRARIES + used)


def code_identity(real_guidance: bool = False) -> str:
    """A hash of the source of the functions that decide a shard's bytes (not of whole modules,
    whose unrelated edits would throw away hundreds of GPU-hours of finished shards).

    `real_guidance` adds the functions only real-guided images go through, so that text-to-image
    work folders keep their keys whatever happens to those.
    """
    functions = (sd_model.draw, families.CallSettings.options, rehearsal.draw, worker.encode, worker.record,
                 shards.write_shard, shards._add)
    if real_guidance:
        functions += (sd_model.img2img, sd_model.draw_from, rehearsal.draw_from, fewshot.init_image,
                      worker.init_record)
    return hashlib.sha256("".join(inspect.getsource(f) for f in functions).encode()).hexdigest()[:16]


def recipe(params: Params, rows: list[ClassPrompt], phrases: list[str], device, dtype, per_class: int,
           facts: dict, matched: dict[str, tuple[int, ...]] | None = None,
           shots: fewshot.ShotTable | None = None, sentences=None) -> dict:
    """What decides the images, and nothing else: the work folder's key.

    `matched` (prompt c_hc_bm: each class's scenes, best first) adds a key; without it the
    recipe is what it was before c_hc_bm existed, so earlier variants keep their work folders.
    `shots` (real guidance: the K-shot table) likewise adds one: K, the strength, the table's
    sha256 (which real images, by path, size and sha256) and real guidance's own code.
    `facts` (generator_facts) are what every record repeats about the generator.
    `sentences` (prompt le: language.Sentences) likewise: the language model, the key of its
    sentence streams and the sentences a class, which decide image i's sentence whatever the
    scale (module language).
    """
    g = params.generate
    uses_backgrounds = any(BACKGROUND_SLOT in r.prompt for r in rows)
    extra = {}
    if matched is not None:
        extra["matched_backgrounds"] = {r.key: list(matched[r.key]) for r in sorted(rows, key=lambda r: r.index)}
    if shots is not None:
        extra["real_guidance"] = {"shots": params.shots, "init_strength": params.init_strength,
                                  "shot_table": shots.digest, "code": code_identity(real_guidance=True)}
    if sentences is not None:
        extra["language"] = {"model": sentences.model, "key": sentences.key}
        if sentences.per_class:       # images sharing sentences; without it, the key of one sentence an image
            extra["language"]["sentences_per_class"] = sentences.per_class
        if sentences.per_sentence:    # He et al.'s consecutive images a sentence: another assignment, another key
            extra["language"]["images_per_sentence"] = sentences.per_sentence
    return {
        "model": g.model, **facts,      # generator_facts: weights, pipeline, sampler, family settings, add-ons
        "resolution": g.resolution, "dtype": sd_model.dtype_name(dtype),
        "device": device.type, "scheduler": params.scheduler, "guidance": params.guidance,
        "steps": params.steps, "seed": params.seed, "safety_checker": params.safety_checker,
        "jpeg_quality": g.jpeg_quality, "stored_size": g.stored_size, "images_per_class_per_shard": per_class,
        "classes": [asdict(r) for r in sorted(rows, key=lambda r: r.index)],
        "backgrounds": phrases if uses_backgrounds else None,
        "libraries": library_versions(params), "code": code_identity(), **extra,
    }


def work_key(recipe_: dict) -> str:
    return hashlib.sha256(json.dumps(recipe_, sort_keys=True).encode()).hexdigest()[:16]


def generator_facts(params: Params, weights: str, estimate: bool = False) -> dict:
    """What every record says about the generator beyond the run's settings, checked against its family:
    the weights' fingerprint, the pipeline class, the sampler's class and config hash, the family's
    call settings and add-ons (only those set). Read from configs only (no weights), so the launcher
    fails in one line before any worker starts on a setting the family's pipeline lacks.
    """
    g, key = params.generate, f"profiles.{params.profile}.generate"
    if rehearsal.is_rehearsal(g.model):
        return {"weights": weights}
    source, local_only = estimates.config_source(g.model, f"{key}.model")
    family = families.family_of(families.read_model_index(source, local_only), f"{key}.model", g.model)
    families.check_resolution(family, g.resolution, key, g.model, sd_model.vae_scale_factor(source, local_only))
    families.check_scheduler(family, params.scheduler, g.model)
    if params.init_strength:
        families.check_img2img(family, g.model)
    if params.safety_checker != "none" and not family.safety_checker:
        raise UserError(f"safety_checker = {params.safety_checker!r}, but {g.model!r} ({family.name}) ships no "
                        "safety checker; set safety_checker: none")
    for name, value in (("deepcache_interval", g.deepcache_interval), ("token_merging", g.token_merging)):
        if value and family.denoiser != "unet":
            raise UserError(f"{key}.{name} = {value:g} works on UNets; {g.model!r} ({family.name}) is a "
                            f"transformer: set it to 0")
    settings = worker.call_settings(params, family)
    sampler = sd_model.scheduler_for(params.scheduler, sd_model.scheduler_config(source, local_only))
    facts = {"weights": weights, "pipeline": family.pipeline, "scheduler_class": type(sampler).__name__,
             "scheduler_config": families.config_digest(sampler.config), **settings.record()}
    if g.lora:
        try:
            lora_weights = sd_model.lora_fingerprint(g.lora, f"{key}.lora")
        except UserError:
            if not estimate:
                raise
            lora_weights = None
        facts.update(lora=g.lora, lora_weights=lora_weights, lora_scale=g.lora_scale)
    if g.deepcache_interval:
        facts["deepcache_interval"] = g.deepcache_interval
    if g.token_merging:
        facts["token_merging"] = g.token_merging
    return facts


def weights_fingerprint(params: Params) -> str:
    model = params.generate.model
    if rehearsal.is_rehearsal(model):
        return rehearsal.NAME
    return sd_model.fingerprint(model, f"profiles.{params.profile}.generate.model")


def make_plan(params: Params, rows: list[ClassPrompt], phrases: list[str], estimate: bool = False,
              matched: dict[str, tuple[int, ...]] | None = None, shots: fewshot.ShotTable | None = None,
              sentences=None) -> Plan:
    """Counts, shards and work folder; checks the train folder, device, dtype and that the model exists.

    `matched`: prompt c_hc_bm's scenes per class (`backgrounds.read_matched`); None: every scene.
    `shots`: the K-shot table (`fewshot.load`), which real guidance (init_strength > 0) needs.
    `sentences`: prompt le's sentence table (`language.Sentences`), checked against the counts.
    `estimate` (the dry run) plans on a machine without the GPU or the weights: the
    device is taken as configured, and without weights the work folder is unknown.
    """
    g, key = params.generate, f"profiles.{params.profile}.generate"
    if not rows:
        raise UserError("the prompt table is empty; run the wordnet-prompts stage (dvc repro wordnet-prompts)")
    if (shots is not None) != bool(params.init_strength):
        raise ValueError("make_plan: pass the K-shot table exactly when init_strength > 0")
    if shots is not None and params.data.train is None:
        raise UserError(f"params.yaml: init_strength = {params.init_strength:g} starts every image from a real one, "
                        f"but profiles.{params.profile}.data.train, where they are, is ''; configure it or set "
                        "init_strength: 0")
    check_trained_classes(params, rows)
    device = planned_device(g.device) if estimate else resolve(g.device, f"{key}.device")
    dtype = sd_model.resolve_dtype(g.dtype, device, f"{key}.dtype")
    # real x scale images a class to train on, the filter's over-generation, and train.holdout_per_class more.
    targets = targets_for(params, rows, estimate)          # the real folder's listing, read once
    counts = counts_for(params, rows, targets)
    if sentences is not None:
        sentences.check(counts)
    per_class = max(1, g.images_per_shard // len(rows))
    layout = Layout(rows, counts, phrases, per_class, params.seed, matched, shots.paths if shots else None,
                    sentences, holdout=params.train.holdout_per_class, targets=targets)
    # The dry run reads local folders and the Hub's cache only: a login node without internet says what it
    # could not check at once instead of retrying the Hub for over a minute.
    with hub.cache_only() if estimate else contextlib.nullcontext():
        try:
            weights = weights_fingerprint(params)
        except UserError as exc:
            if not estimate:
                raise
            generator_facts(params, None, estimate=True)     # the family's checks hold for an estimate too
            print(f"note: could not check the weights here ({exc}); the estimate cannot see which shards are "
                  "finished", file=sys.stderr)
            return Plan(rows=rows, counts=counts, targets=targets, layout=layout, recipe=None, folder=None,
                        device=device, dtype=dtype)
        facts = generator_facts(params, weights, estimate)
    recipe_ = recipe(params, rows, phrases, device, dtype, per_class, facts, matched, shots, sentences)
    return Plan(rows=rows, counts=counts, targets=targets, layout=layout, recipe=recipe_,
                folder=g.work_dir / work_key(recipe_), device=device, dtype=dtype, facts=facts)


def check_trained_classes(params: Params, rows: list[ClassPrompt]) -> None:
    """A model trained here on a class set (the digits generator) draws only those classes: a run's
    class outside them is a one-line error before anything is drawn."""
    folder = Path(os.path.expandvars(params.generate.model)).expanduser()
    known = sd_model.trained_classes(str(folder)) if folder.is_dir() else None
    if known is None:
        return
    unknown = [r.key for r in rows if r.key not in set(known)]
    if unknown:
        raise UserError(f"class {unknown[0]} ({len(unknown)} of {len(rows)} classes) is not among the {len(known)} "
                        f"classes profiles.{params.profile}.generate.model = {params.generate.model!r} was trained on "
                        f"(its {sd_model.TRAINED_CLASSES}); use classes it lists (classes: digits) or another model")


def planned_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check(params: Params, plan: Plan) -> None:
    """What can fail before the first image, checked in the launching process: the work folder (its key
    folder when it exists; a new one is made by `generate` only once the model has loaded)."""
    writable_dir(f"profiles.{params.profile}.generate.work_dir", params.generate.work_dir,
                 plan.folder if plan.folder.is_dir() else None)


def open_folder(plan: Plan) -> None:
    """The work folder made (if new) with its recipe.json, and temporaries of killed processes removed."""
    plan.folder.mkdir(parents=True, exist_ok=True)
    with locked(plan.folder / RECIPE_FILE):
        write_json(plan.folder / RECIPE_FILE, plan.recipe)
    worker.remove_stale_temporaries(plan.folder)


# --------------------------------------------------------------------------- the whole job

class ShardPoll:
    """Images of `todo` that ranks `ranks` of a `world`-rank run have finished, from their manifests.

    Rank r builds todo[r::world] in order (`generate`), so a poll looks only at each rank's next
    shard, and its cost does not grow with the dataset.
    """

    def __init__(self, plan: Plan, todo: list[Shard], world: int, ranks):
        self.queues = [[(plan.path(s), len(s)) for s in todo[r::world]] for r in ranks]   # names made once
        self.done = 0

    def __call__(self) -> int:
        for queue in self.queues:
            while queue and shards.manifest_path(queue[0][0]).exists():
                self.done += queue.pop(0)[1]
        return self.done


class Progress:
    """The main process's bar over every image still to make: its own, and the other ranks' finished shards
    (ShardPoll, at most every POLL seconds)."""
    POLL = 5.0

    def __init__(self, ctx: distributed.Context, plan: Plan, todo: list[Shard]):
        self.own, self.others, self.polled = 0, 0, 0.0
        self.poll = ShardPoll(plan, todo, ctx.world, range(1, ctx.world)) if ctx.main and ctx.world > 1 else None
        self.bar = tqdm(total=sum(len(s) for s in todo), unit="img", desc="sd-generate",
                        dynamic_ncols=True, disable=not ctx.main or not todo, smoothing=0.05)

    def add(self, n: int) -> None:
        self.own += n
        now = time.monotonic()
        if self.poll is not None and now - self.polled > self.POLL:
            self.polled = now
            self.others = self.poll()
        self.bar.update(self.own + self.others - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def watch(plan: Plan, todo: list[Shard], world: int):
    """(done, total) images of `todo` for a job of `world` ranks, polled (ShardPoll over every rank)."""
    poll, total = ShardPoll(plan, todo, world, range(world)), sum(len(s) for s in todo)
    return lambda: (poll(), total)


def unfinished(plan: Plan, finished) -> list[Shard]:
    """The layout's shards whose work-folder name is not among `finished`."""
    return [s for s in plan.layout if s.file_name not in finished]


# metrics/generate.json; the rest of `publish.measure` (bytes, shards, per-class range, ...) goes to the details.
HEADLINE = ("images", "generated", "images_per_second", "gpu_seconds", "flagged", "tflop_per_image", "memorised_share")


def generate(params: Params, plan: Plan, out_dir: Path, metrics_path: Path, verify: bool = False,
             details_path: Path | None = None) -> dict | None:
    """Make every unfinished shard (this rank's share), then on the main rank publish and measure.

    Returns the metrics on the main rank (all of them; `HEADLINE` goes to `metrics_path`,
    everything to `details_path`), None on the others.
    """
    from imagenet_sd.generate.publish import measure, publish
    ctx = distributed.start()
    opened = False              # the main rank has made the work folder and written its recipe.json
    try:
        if ctx.main:
            # A new work folder appears only once the model (and its LoRA) has loaded, below: a run that
            # fails to load leaves no empty key behind. An existing one, or one to adopt into, opens now.
            old = adopt.previous_recipe(plan.recipe)   # shards of this run made before issue 23 (module adopt)
            old_folder = None if old is None else plan.folder.parent / work_key(old)
            opened = plan.folder.is_dir() or (old_folder is not None and old_folder.is_dir())
            if opened:
                open_folder(plan)
            listing = shards.finished_in(plan.folder, verify)      # {} while there is no folder
            if old_folder is not None and adopt.adopt(plan, listing, old_folder):
                listing = shards.finished_in(plan.folder, verify)
        # The main rank lists the work folder once; all ranks split what is left.
        # Names only are sent: at 64M images the manifests would be megabytes per rank.
        finished = ctx.broadcast(sorted(listing) if ctx.main else None)
        todo = unfinished(plan, set(finished))
        mine = todo[ctx.rank::ctx.world]
        if ctx.main:
            print(f"sd-generate: {len(plan.layout) - len(todo)} of {len(plan.layout)} shards already finished "
                  f"in {plan.folder}; {len(todo)} to make on {ctx.world} process(es)", file=sys.stderr)
        stats = {"generated": 0, "seconds": 0.0, "load_seconds": 0.0}
        if mine:
            started = time.perf_counter()
            generator = worker.load_generator(params, ctx.device(plan.device), plan.dtype)
            stats["load_seconds"] = time.perf_counter() - started
        if ctx.main and not opened:
            open_folder(plan)
        ctx.barrier()           # the folder and its recipe.json exist before any rank writes a shard
        if mine:
            if ctx.main:
                warn_truncated(generator, plan)
            progress = Progress(ctx, plan, todo)
            started = time.perf_counter()
            try:
                stats["generated"] = worker.build_shards(generator, plan, mine, params, finished, progress.add,
                                                         verify)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise disk_full(params, plan) from None
                raise
            stats["seconds"] = time.perf_counter() - started
            progress.close()
        everyone = ctx.all_gather(stats)      # also the barrier: every shard is finished after it
        if not ctx.main:
            return None
        index = publish(plan, params, out_dir)
        copies = memorisation.check(params.data.train, out_dir, params.generate.work_dir)
        metrics = {**measure(index, everyone), "tflop_per_image": price(params),
                   "memorised_share": copies.get("memorised_share"), "memorisation": copies}
        write_json(metrics_path, {k: metrics[k] for k in HEADLINE})
        if details_path is not None:
            write_json(details_path, metrics)
        return metrics
    finally:
        distributed.stop()


def price(params: Params) -> float | None:
    """TFLOP an image of the configured generator, sampler, steps, guidance and resolution, counted on
    the meta device (module estimates); None for the rehearsal stand-in, which has no model."""
    flops = estimates.count_model_flops(params)
    return None if flops is None else round(flops.per_image / 1e12, 4)


def disk_full(params: Params, plan: Plan) -> UserError:
    left = unfinished(plan, shards.finished_in(plan.folder))
    need = sum(len(s) for s in left) * estimates.bytes_per_image(params, plan)
    return UserError(f"profiles.{params.profile}.generate.work_dir: no space left in {plan.folder}; "
                     f"{len(left)} shards still to make need about {estimates.human_bytes(need)}; free that much "
                     "and run the same command again (finished shards are kept)")


def warn_truncated(generator, plan: Plan, shards_checked: int = 3) -> None:
    """One line saying how many classes' prompts the text encoder truncates (checked on the first shards)."""
    checked = [it for k in range(min(shards_checked, len(plan.layout))) for it in plan.layout[k].items]
    too_long = set(generator.truncated_prompts(sorted({it.prompt for it in checked})))
    over = sorted({it.cls.key for it in checked if it.prompt in too_long})
    if over:
        print(f"note: prompts of {len(over)} of {len(plan.rows)} classes are longer than the text encoder's "
              f"{generator.token_limit} tokens and get truncated, as in Stable Diffusion (e.g. {over[0]})",
              file=sys.stderr)
