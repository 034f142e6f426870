"""Parts the families' tiny random-weight models share (models/families/<family>.py's `tiny`):
CLIP and T5 text encoders with their tokenizers, a KL autoencoder, the real checkpoint's scheduler.

Tokenizers are the embedded ones: CLIP's byte-level BPE without merges (embedded) and the written
SentencePiece model of the tiny T5 (tiny_t5), so nothing is downloaded. Weights come from torch's
global generator, which tiny_families seeds with the family's seed before it assembles the pipeline,
so every build is the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

from imagenet_sd.core.paths import DATA
from imagenet_sd.models import embedded, tiny_t5

HIDDEN = embedded.TEXT_HIDDEN        # 32: every tiny text encoder's width


def clip(workdir: Path, name: str, projection: bool = False):
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


def t5(workdir: Path, d_model: int):
    """(tokenizer, T5 encoder) of width `d_model`, with the tiny T5's SentencePiece vocabulary."""
    from transformers import T5Config, T5EncoderModel
    tokenizer = tiny_t5.load_tokenizer(workdir)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    return tokenizer, T5EncoderModel(config).eval()


def vae(latent_channels: int, scaling: float, shift: float | None = None):
    """A KL autoencoder that downsamples by 8 (embedded.VAE_CHANNELS); `shift`: SD3's and FLUX's latent shift."""
    from diffusers import AutoencoderKL
    options = dict(shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False) if shift is not None else {}
    channels = embedded.VAE_CHANNELS
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8, sample_size=64,
        scaling_factor=scaling, **options).eval()


def scheduler(folder: str, fallback):
    """The real checkpoint's scheduler config from data/<folder>/scheduler when shipped, else `fallback()`."""
    import diffusers
    path = DATA / folder / "scheduler" / "scheduler_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        return getattr(diffusers, config["_class_name"]).from_config(config)
    return fallback()
