"""PixArt-Sigma: `PixArtSigmaPipeline`, a DiT with adaLN-single (patch 2), one T5 text encoder
(`tokenizer`, max_sequence_length); no image-to-image pipeline in diffusers.

Docs: docs/generating.md#generators
"""
from __future__ import annotations

from pathlib import Path

from imagenet_sd.models import tiny_parts
from imagenet_sd.models.families.base import Family, Generator, Tiny

SEED = 13
SCHEDULER = "pixart-sigma-xl-2-1024-ms"


def transformer_call(denoiser, passes: int, latent: int, sequence: int | None):
    """One DiT evaluation: latents, the T5's tokens, no resolution or aspect-ratio conditioning (Sigma has none)."""
    import torch
    c, randn = denoiser.config, torch.randn
    return lambda: denoiser(randn(passes, c.in_channels, latent, latent),
                            encoder_hidden_states=randn(passes, sequence, c.caption_channels),
                            timestep=torch.full((passes,), 10.0),
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def tiny(workdir: Path):
    import diffusers
    hidden = tiny_parts.HIDDEN
    tokenizer, text_encoder = tiny_parts.t5(workdir, hidden)
    transformer = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, caption_channels=hidden, sample_size=8, patch_size=2, norm_type="ada_norm_single",
        norm_num_groups=8, use_additional_conditions=False).eval()
    return diffusers.PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_parts.vae(4, 0.13025), transformer=transformer,
        scheduler=tiny_parts.scheduler(SCHEDULER, diffusers.DPMSolverMultistepScheduler))


FAMILY = Family(
    "pixart-sigma", "PixArtSigmaPipeline", None, "transformer", "tokenizer",
    negative_prompt=True, classifier_free=True, flow_matching=False, safety_checker=False, patch=2,
    # Resolution binning would draw at the checkpoint's nearest trained size and resize to the asked
    # one; off, `resolution` is the size drawn, as in every other family.
    call_options=(("use_resolution_binning", False),),
    denoiser_call=transformer_call,
    shipped=(("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "pixart-sigma-xl-2-1024-ms"),),
    tiny=Tiny("tiny-pixart-sigma", tiny, SEED),
    generators=(
        Generator("generator-pixart-sigma", "PixArt-Sigma XL, DPM 20, cfg 4.5", dict(guidance=4.5, steps=20),
                  {"model": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "resolution": 1024, "stored_size": 512},
                  prices=(("PixArt-Sigma, DPM 20, cfg 4.5, 1024 px", 1024),
                          ("PixArt-Sigma, DPM 20, cfg 4.5, 512 px", 512))),
    ),
)
