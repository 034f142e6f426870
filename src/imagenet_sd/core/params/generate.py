"""The profile's `generate` block (sd-generate) and the top-level choices of the sampler."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imagenet_sd.core.errors import param_error
from imagenet_sd.core.params.reader import DEVICES, Section, keys_of, work_dir_at

DTYPES = ("auto", "fp32", "fp16", "bf16")
SCHEDULERS = ("model", "ddim", "dpm-solver++", "unipc", "euler", "lcm")
# sd-generate's attention: SDPA as PyTorch dispatches it (flash/memory-efficient/math), SDPA held
# to its math kernel, diffusers' classic processor (baddbmm + softmax); see sd_model.set_attention.
ATTENTION_BACKENDS = ("sdpa", "math", "classic")
SAFETY_POLICIES = ("none", "keep", "regenerate")   # not "off": YAML reads that as false


@dataclass(frozen=True)
class GenerateParams:
    model: str
    resolution: int
    dtype: str
    batch_size: int
    processes: int
    images_per_shard: int
    jpeg_quality: int
    stored_size: int | None       # None: store images at `resolution`
    work_dir: Path
    device: str
    # Speed only: the same pictures up to float rounding (like batch_size), so they stay out
    # of the work folder's key. All three can still change the JPEG bytes: other kernels round
    # the last float bit differently, which can move a pixel a grey level (docs/parameters.md#speed-settings).
    attention: str = "sdpa"       # one of ATTENTION_BACKENDS
    channels_last: bool = False   # NHWC layout of the UNet's and VAE's weights
    compile: bool = False         # torch.compile of the UNet (sd_model.compile_mode picks the mode)
    # prompt le: local folder or Hugging Face id of the T5 that writes each image's sentence (module language)
    language_model: str = ""
    # The family's own arguments and the model's add-ons (models/families.py; docs/generating.md#generators).
    # They decide the pictures, so they are in the work folder's key (only when set: 0 and '' leave it as it was).
    max_sequence_length: int = 0  # T5 tokens the prompt may take (SD3, PixArt-Sigma, FLUX); 0: the pipeline's default
    lora: str = ""                # a LoRA (.safetensors file, folder or Hub id) fused into the weights; '': none
    lora_scale: float = 1.0
    deepcache_interval: int = 0   # UNets: the deep blocks run every N steps, their features reused between (DeepCache); 0: off
    token_merging: float = 0.0    # UNets: ratio of tokens merged before each attention block (ToMe for SD); 0: off


def parse_generate(s: Section) -> GenerateParams:
    s.no_unknown_keys(keys_of(GenerateParams))
    # Whole latent tokens: a multiple of the model's VAE scale factor x patch, checked against the
    # model's own configs when sd-generate plans (families.check_resolution).
    resolution = s.number("resolution", int, low=8)
    stored_size = s.number("stored_size", int, low=0)
    if stored_size > resolution:
        raise param_error(s.path("stored_size"), stored_size, f"0 (keep {resolution} px) or a size <= resolution")
    return GenerateParams(
        model=s.text("model"),
        resolution=resolution,
        dtype=s.choice("dtype", DTYPES),
        batch_size=s.number("batch_size", int, low=1),
        processes=s.number("processes", int, low=1),
        images_per_shard=s.number("images_per_shard", int, low=1),
        jpeg_quality=s.number("jpeg_quality", int, low=1, high=100),
        stored_size=stored_size or None,
        work_dir=work_dir_at(s),
        device=s.choice("device", DEVICES),
        attention=s.choice("attention", ATTENTION_BACKENDS),
        channels_last=s.flag("channels_last"),
        compile=s.flag("compile"),
        language_model=_language_model(s),
        max_sequence_length=s.number("max_sequence_length", int, low=0),
        lora=s.text("lora").strip(),
        lora_scale=s.number("lora_scale", float),
        deepcache_interval=_deepcache_interval(s),
        token_merging=s.number("token_merging", float, low=0, high=0.9),
    )


def _deepcache_interval(s: Section) -> int:
    value = s.number("deepcache_interval", int, low=0)
    if value == 1:
        raise param_error(s.path("deepcache_interval"), value, "0 (off) or N >= 2 (the full UNet every N steps)")
    return value


def _language_model(s: Section) -> str:
    """The T5 of prompt le; whether it exists is checked by the stage that loads it (language.locate)."""
    value = s.text("language_model")
    if not value.strip():
        raise param_error(s.path("language_model"), value, "a local folder or Hugging Face id of a T5 model, "
                          "e.g. models/tiny-t5 (embedded) or mrm8488/t5-base-finetuned-common_gen (He et al.)")
    return value
