"""What a generation run will cost before it runs: FLOPs an image, disk, GPU-hours.

FLOPs are counted, not assumed: the model's own UNet, VAE and text encoder are
built from their configs on PyTorch's "meta" device (shapes only, no weights,
no memory) and run once under `torch.utils.flop_counter.FlopCounterMode`. For
SD v1.4 at 512 px with guidance this gives 1.61 TFLOP a UNet call; with the
model's PNDM scheduler (51 UNet calls for 50 steps) 84.5 TFLOP an image, with
DDIM (50 calls) 82.9, in line with the 83-87 TFLOP of the analytic count in
../shared/reference/README.md.

GPU-hours are FLOPs divided by two reference rates (see RATES); disk is a rough
bytes-per-pixel model of JPEG until shards exist to measure.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from imagenet_sd.core.paths import DATA
from imagenet_sd.models import families

# Sustained FLOP/s used to turn FLOPs into GPU-hours, with where each comes from.
RATES = {
    # diffusers' documented SD 1.5 fp16 rate on an A100 at batch 16 (default PNDM, 50 steps):
    # 0.97 img/s of 84.5 TFLOP.
    "A100, diffusers fp16 batch 16": 0.97 * 84.5e12,
    # This project's target: 40% of the ~790 TFLOP/s dense bf16 matmul rate of an H100.
    "H100 at the 40% target": 0.40 * 790e12,
}

# Rough JPEG size of a photo-like image, bytes per pixel by quality (typical libjpeg
# 4:2:0 figures); only used until the work folder holds shards to measure.
_JPEG_BYTES_PER_PIXEL = ((50, 0.07), (75, 0.10), (90, 0.18), (95, 0.28), (100, 0.75))


@dataclass(frozen=True)
class Flops:
    unet_call: float          # one denoiser (UNet or transformer) evaluation of the whole (guided) batch for one image
    unet_calls: int           # full denoiser evaluations per image (the scheduler's timesteps)
    vae_decode: float
    text_encoder: float       # every text encoder of the family, at its token count
    vae_encode: float = 0.0   # real guidance: the real image's encoding
    cached_call: float = 0.0  # DeepCache: an evaluation that reuses the deep blocks' cached features
    cached_calls: int = 0

    @property
    def per_image(self) -> float:
        return (self.unet_calls * self.unet_call + self.cached_calls * self.cached_call + self.vae_decode
                + self.text_encoder + self.vae_encode)


def _counted(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _config(index: dict, name: str, model: str, options: dict):
    """The config of pipeline component `name`: a dict (diffusers) or a PretrainedConfig (transformers)."""
    import diffusers
    import transformers
    library, class_name = index[name]
    if library == "diffusers":
        return dict(getattr(diffusers, class_name).load_config(model, subfolder=name, **options))
    return transformers.AutoConfig.from_pretrained(model, subfolder=name, **options)


def _build(index: dict, name: str, config):
    """Component `name` built from its config (on the caller's device: meta, so no weights)."""
    import diffusers
    import transformers
    library, class_name = index[name]
    if library == "diffusers":
        return getattr(diffusers, class_name).from_config(config)
    return getattr(transformers, class_name)(config)


def _timesteps(scheduler, steps: int) -> int:
    try:
        scheduler.set_timesteps(steps)
    except ValueError:          # flow matching with dynamic shifting wants the image's shift; the count does not
        scheduler.set_timesteps(steps, mu=1.0)
    return len(scheduler.timesteps)


def count_flops(model: str, resolution: int, steps: int, guidance: float, scheduler=None,
                local_files_only: bool = False, strength: float = 0.0, max_sequence_length: int | None = None,
                deepcache_interval: int = 0, token_merging: float = 0.0) -> Flops:
    """FLOPs of one image of `model` (a pipeline folder or Hugging Face id of any family of
    models/families/; only configs are read).

    Classifier-free guidance (guidance > 1 in a family that has it) doubles the denoiser and
    text-encoder batch. `scheduler` (a diffusers scheduler) gives the number of denoiser
    calls; by default the model's own scheduler config. `strength` > 0 (real guidance):
    diffusers' img2img, which encodes the real image and runs the last int(steps x strength)
    steps of the schedule. `max_sequence_length`: the T5's tokens (None: the pipeline's
    default). `deepcache_interval` and `token_merging`: the UNet speed-ups (sd_model.speed_ups),
    counted by running them.
    """
    from imagenet_sd.models.sd_model import scheduler_config, scheduler_for

    options = dict(local_files_only=local_files_only)
    index = families.read_model_index(model, local_files_only)
    family = families.family_of(index, "model", model)
    sequence = max_sequence_length or families.default_sequence_length(family)
    encoders = [name for name in sorted(index) if name.startswith("text_encoder") and index[name][1]]
    configs = {name: _config(index, name, model, options) for name in (family.denoiser, "vae", *encoders)}
    if scheduler is None:
        scheduler = scheduler_for("model", scheduler_config(model, local_files_only))
    calls = _timesteps(scheduler, steps)
    if strength:        # img2img skips the first steps - int(steps x strength) steps (get_timesteps)
        calls -= (steps - min(int(steps * strength), steps)) * scheduler.order
    passes = 2 if family.classifier_free and guidance > 1 else 1
    # Counting runs every module in Python under the counter (about a second for SD v1, several for
    # SDXL's configs), so a process counts a configuration once: what decides the figures is the
    # components' configs and these shapes, not where the model lies or the sampler.
    key = (family.name, json.dumps({name: [index[name], c if isinstance(c, dict) else c.to_dict()]
                                    for name, c in configs.items()}, sort_keys=True, default=str),
           resolution, passes, sequence, bool(strength), min(deepcache_interval, 2), token_merging)
    if key not in _PER_CALL:
        _PER_CALL[key] = _count_calls(family, index, configs, encoders, resolution, passes, sequence, bool(strength),
                                      deepcache_interval, token_merging)
    full, cached, vae_decode, text_encoder, vae_encode = _PER_CALL[key]
    cached_calls = calls - math.ceil(calls / deepcache_interval) if deepcache_interval else 0
    return Flops(unet_call=full, unet_calls=calls - cached_calls, vae_decode=vae_decode, text_encoder=text_encoder,
                 vae_encode=vae_encode, cached_call=cached, cached_calls=cached_calls)


_PER_CALL: dict[tuple, tuple[float, float, float, float, float]] = {}


def _count_calls(family, index: dict, configs: dict, encoders: list[str], resolution: int, passes: int,
                 sequence: int, encode: bool, deepcache_interval: int, token_merging: float) -> tuple:
    """(full denoiser call, cached call, VAE decode, text encoders, VAE encode) of one image, counted."""
    from imagenet_sd.models.sd_model import speed_ups, vae_blocks

    with torch.device("meta"):
        denoiser = _build(index, family.denoiser, configs[family.denoiser])
        vae = _build(index, "vae", configs["vae"])
        texts = [_build(index, name, configs[name]) for name in encoders]
    latent = resolution // 2 ** (len(vae_blocks(vae.config)) - 1)

    # The encoder of the family's long tokenizer (a T5, SANA's Gemma) reads max_sequence_length; CLIP its 77.
    long_encoder = family.long_tokenizer and family.long_tokenizer.replace("tokenizer", "text_encoder")

    def tokens(name: str, encoder) -> int:
        return sequence if name == long_encoder else encoder.config.max_position_embeddings

    # The speed-ups patch a pipeline's UNet and read its scheduler's timesteps: a stand-in holds both.
    # At interval 2, the call at timestep 10 is a full one while 10 is step 0, and a cached one at step 1.
    pipe = SimpleNamespace(unet=denoiser, scheduler=SimpleNamespace(timesteps=[10, 9]))
    speed_ups(pipe, min(deepcache_interval, 2), token_merging)
    call = family.denoiser_call(denoiser, passes, latent, sequence)   # the family module's (families/)
    full, cached = _counted(call), 0.0
    if deepcache_interval:       # every step but each interval-th reuses the deep features
        pipe.scheduler.timesteps = [11, 10]
        cached = _counted(call)
    return (full, cached,
            _counted(lambda: vae.decode(torch.randn(1, vae.config.latent_channels, latent, latent))),
            sum(_counted(lambda e=e, n=n: e(torch.zeros(passes, tokens(n, e), dtype=torch.long)))
                for n, e in zip(encoders, texts)),
            _counted(lambda: vae.encode(torch.randn(1, 3, resolution, resolution))) if encode else 0.0)


def jpeg_bytes_per_image(pixels: int, quality: int) -> float:
    """Rough JPEG size of one photo-like image of `pixels` pixels (see _JPEG_BYTES_PER_PIXEL)."""
    table = _JPEG_BYTES_PER_PIXEL
    if quality <= table[0][0]:
        return pixels * table[0][1]
    for (q0, b0), (q1, b1) in zip(table, table[1:]):
        if quality <= q1:
            return pixels * (b0 + (b1 - b0) * (quality - q0) / (q1 - q0))
    return pixels * table[-1][1]


def gpu_hours(images: int, flops_per_image: float) -> dict[str, float]:
    """GPU-hours for `images` images at each reference rate in RATES."""
    return {name: images * flops_per_image / rate / 3600 for name, rate in RATES.items()}


def human_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    units = ("B", "KB", "MB", "GB", "TB", "PB")
    power = min(int(math.log(n, 1000)), len(units) - 1)
    return f"{n / 1000 ** power:.3g} {units[power]}"


# --------------------------------------------------------------------------- the dry run

# Hub id -> data/<folder>: the real checkpoints' configs, no weights (each folder's SOURCE.md says
# where from), as each family (models/families/) lists them.
SHIPPED_CONFIGS = {hub_id: folder for family in families.FAMILIES.values() for hub_id, folder in family.shipped}


def config_source(model: str, key: str) -> tuple[str, bool]:
    """Where the model's configs are read from for a FLOP count, and whether only locally.

    A login node has neither the weights nor a GPU: for SD v1.4 the configs this
    repository ships (data/sd-v1-4) are enough to count its FLOPs.
    """
    from pathlib import Path

    from imagenet_sd.models import hub, sd_model
    try:
        source = sd_model.locate(model, key)
        offline = not Path(source).is_dir() and hub.offline()
        sd_model.scheduler_config(source, offline)
        return source, offline
    except Exception:  # noqa: BLE001  (not found: UserError, OSError or any of huggingface_hub's errors)
        if model not in SHIPPED_CONFIGS:
            raise
        return str(DATA / SHIPPED_CONFIGS[model]), True


def count_model_flops(params) -> Flops | None:
    """FLOPs of one image of the configured generator; None for the rehearsal stand-in (no model)."""
    from imagenet_sd.models import hub, rehearsal, sd_model
    g, key = params.generate, f"profiles.{params.profile}.generate.model"
    if rehearsal.is_rehearsal(g.model):
        return None
    source, local_only = config_source(g.model, key)
    try:
        scheduler = sd_model.scheduler_for(params.scheduler, sd_model.scheduler_config(source, local_only))
        return count_flops(source, g.resolution, params.steps, params.guidance, scheduler=scheduler,
                           local_files_only=local_only, strength=params.init_strength,
                           max_sequence_length=g.max_sequence_length or None,
                           deepcache_interval=g.deepcache_interval, token_merging=g.token_merging)
    except (OSError, ValueError) as exc:
        raise hub.not_found(g.model, key, " ".join(str(exc).split())[:160]) from None


def bytes_per_image(params, plan, manifests: list[dict] | None = None) -> float:
    """Bytes of one stored image: measured on finished shards when there are any, else the rough model."""
    if manifests is None:
        from imagenet_sd.datasets import shards
        manifests = list(shards.finished_in(plan.folder).values()) if plan.folder else []
    images = sum(m["images"] for m in manifests)
    if images:
        return sum(m["bytes"] for m in manifests) / images
    side = params.generate.stored_size or params.generate.resolution
    return jpeg_bytes_per_image(side * side, params.generate.jpeg_quality)


def describe(params, plan, finished: dict[str, dict] | None = None) -> list[str]:
    """The dry run: images, shards, disk and GPU-hours, from counts, finished shards and a FLOP count.

    `finished` is shards.finished_in's listing of the work folder, when the caller has it.
    """
    from imagenet_sd.datasets import shards
    from imagenet_sd.models import sd_model
    g = params.generate
    if finished is None:
        finished = shards.finished_in(plan.folder) if plan.folder else {}
    manifests = [finished[s.file_name] for s in plan.layout if s.file_name in finished]
    left = plan.images - sum(m["images"] for m in manifests)
    counts = plan.counts.values()
    per_class = plan.layout.per_class
    per_image = bytes_per_image(params, plan, manifests)
    how = ("measured on the finished shards" if manifests
           else f"rough estimate for JPEG quality {g.jpeg_quality}")
    where = plan.folder or "the work folder (unknown until the weights are found)"
    side = g.stored_size or g.resolution
    held = f" + {params.train.holdout_per_class} held out" if params.train.holdout_per_class else ""
    lines = [
        f"images: {plan.images:,} of {len(plan.rows)} classes ({min(counts)} to {max(counts)} a class = "
        f"real x scale {params.scale:g}{held}), {side} px JPEG",
        f"shards: {len(plan.layout):,} of up to {per_class * len(plan.rows):,} images ({per_class} a class); "
        f"{len(manifests)} already finished in {where}",
        f"to make: {left:,} images on "
        + (f"{params.slurm.tasks} Slurm task(s)" if params.launcher == "slurm" else f"{g.processes} process(es)")
        + f", batch {g.batch_size}, "
        f"{sd_model.dtype_name(plan.dtype)} on {plan.device.type}",
        f"disk: {human_bytes(plan.images * per_image)} in all "
        f"({human_bytes(per_image)} an image, {how}); the DVC cache adds a copy unless "
        f"cache.type is hardlink/reflink",
    ]
    flops = count_model_flops(params)
    if flops is None:
        lines.append("compute: none (rehearsal generator: no model, seeded pixels)")
        return lines
    cached = (f" + {flops.cached_calls} DeepCache calls of {flops.cached_call / 1e12:.3g}"
              if flops.cached_calls else "")
    lines.append(f"compute: {flops.per_image / 1e12:.3g} TFLOP an image ({flops.unet_calls} denoiser calls of "
                 f"{flops.unet_call / 1e12:.3g} TFLOP{cached} + text encoders {flops.text_encoder / 1e12:.3g} "
                 f"+ VAE decode {flops.vae_decode / 1e12:.3g}); {plan.images * flops.per_image / 1e15:,.4g} PFLOP "
                 "for the whole dataset")
    if params.init_strength:
        lines.append(f"real guidance: every image starts from one of its class's {params.shots} real images, noised "
                     f"to strength {params.init_strength:g} (+ VAE encode {flops.vae_encode / 1e12:.3g} TFLOP)")
    for name, hours in gpu_hours(left, flops.per_image).items():
        lines.append(f"GPU-hours left: {hours:,.3g} at {name}")
    rate = [(m["generated"], m["seconds"]) for m in manifests if m["generated"]]
    if rate:
        per_second = sum(n for n, _ in rate) / sum(t for _, t in rate)
        lines.append(f"GPU-hours left at the rate measured in this work folder ({per_second:.3g} img/s a process): "
                     f"{left / per_second / 3600:,.2f}")
    return lines
