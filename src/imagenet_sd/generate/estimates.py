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

import math
from dataclasses import dataclass

import torch

from imagenet_sd.core.paths import DATA

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
    unet_call: float          # one UNet evaluation of the whole (guided) batch for one image
    unet_calls: int           # UNet evaluations per image (the scheduler's timesteps)
    vae_decode: float
    text_encoder: float
    vae_encode: float = 0.0   # real guidance: the real image's encoding

    @property
    def per_image(self) -> float:
        return self.unet_calls * self.unet_call + self.vae_decode + self.text_encoder + self.vae_encode


def _counted(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def count_flops(model: str, resolution: int, steps: int, guidance: float, scheduler=None,
                local_files_only: bool = False, strength: float = 0.0) -> Flops:
    """FLOPs of one image of `model` (a pipeline folder or Hugging Face id; only configs are read).

    Classifier-free guidance (guidance > 1, as diffusers decides) doubles the UNet
    and text-encoder batch. `scheduler` (a diffusers scheduler) gives the number of
    UNet calls; by default the model's own scheduler config. `strength` > 0 (real
    guidance): diffusers' img2img, which encodes the real image and runs the last
    int(steps x strength) steps of the schedule.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from imagenet_sd.models.sd_model import scheduler_config, scheduler_for

    options = dict(local_files_only=local_files_only)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model, subfolder="unet", **options))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model, subfolder="vae", **options))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(model, subfolder="text_encoder", **options))
    if scheduler is None:
        scheduler = scheduler_for("model", scheduler_config(model, local_files_only))
    scheduler.set_timesteps(steps)

    passes = 2 if guidance > 1 else 1
    latent = resolution // 8
    channels = unet.config.in_channels
    tokens = text.config.max_position_embeddings

    def unet_call():
        unet(torch.randn(passes, channels, latent, latent), torch.tensor(10),
             torch.randn(passes, tokens, unet.config.cross_attention_dim))

    calls = len(scheduler.timesteps)
    if strength:        # img2img skips the first steps - int(steps x strength) steps (get_timesteps)
        calls -= (steps - min(int(steps * strength), steps)) * scheduler.order
    return Flops(
        unet_call=_counted(unet_call),
        unet_calls=calls,
        vae_decode=_counted(lambda: vae.decode(torch.randn(1, vae.config.latent_channels, latent, latent))),
        text_encoder=_counted(lambda: text(torch.zeros(passes, tokens, dtype=torch.long))),
        vae_encode=_counted(lambda: vae.encode(torch.randn(1, 3, resolution, resolution))) if strength else 0.0,
    )


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

SHIPPED_CONFIGS = {"CompVis/stable-diffusion-v1-4": "sd-v1-4"}   # data/<folder>: configs, no weights


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
                           local_files_only=local_only, strength=params.init_strength)
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
        f"to make: {left:,} images on {g.processes} process(es), batch {g.batch_size}, "
        f"{sd_model.dtype_name(plan.dtype)} on {plan.device.type}",
        f"disk: {human_bytes(plan.images * per_image)} in all "
        f"({human_bytes(per_image)} an image, {how}); the DVC cache adds a copy unless "
        f"cache.type is hardlink/reflink",
    ]
    flops = count_model_flops(params)
    if flops is None:
        lines.append("compute: none (rehearsal generator: no model, seeded pixels)")
        return lines
    lines.append(f"compute: {flops.per_image / 1e12:.3g} TFLOP an image ({flops.unet_calls} UNet calls of "
                 f"{flops.unet_call / 1e12:.3g} TFLOP + VAE decode {flops.vae_decode / 1e12:.3g})")
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
