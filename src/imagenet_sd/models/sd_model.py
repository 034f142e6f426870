"""The diffusers generator: loading any text-to-image family, scheduler, dtype, and drawing one batch.

SD v1.4 (a Hugging Face id, found in the HF cache or downloaded), the embedded tiny
models (local folders) and every family of `families.FAMILIES` load through the same
`load_pipeline` call; the pipeline class is the checkpoint's own. Nothing here knows
about shards; `generation` decides what to draw. A model trained here on a class set (the digits
generator) lists its classes in `TRAINED_CLASSES`, read by `trained_classes`.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from imagenet_sd.core.errors import UserError
from imagenet_sd.models import families, hub
from imagenet_sd.models.hub import not_found, offline, short_reason

MARKER = "model_index.json"      # what every diffusers pipeline folder has
LORA_FILE = "pytorch_lora_weights.safetensors"   # diffusers' name for a LoRA in a folder or Hub repository
TRAINED_CLASSES = "trained_classes.json"   # {"classes": [wnid, ...]}: a model that knows only these classes
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
    if name == "sdpa" and not hasattr(pipe, "unet"):
        return      # transformer families keep their own processors (SDPA inside, with their rotary/joint parts)
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
    for module in (getattr(pipe, "unet", None), pipe.vae):     # a transformer's tokens have no channel layout
        if module is not None:
            module.to(memory_format=memory_format)


def compile_mode(device: torch.device) -> str:
    # reduce-overhead replays the UNet as a CUDA graph, removing the launch overhead of its
    # ~1000 small kernels a step; CPUs have no graphs, so plain inductor there.
    return "reduce-overhead" if device.type == "cuda" else "default"


def compiled(denoiser, device: torch.device, mode: str | None = None):
    """torch.compile of the UNet or transformer; the work happens at its first call (and again for each
    new batch size). `mode` None is what sd-generate uses (compile_mode); the benchmark may try others.
    """
    return torch.compile(denoiser, mode=mode or compile_mode(device), fullgraph=True)


def scheduler_config(model: str, local_files_only: bool = False) -> dict:
    """The checkpoint's scheduler config, without loading anything else."""
    from diffusers import DDIMScheduler  # any scheduler class's load_config reads scheduler_config.json
    return DDIMScheduler.load_config(model, subfolder="scheduler", local_files_only=local_files_only)


# --------------------------------------------------------------------------- finding the model

def not_a_pipeline(folder: Path, key: str, reason: str) -> UserError:
    return UserError(
        f"{key} = {str(folder)!r}: not a complete diffusers pipeline folder ({reason}); "
        f"fill it with the pipeline's save_pretrained, or set {key} to another folder or a Hugging Face id")


def locate(model: str, key: str) -> str:
    """hub.locate for a pipeline: a local folder with model_index.json, or a Hub id."""
    return hub.locate(model, key, MARKER, not_a_pipeline)


def fingerprint(model: str, key: str) -> str:
    """hub.fingerprint of a pipeline: its snapshot's commit, or a local folder's files."""
    return hub.fingerprint(model, key, locate(model, key), MARKER)


def trained_classes(source: str) -> list[str] | None:
    """The class keys a local model folder says it was trained on (`TRAINED_CLASSES`); None: any text."""
    path = Path(source) / TRAINED_CLASSES
    if not path.is_file():
        return None
    return list(json.loads(path.read_text())["classes"])


def vae_scale_factor(source: str, local_files_only: bool = False) -> int:
    """Pixels a side of one latent cell: 2 ** (VAE blocks - 1), as diffusers' pipelines compute it
    (8 for SD's VAE, 1 for the digits generator's one-block VAE, 32 for a DC-AE's six encoder blocks);
    8 where the checkpoint has no VAE config."""
    from diffusers import AutoencoderKL
    try:
        config = AutoencoderKL.load_config(source, subfolder="vae", local_files_only=local_files_only)
    except (OSError, ValueError):
        return 8
    return 2 ** (len(vae_blocks(config) or (0,) * 4) - 1)


def vae_blocks(config) -> tuple | None:
    """A VAE config's encoder blocks (a KL autoencoder's block_out_channels, a DC-AE's encoder_block_out_channels)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return get("block_out_channels") or get("encoder_block_out_channels")


def model_index(source: str) -> dict:
    """The model_index.json of a located checkpoint (no weights read)."""
    return families.read_model_index(source, local_files_only=not Path(source).is_dir() and offline())


def family(model: str, key: str) -> families.Family:
    """The family of `model` (families.FAMILIES) from its model_index.json; one-line errors otherwise."""
    source = locate(model, key)
    try:
        index = model_index(source)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise not_a_pipeline(Path(source), key, short_reason(exc)) from None
        raise not_found(model, key, short_reason(exc)) from None
    return families.family_of(index, key, model)


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype, *, scheduler: str = "model",
                  safety_checker: bool = False, key: str = "profiles.<profile>.generate.model",
                  attention: str = "sdpa", channels_last: bool = False, compile: bool = False,
                  lora: str = "", lora_scale: float = 1.0, deepcache_interval: int = 0, token_merging: float = 0.0):
    """The checkpoint's own text-to-image pipeline (families.FAMILIES) on `device`, from a local folder
    or a Hugging Face id via its cache.

    Offline mode (HF_HUB_OFFLINE=1) only looks in the cache, so a missing model fails at once.
    `attention`, `channels_last` and `compile` are generate's speed params (set_attention,
    set_channels_last, compiled); the defaults are diffusers' plain pipeline. `lora`: a LoRA
    (file, folder or Hub id) fused into the weights at `lora_scale` (load_lora). `deepcache_interval`
    and `token_merging`: the UNet speed-ups that change the pixels a little (speed_ups).
    """
    from diffusers import DiffusionPipeline
    source = locate(model, key)
    kind = family(model, key)
    if safety_checker and not kind.safety_checker:
        raise UserError(f"{key} = {model!r} ({kind.name}) has no safety checker; set safety_checker: none")
    if attention != "sdpa" and kind.denoiser != "unet":
        raise UserError(f"{key.rsplit('.', 1)[0]}.attention = {attention!r} applies to UNet models; {model!r} "
                        f"({kind.name}) keeps its own attention: set attention: sdpa")
    options = dict(dtype=dtype)
    if kind.safety_checker and not safety_checker:
        options.update(safety_checker=None, requires_safety_checker=False)
    if importlib.util.find_spec("accelerate") is None:
        options["low_cpu_mem_usage"] = False     # what diffusers falls back to anyway, minus its warning
    if not Path(source).is_dir() and offline():
        options["local_files_only"] = True
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **options)
    except (OSError, ValueError) as exc:
        # diffusers and huggingface_hub report a missing or incomplete model as OSError
        # (EnvironmentError) subclasses or ValueError.
        if Path(source).is_dir():
            raise not_a_pipeline(Path(source), key, short_reason(exc)) from None
        raise not_found(model, key, short_reason(exc)) from None
    if safety_checker and (pipe.safety_checker is None or pipe.feature_extractor is None):
        raise UserError(f"{key} = {model!r} has no safety_checker/feature_extractor; "
                        "set safety_checker: none, or use a checkpoint that ships one (SD v1.4 does)")
    if lora:
        load_lora(pipe, lora, lora_scale, key.rsplit(".", 1)[0] + ".lora")
    pipe.scheduler = scheduler_for(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)   # `generation` shows one bar over all images
    if device.type == "cuda":
        # Autotuning picks kernels by timing, which can differ between runs; keep images reproducible.
        torch.backends.cudnn.benchmark = False
    pipe = pipe.to(device)
    set_attention(pipe, attention)
    set_channels_last(pipe, channels_last)
    if compile and (deepcache_interval or token_merging):
        raise UserError(f"{key.rsplit('.', 1)[0]}: compile works on the plain UNet; set compile: false to use "
                        "deepcache_interval or token_merging (they patch the UNet's blocks)")
    if compile:
        setattr(pipe, kind.denoiser, compiled(getattr(pipe, kind.denoiser), device))
    speed_ups(pipe, deepcache_interval, token_merging)
    return pipe


def speed_ups(pipe, deepcache_interval: int, token_merging: float) -> None:
    """Training-free UNet speed-ups, through their authors' packages.

    DeepCache (Ma et al., CVPR 2024): on all but every `deepcache_interval`-th step, the UNet runs
    only its outermost down and up blocks and reuses the deeper blocks' cached output (branch 0,
    uniform steps). ToMe for SD (Bolya & Hoffman, 2023): each attention block merges
    `token_merging` of its tokens into their most similar ones before attending, and unmerges
    after; its random choice of merge targets is off, so every image stays a function of its seed.
    """
    if deepcache_interval:
        from DeepCache import DeepCacheSDHelper
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=deepcache_interval, cache_branch_id=0)
        helper.enable()
        pipe.deepcache = helper          # kept with the pipeline: it holds the cached features
    if token_merging:
        import tomesd
        tomesd.apply_patch(pipe.unet, ratio=token_merging, use_rand=False)


def lora_source(lora: str, key: str) -> tuple[str, dict]:
    """(folder or Hub id, load_lora_weights options) of a LoRA given as a .safetensors file, a folder or an id."""
    path = hub.local_path(lora)
    if path.is_file():
        return str(path.parent), {"weight_name": path.name}
    if path.is_dir() or (hub.looks_like_hub_id(lora) and hub.path_reason(lora) is None):   # models/x: a path
        return str(path) if path.is_dir() else lora, {}
    raise UserError(f"{key} = {lora!r}: no such file or folder, and not a Hugging Face id; give a LoRA's "
                    ".safetensors file, its folder or its Hub id, or '' for none")


def lora_fingerprint(lora: str, key: str) -> str:
    """What identifies a LoRA's weights: a file's sha256 (read in full: LoRAs are megabytes), a folder's
    or Hub snapshot's as hub.fingerprint gives them (the Hub's by diffusers' default LoRA file name)."""
    source, options = lora_source(lora, key)
    if "weight_name" in options:
        digest = hashlib.sha256()
        with open(Path(source) / options["weight_name"], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:16]
    return hub.fingerprint(lora, key, source, LORA_FILE)


def load_lora(pipe, lora: str, scale: float, key: str) -> None:
    """Fuse a LoRA (e.g. LCM-LoRA) into the pipeline's weights at `scale` (diffusers' PEFT loader)."""
    if importlib.util.find_spec("peft") is None:
        raise UserError(f"{key}: loading a LoRA needs the peft package; pip install peft (requirements.txt has it)")
    source, options = lora_source(lora, key)
    if not Path(source).is_dir() and offline():
        options["local_files_only"] = True
    try:
        pipe.load_lora_weights(source, adapter_name="lora", **options)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{key} = {lora!r}: not a LoRA this pipeline can load ({short_reason(exc)})") from None
    pipe.fuse_lora(lora_scale=scale, adapter_names=["lora"])
    pipe.unload_lora_weights()       # the fused weights stay; the adapter layers go (no per-step overhead)


def load_text_encoder(model: str, key: str = "profiles.<profile>.generate.model"):
    """The checkpoint's CLIP tokenizer and text encoder alone (subfolders tokenizer/, text_encoder/), fp32 on CPU.

    Found like `load_pipeline` finds the whole pipeline (a local folder, or a Hugging Face
    id through its cache; HF_HUB_OFFLINE=1 looks in the cache only), with the same errors.
    The places-backgrounds stage ranks scenes with it for prompt c_hc_bm (module matching).
    """
    from transformers import CLIPTextModel, CLIPTokenizer
    source = locate(model, key)
    encoder_class = (model_index(source).get("text_encoder") or [None, None])[1]
    if encoder_class is not None and encoder_class not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise UserError(f"{key} = {model!r}: its text_encoder is {encoder_class}, not a CLIP text encoder; "
                        "matching scenes to classes (prompt c_hc_bm) needs the CLIP of SD, SDXL, SD3 or FLUX")
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
         resolution: int, **options) -> tuple[list[Image.Image], list[bool]]:
    """One pipeline call: an image per (prompt, seed), and whether the safety checker flagged it.

    Each image gets its own CPU generator, so its starting noise is the same on
    every device and whatever else is in the batch. `options`: the family's own arguments
    (families.CallSettings.options: negative prompt, max_sequence_length, fixed ones).
    """
    with _quiet_libraries():
        out = pipe(prompt=prompts, height=resolution, width=resolution, num_inference_steps=steps,
                   guidance_scale=guidance, output_type="pil",
                   generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **options)
    flags = getattr(out, "nsfw_content_detected", None) or [False] * len(prompts)
    return list(out.images), [bool(f) for f in flags]


def img2img(pipe):
    """The family's image-to-image pipeline on `pipe`'s own modules (denoiser, VAE, text encoders,
    scheduler, safety checker, with their attention, layout and compilation): no second copy of the
    weights. The caller has checked that the family has one (families.check_img2img)."""
    from diffusers import AutoPipelineForImage2Image
    guided = AutoPipelineForImage2Image.from_pipe(pipe)
    guided.set_progress_bar_config(disable=True)
    return guided


@contextmanager
def _quiet_libraries():
    """diffusers and transformers at error level only: they warn about truncated prompts (and
    flagged images) on every call, which `generation` reports once, as counts."""
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
              guidance: float, steps: int, resolution: int, **options) -> tuple[list[Image.Image], list[bool]]:
    """Real guidance (He et al., ICLR 2023): one img2img call (`guided`, from `img2img`) whose
    image k starts from `starts[k]` (already at the generation size, see fewshot.init_image),
    encoded by the VAE and noised to `strength` of the schedule; int(steps x strength)
    denoising steps follow, at `resolution` (the starts' size). As in `draw`, each image has its own CPU generator (its VAE sample
    and its noise), so it is the same on every device and whatever else is in the batch.
    """
    options = {k: v for k, v in options.items() if k != "use_resolution_binning"}   # text-to-image only
    if "height" in inspect.signature(guided.__call__).parameters:
        # SD3's and FLUX's img2img draw at their default size unless told, not at the start image's.
        options.update(height=resolution, width=resolution)
    with _quiet_libraries():
        out = guided(prompt=prompts, image=starts, strength=strength, num_inference_steps=steps,
                     guidance_scale=guidance, output_type="pil",
                     generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **options)
    flags = getattr(out, "nsfw_content_detected", None) or [False] * len(prompts)
    return list(out.images), [bool(f) for f in flags]


def prompt_tokenizer(pipe, kind: families.Family, max_sequence_length: int | None):
    """(tokenizer, token limit) that decides what of a prompt the model reads: the T5's at
    max_sequence_length where the family has one, else CLIP's 77."""
    if kind.long_tokenizer is not None and max_sequence_length is not None:
        return getattr(pipe, kind.long_tokenizer), max_sequence_length
    return pipe.tokenizer, pipe.tokenizer.model_max_length


def truncated_prompts(tokenizer, limit: int, prompts: list[str]) -> list[str]:
    """The prompts the text encoder cuts at its token limit (as SD does)."""
    return [p for p in prompts if len(tokenizer(p, verbose=False).input_ids) > limit]
