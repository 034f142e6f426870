"""FLUX.1 schnell and dev: `FluxPipeline`, a double- and single-stream transformer on 2 x 2 packed
latent patches, sampled by flow matching, a CLIP and a T5 text encoder (`tokenizer_2`,
max_sequence_length).

Docs: docs/generating.md#generators
"""
from __future__ import annotations

from pathlib import Path

from imagenet_sd.models import tiny_parts
from imagenet_sd.models.families.base import Family, Generator, Tiny

SEED = 14
SCHEDULER = "flux1-schnell"


def transformer_call(denoiser, passes: int, latent: int, sequence: int | None):
    """One transformer evaluation on one image (no unconditional branch): 2 x 2 latent patches packed into
    tokens, the T5's tokens, the pooled CLIP text; dev's guidance embedding where the config has one."""
    import torch
    c, randn = denoiser.config, torch.randn
    tokens = (latent // 2) ** 2
    return lambda: denoiser(hidden_states=randn(1, tokens, c.in_channels),
                            encoder_hidden_states=randn(1, sequence, c.joint_attention_dim),
                            pooled_projections=randn(1, c.pooled_projection_dim), timestep=torch.ones(1),
                            img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(sequence, 3),
                            guidance=torch.full((1,), 3.5) if c.guidance_embeds else None)


def tiny(workdir: Path):
    import diffusers
    hidden = tiny_parts.HIDDEN
    tokenizer, text_encoder = tiny_parts.clip(workdir, "clip-1")
    tokenizer_2, text_encoder_2 = tiny_parts.t5(workdir, hidden)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=hidden, pooled_projection_dim=hidden, guidance_embeds=False,
        axes_dims_rope=(2, 2, 4)).eval()       # 16 latent channels x 2 x 2 packed; rope axes sum to the head width
    return diffusers.FluxPipeline(
        scheduler=tiny_parts.scheduler(SCHEDULER, lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)),
        vae=tiny_parts.vae(16, 0.3611, 0.1159), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


FAMILY = Family(
    "flux", "FluxPipeline", "FluxImg2ImgPipeline", "transformer", "tokenizer_2",
    # FLUX.1 is guidance-distilled: guidance_scale feeds dev's guidance embedding (schnell ignores it)
    # and there is no unconditional branch, so no negative prompt.
    negative_prompt=False, classifier_free=False, flow_matching=True, safety_checker=False, patch=2,
    denoiser_call=transformer_call,
    shipped=(("black-forest-labs/FLUX.1-schnell", "flux1-schnell"),),
    tiny=Tiny("tiny-flux", tiny, SEED),
    generators=(
        Generator("generator-flux-schnell", "FLUX.1 schnell, 4 steps", dict(guidance=0.0, steps=4),
                  {"model": "black-forest-labs/FLUX.1-schnell", "resolution": 1024, "max_sequence_length": 256,
                   "stored_size": 512},
                  prices=(("FLUX.1 schnell, 4 steps, T5 256, 1024 px", 1024),
                          ("FLUX.1 schnell, 4 steps, T5 256, 512 px", 512))),
    ),
)
