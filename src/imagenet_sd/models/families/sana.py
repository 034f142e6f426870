"""SANA: `SanaPipeline`, a linear-attention DiT (patch 1) on a deep-compression autoencoder's latents
(DC-AE, 32 px a latent cell), sampled by flow matching (DPM-Solver on flow sigmas), one Gemma-2
decoder as text encoder (`tokenizer`, max_sequence_length); no image-to-image pipeline in diffusers.

Its pipeline prepends its chat instruction (`complex_human_instruction`) to every prompt by default,
and this runs it so, as its model card does. data/ ships no SANA configs: the dry run of a SANA
checkpoint reads them from the Hub cache, and the tiny model's scheduler is its class with the
flow settings of SANA's published diffusers scheduler config (flow_prediction, flow sigmas, shift 3).

Docs: docs/generating.md#generators
"""
from __future__ import annotations

import string
from pathlib import Path

from imagenet_sd.models.families.base import Family, Generator, Tiny

SEED = 15


def transformer_call(denoiser, passes: int, latent: int, sequence: int | None):
    """One DiT evaluation: latents, the Gemma's tokens (max_sequence_length; the chat instruction's
    tokens, which the pipeline adds before them, are not counted)."""
    import torch
    c, randn = denoiser.config, torch.randn
    return lambda: denoiser(randn(passes, c.in_channels, latent, latent),
                            encoder_hidden_states=randn(passes, sequence, c.caption_channels),
                            timestep=torch.full((passes,), 10.0))


def _tokenizer():
    """A Gemma tokenizer (BPE without merges) whose vocabulary is the specials, "▁" (a space) and the
    printable ASCII characters: written, not trained or downloaded."""
    from transformers import GemmaTokenizer
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    return GemmaTokenizer(vocab={piece: i for i, piece in enumerate(pieces)}, merges=[])


def tiny(workdir: Path):
    import diffusers
    import transformers
    hidden = 32
    tokenizer = _tokenizer()
    text_encoder = transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)).eval()
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")      # 3 blocks: 4 px a latent cell (the real one: 6, 32)
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=8, attention_head_dim=4, encoder_block_types=blocks,
        decoder_block_types=blocks, encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407).eval()
    transformer = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=8, out_channels=8, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=hidden,
        sample_size=16).eval()
    scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0)
    return diffusers.SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                  scheduler=scheduler)


FAMILY = Family(
    "sana", "SanaPipeline", None, "transformer", "tokenizer",
    negative_prompt=True, classifier_free=True, flow_matching=True, safety_checker=False, patch=1,
    # Resolution binning would draw at the checkpoint's nearest trained size and resize to the asked
    # one; off, `resolution` is the size drawn, as in every other family.
    call_options=(("use_resolution_binning", False),),
    denoiser_call=transformer_call,
    tiny=Tiny("tiny-sana", tiny, SEED),
    generators=(
        Generator("generator-sana", "SANA 1.6B, DPM 20, cfg 4.5", dict(guidance=4.5, steps=20),
                  {"model": "Efficient-Large-Model/Sana_1600M_1024px_diffusers", "resolution": 1024,
                   "stored_size": 512}),
    ),
)
