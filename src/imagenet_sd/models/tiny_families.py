"""Tiny random-weight versions of the other generator families: SDXL, SD3, PixArt-Sigma, FLUX.1.

Each is its family's diffusers pipeline with the real architecture's component classes
(UNet with SDXL's text-time conditioning, SD3's MMDiT, PixArt's DiT with adaLN-single,
FLUX's double- and single-stream transformer; their two or three text encoders; a 4- or
16-channel KL autoencoder that downsamples by 8) at a size that draws 64 px images on
two CPU cores. Like the tiny SD (module embedded), they exist so that every family runs
through sd-generate, the shards and training without downloads; their images are noise.

Tokenizers are the embedded ones: CLIP's byte-level BPE without merges (embedded) and the
written SentencePiece model of the tiny T5 (tiny_t5). Weights come from fixed seeds, so
every build is the same. Schedulers are the real checkpoints' configs where data/ ships
them (families' folders in data/, SOURCE.md there), else the family's scheduler class.

Build: `python -m imagenet_sd.models.tiny_families models` (the embedded-assets stage runs it)
-> models/tiny-sdxl, models/tiny-sd3, models/tiny-pixart-sigma, models/tiny-flux.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from imagenet_sd.core.paths import DATA
from imagenet_sd.models import embedded, tiny_t5

VERSION = 1
MARKER = embedded.MARKER             # the same marker file as the tiny SD: "an embedded model, version N"
HIDDEN = embedded.TEXT_HIDDEN        # 32: every tiny text encoder's width
SEEDS = {"sdxl": 11, "sd3": 12, "pixart-sigma": 13, "flux": 14}   # beside embedded.SEEDS, tiny_clip's and tiny_t5's
# The real checkpoints' scheduler configs, shipped in data/<folder>/scheduler (facts; see their SOURCE.md).
SCHEDULER_CONFIGS = {"sdxl": "sdxl-base-1.0", "sd3": "sd3-medium", "pixart-sigma": "pixart-sigma-xl-2-1024-ms",
                     "flux": "flux1-schnell"}
FOLDERS = {name: f"tiny-{name}" for name in SEEDS}


def _clip(workdir: Path, name: str, projection: bool = False):
    """(tokenizer, CLIP text encoder) of width HIDDEN; `projection`: with the pooled projection SDXL and SD3 use."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    folder = workdir / name
    folder.mkdir()
    tokenizer = embedded._tokenizer(folder)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=embedded.MAX_TOKENS, hidden_act="quick_gelu",
        projection_dim=HIDDEN, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return tokenizer, (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(workdir: Path, d_model: int):
    """(tokenizer, T5 encoder) of width `d_model`, with the tiny T5's SentencePiece vocabulary."""
    from transformers import T5Config, T5EncoderModel
    tokenizer = tiny_t5.load_tokenizer(workdir)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    return tokenizer, T5EncoderModel(config).eval()


def _vae(latent_channels: int, scaling: float, shift: float | None = None):
    from diffusers import AutoencoderKL
    options = dict(shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False) if shift is not None else {}
    channels = embedded.VAE_CHANNELS
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8, sample_size=64,
        scaling_factor=scaling, **options).eval()


def _scheduler(family: str, fallback):
    """The real checkpoint's scheduler config from data/ when shipped, else `fallback()`."""
    import diffusers
    folder = DATA / SCHEDULER_CONFIGS[family] / "scheduler"
    if (folder / "scheduler_config.json").is_file():
        config = json.loads((folder / "scheduler_config.json").read_text())
        return getattr(diffusers, config["_class_name"]).from_config(config)
    return fallback()


def sdxl(workdir: Path):
    import diffusers
    tokenizer, text_encoder = _clip(workdir, "clip-1")
    tokenizer_2, text_encoder_2 = _clip(workdir, "clip-2", projection=True)
    time_dim = 8
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=(2, 4), norm_num_groups=8,
        cross_attention_dim=2 * HIDDEN,                     # the two encoders' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=HIDDEN + 6 * time_dim,   # pooled text + 6 size/crop numbers
        use_linear_projection=True, transformer_layers_per_block=1).eval()
    return diffusers.StableDiffusionXLPipeline(
        vae=_vae(4, 0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet,
        scheduler=_scheduler("sdxl", lambda: diffusers.EulerDiscreteScheduler(timestep_spacing="leading")))


def sd3(workdir: Path):
    import diffusers
    tokenizer, text_encoder = _clip(workdir, "clip-1", projection=True)
    tokenizer_2, text_encoder_2 = _clip(workdir, "clip-2", projection=True)
    # SD3 pads the concatenated CLIP states (2 x HIDDEN) to the T5's width, so the T5 is at least that wide.
    tokenizer_3, text_encoder_3 = _t5(workdir, 2 * HIDDEN)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=2 * HIDDEN, caption_projection_dim=16,
        pooled_projection_dim=2 * HIDDEN, pos_embed_max_size=16).eval()
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, vae=_vae(16, 1.5305, 0.0609), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        scheduler=_scheduler("sd3", lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)))


def pixart_sigma(workdir: Path):
    import diffusers
    tokenizer, text_encoder = _t5(workdir, HIDDEN)
    transformer = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, caption_channels=HIDDEN, sample_size=8, patch_size=2, norm_type="ada_norm_single",
        norm_num_groups=8, use_additional_conditions=False).eval()
    return diffusers.PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae(4, 0.13025), transformer=transformer,
        scheduler=_scheduler("pixart-sigma", diffusers.DPMSolverMultistepScheduler))


def flux(workdir: Path):
    import diffusers
    tokenizer, text_encoder = _clip(workdir, "clip-1")
    tokenizer_2, text_encoder_2 = _t5(workdir, HIDDEN)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=HIDDEN, pooled_projection_dim=HIDDEN, guidance_embeds=False,
        axes_dims_rope=(2, 2, 4)).eval()       # 16 latent channels x 2 x 2 packed; rope axes sum to the head width
    return diffusers.FluxPipeline(
        scheduler=_scheduler("flux", lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)),
        vae=_vae(16, 0.3611, 0.1159), text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer)


BUILDERS = {"sdxl": sdxl, "sd3": sd3, "pixart-sigma": pixart_sigma, "flux": flux}


def assemble(family: str, workdir: Path):
    """The tiny pipeline of `family` (random weights from its seed), not yet saved."""
    import torch
    torch.manual_seed(SEEDS[family])
    return BUILDERS[family](workdir)


def build(family: str, out_dir: Path) -> bool:
    """Build the tiny `family` pipeline into `out_dir` unless it is there and current; True if built."""
    return embedded.build_folder(
        out_dir, lambda work, folder: assemble(family, work).save_pretrained(folder, safe_serialization=True),
        MARKER, VERSION)


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else Path("models")
    for family, folder in FOLDERS.items():
        embedded.build_command([str(root / folder)], root / folder, lambda out, f=family: build(f, out),
                               f"tiny {family}", VERSION)


if __name__ == "__main__":
    main(sys.argv[1:])
