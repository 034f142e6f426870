"""Stable Diffusion 3: `StableDiffusion3Pipeline`, an MMDiT denoiser (patch 2) sampled by flow
matching, two CLIP text encoders and a T5 (`tokenizer_3`, max_sequence_length).

Docs: docs/generating.md#generators
"""
from __future__ import annotations

from pathlib import Path

from imagenet_sd.models import tiny_parts
from imagenet_sd.models.families.base import Family, Generator, Tiny

SEED = 12
SCHEDULER = "sd3-medium"


def transformer_call(denoiser, passes: int, latent: int, sequence: int | None):
    """One MMDiT evaluation: the CLIP tokens (77) and the T5's, side by side, and the pooled CLIP text."""
    import torch
    c, randn = denoiser.config, torch.randn
    return lambda: denoiser(hidden_states=randn(passes, c.in_channels, latent, latent),
                            encoder_hidden_states=randn(passes, 77 + sequence, c.joint_attention_dim),
                            pooled_projections=randn(passes, c.pooled_projection_dim),
                            timestep=torch.full((passes,), 10.0))


def tiny(workdir: Path):
    import diffusers
    hidden = tiny_parts.HIDDEN
    tokenizer, text_encoder = tiny_parts.clip(workdir, "clip-1", projection=True)
    tokenizer_2, text_encoder_2 = tiny_parts.clip(workdir, "clip-2", projection=True)
    # SD3 pads the concatenated CLIP states (2 x HIDDEN) to the T5's width, so the T5 is at least that wide.
    tokenizer_3, text_encoder_3 = tiny_parts.t5(workdir, 2 * hidden)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=2 * hidden, caption_projection_dim=16,
        pooled_projection_dim=2 * hidden, pos_embed_max_size=16).eval()
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, vae=tiny_parts.vae(16, 1.5305, 0.0609), text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        scheduler=tiny_parts.scheduler(SCHEDULER, lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)))


FAMILY = Family(
    "sd3", "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "transformer", "tokenizer_3",
    negative_prompt=True, classifier_free=True, flow_matching=True, safety_checker=False, patch=2,
    denoiser_call=transformer_call,
    shipped=(("stabilityai/stable-diffusion-3-medium-diffusers", "sd3-medium"),),
    tiny=Tiny("tiny-sd3", tiny, SEED),
    generators=(
        Generator("generator-sd3", "SD3 medium, 28 steps, cfg 7", dict(guidance=7.0, steps=28),
                  {"model": "stabilityai/stable-diffusion-3-medium-diffusers", "resolution": 1024, "stored_size": 512},
                  prices=(("SD3 medium, 28 steps, cfg 7, 1024 px", 1024), ("SD3 medium, 28 steps, cfg 7, 512 px", 512))),
    ),
)
