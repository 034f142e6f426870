"""The Stable Diffusion generator: loading, scheduler, dtype, and drawing one batch.

SD v1.4 (a Hugging Face id, found in the HF cache or downloaded) and the embedded
tiny model (a local folder) load through the same `load_pipeline` call. Nothing
here knows about classes or shards; `generation` decides what to draw.
"""
from __future__ import annotations

import functools
import importlib.util
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from imagenet_sd.core.errors import UserError
from imagenet_sd.models import hub
from imagenet_sd.models.hub import not_found, offline, short_reason

MARKER = "model_index.json"      # what every diffusers pipeline folder has
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- settings

def resolve_dtype(name: str, device: torch.device, key: str) -> torch.dtype:
    """auto: fp16 on a GPU (half the memory and time), fp32 on a CPU (no fast fp16 kernels)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise UserError(f"params.yaml: {key} = 'fp16' is not supported on CPU; use fp32 or bf16, or run on a GPU")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def scheduler_for(name: str, model_scheduler_config):
    """A fresh sampler built from the checkpoint's scheduler config (schedulers keep state).

    `model` is the checkpoint's default class (PNDM for SD v1.4; the paper does not state its sampler).
    """
    import diffusers
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(model_scheduler_config)
    if name == "dpm-solver++":
        return diffusers.DPMSolverMultistepScheduler.from_config(model_scheduler_config, algorithm_type="dpmsolver++")
    if name == "unipc":          # UniPC (Zhao et al., NeurIPS 2023): good images in 10-20 steps
        return diffusers.UniPCMultistepScheduler.from_config(model_scheduler_config)
    if name == "euler":          # Euler (Karras et al., NeurIPS 2022's sampler in diffusers' form)
        return diffusers.EulerDiscreteScheduler.from_config(model_scheduler_config)
    if name == "lcm":            # LCM's multistep sampler: for latent-consistency models or an LCM-LoRA, 2-8 steps
        return diffusers.LCMScheduler.from_config(model_scheduler_config)
    if name == "model":
        return getattr(diffusers, model_scheduler_config["_class_name"]).from_config(model_scheduler_config)
    raise ValueError(f"unknown scheduler {name!r}")


def set_attention(pipe, name: str) -> None:
    """The attention of the UNet and the VAE: `sdpa` | `math` | `classic` (params.ATTENTION_BACKENDS).

    `sdpa` is diffusers' default (PyTorch picks flash, memory-efficient or math per call);
    `math` holds SDPA to its math kernel inside each attention call, so the choice also
    holds inside a compiled UNet and needs nothing around the pipeline call.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    processors = {"sdpa": AttnProcessor2_0, "math": _math_processor(), "classic": AttnProcessor}
    if name not in processors:
        raise ValueError(f"unknown attention {name!r}")
    for module in (pipe.unet, pipe.vae):
        module.set_attn_processor(processors[name]())


@functools.cache
def _math_processor() -> type:
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class MathAttnProcessor(AttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            with sdpa_kernel(SDPBackend.MATH):
                return super().__call__(*args, **kwargs)
    return MathAttnProcessor


def set_channels_last(pipe, on: bool) -> None:
    """NHWC (channels_last) or the default NCHW layout for the UNet's and VAE's convolutions."""
    memory_format = torch.channels_last if on else torch.contiguous_format
    for module in (pipe.unet, pipe.vae):
        module.to(memory_format=memory_format)


def compile_mode(device: torch.device) -> str:
    # reduce-overhead replays the UNet as a CUDA graph, removing the launch overhead of its
    # ~1000 small kernels a step; CPUs have no graphs, so plain inductor there.
    return "reduce-overhead" if device.type == "cuda" else "default"


def compiled(unet, device: torch.device, mode: str | None = None):
    """torch.compile of the UNet; the work happens at its first call (and again for each new batch size).

    `mode` None is what sd-generate uses (compile_mode); the benchmark may try others.
    """
    return torch.compile(unet, mode=mode or compile_mode(device), fullgraph=True)


def scheduler_config(model: str, local_files_only: bool = False) -> dict:
    """The checkpoint's scheduler config, without loading anything else."""
    from diffusers import DDIMScheduler  # any scheduler class's load_config reads scheduler_config.json
    return DDIMScheduler.load_config(model, subfolder="scheduler", local_files_only=local_files_only)


# --------------------------------------------------------------------------- finding the model

def not_a_pipeline(folder: Path, key: str, reason: str) -> UserError:
    return UserError(
        f"{key} = {str(folder)!r}: not a complete Stable Diffusion pipeline folder ({reason}); "
        f"fill it with StableDiffusionPipeline.save_pretrained, or set {key} to another folder or a Hugging Face id")


def locate(model: str, key: str) -> str:
    """hub.locate for a pipeline: a local folder with model_index.json, or a Hub id."""
    return hub.locate(model, key, MARKER, not_a_pipeline)


def fingerprint(model: str, key: str) -> str:
    """hub.fingerprint of a pipeline: its snapshot's commit, or a local folder's files."""
    return hub.fingerprint(model, key, locate(model, key), MARKER)


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype, *, scheduler: str = "model",
                  safety_checker: bool = False, key: str = "profiles.<profile>.generate.model",
                  attention: str = "sdpa", channels_last: bool = False, compile: bool = False):
    """A StableDiffusionPipeline on `device`, from a local folder or a Hugging Face id via its cache.

    Offline mode (HF_HUB_OFFLINE=1) only looks in the cache, so a missing model fails at once.
    `attention`, `channels_last` and `compile` are generate's speed params (set_attention,
    set_channels_last, compiled); the defaults are diffusers' plain pipeline.
    """
    from diffusers import StableDiffusionPipeline
    source = locate(model, key)
    options = dict(dtype=dtype)
    if not safety_checker:
        options.update(safety_checker=None, requires_safety_checker=False)
    if importlib.util.find_spec("accelerate") is None:
        options["low_cpu_mem_usage"] = False     # what diffusers falls back to anyway, minus its warning
    if not Path(source).is_dir() and offline():
        options["local_files_only"] = True
    try:
        pipe = StableDiffusionPipeline.from_pretrained(source, **options)
    except (OSError, ValueError) as exc:
        # diffusers and huggingface_hub report a missing or incomplete model as OSError
        # (EnvironmentError) subclasses or ValueError.
        if Path(source).is_dir():
            raise not_a_pipeline(Path(source), key, short_reason(exc)) from None
        raise not_found(model, key, short_reason(exc)) from None
    if safety_checker and (pipe.safety_checker is None or pipe.feature_extractor is None):
        raise UserError(f"{key} = {model!r} has no safety_checker/feature_extractor; "
                        "set safety_checker: none, or use a checkpoint that ships one (SD v1.4 does)")
    pipe.scheduler = scheduler_for(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)   # `generation` shows one bar over all images
    if device.type == "cuda":
        # Autotuning picks kernels by timing, which can differ between runs; keep images reproducible.
        torch.backends.cudnn.benchmark = False
    pipe = pipe.to(device)
    set_attention(pipe, attention)
    set_channels_last(pipe, channels_last)
    if compile:
        pipe.unet = compiled(pipe.unet, device)
    return pipe


def load_text_encoder(model: str, key: str = "profiles.<profile>.generate.model"):
    """The checkpoint's CLIP tokenizer and text encoder alone (subfolders tokenizer/, text_encoder/), fp32 on CPU.

    Found like `load_pipeline` finds the whole pipeline (a local folder, or a Hugging Face
    id through its cache; HF_HUB_OFFLINE=1 looks in the cache only), with the same errors.
    The places-backgrounds stage ranks scenes with it for prompt c_hc_bm (module matching).
    """
    from transformers import CLIPTextModel, CLIPTokenizer
    source = locate(model, key)
    options = {}
    if not Path(source).is_dir() and offline():
        options["local_files_only"] = True
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **options)
        encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **options)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise not_a_pipeline(Path(source), key, short_reason(exc)) from None
        raise not_found(model, key, short_reason(exc)) from None
    return tokenizer, encoder.float().eval()


# --------------------------------------------------------------------------- drawing

def draw(pipe, prompts: list[str], seeds: list[int], *, guidance: float, steps: int,
         resolution: int) -> tuple[list[Image.Image], list[bool]]:
    """One pipeline call: an image per (prompt, seed), and whether the safety checker flagged it.

    Each image gets its own CPU generator, so its starting noise is the same on
    every device and whatever else is in the batch.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    verbosity = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    # The pipeline and tokenizer warn about truncated prompts (and flagged images) on
    # every call; `generation` reports both once, as counts.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        out = pipe(prompt=prompts, height=resolution, width=resolution, num_inference_steps=steps,
                   guidance_scale=guidance, output_type="pil",
                   generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
    finally:
        diffusers_logging.set_verbosity(verbosity[0])
        transformers_logging.set_verbosity(verbosity[1])
    flags = getattr(out, "nsfw_content_detected", None) or [False] * len(prompts)
    return list(out.images), [bool(f) for f in flags]


def img2img(pipe):
    """diffusers' img2img pipeline on `pipe`'s own modules (UNet, VAE, text encoder, scheduler,
    safety checker, with their attention, layout and compilation): no second copy of the weights."""
    from diffusers import StableDiffusionImg2ImgPipeline
    guided = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    guided.set_progress_bar_config(disable=True)
    return guided


@contextmanager
def _quiet_libraries():
    """diffusers and transformers at error level only: they warn about truncated prompts (and
    flagged images) on every call, which `generation` reports once, as counts. (`draw` keeps
    its own copy of this: its source is part of every work folder's key.)"""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    verbosity = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity[0])
        transformers_logging.set_verbosity(verbosity[1])


def draw_from(guided, prompts: list[str], seeds: list[int], starts: list[Image.Image], *, strength: float,
              guidance: float, steps: int) -> tuple[list[Image.Image], list[bool]]:
    """Real guidance (He et al., ICLR 2023): one img2img call (`guided`, from `img2img`) whose
    image k starts from `starts[k]` (already at the generation size, see fewshot.init_image),
    encoded by the VAE and noised to `strength` of the schedule; int(steps x strength)
    denoising steps follow. As in `draw`, each image has its own CPU generator (its VAE sample
    and its noise), so it is the same on every device and whatever else is in the batch.
    """
    with _quiet_libraries():
        out = guided(prompt=prompts, image=starts, strength=strength, num_inference_steps=steps,
                     guidance_scale=guidance, output_type="pil",
                     generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
    flags = getattr(out, "nsfw_content_detected", None) or [False] * len(prompts)
    return list(out.images), [bool(f) for f in flags]


def truncated_prompts(pipe, prompts: list[str]) -> list[str]:
    """The prompts the text encoder cuts at its token limit (as SD does)."""
    limit = pipe.tokenizer.model_max_length
    return [p for p in prompts if len(pipe.tokenizer(p, verbose=False).input_ids) > limit]
