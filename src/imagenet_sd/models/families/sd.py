"""Stable Diffusion 1.x/2.x and SD-Turbo: `StableDiffusionPipeline`, a UNet denoiser, one CLIP text
encoder, SD's safety checker. Its tiny model is the embedded profile's default generator
(models/embedded.py, models/tiny-sd).

Docs: docs/generating.md#generators
"""
from __future__ import annotations

from imagenet_sd.models import embedded
from imagenet_sd.models.families.base import Family, Generator, Tiny


def unet_call(denoiser, passes: int, latent: int, sequence: int | None):
    """One UNet evaluation as SD's and SDXL's pipelines make it: latents, a timestep, CLIP's 77 tokens
    (SDXL's text-time conditioning adds the pooled text and 6 size/crop numbers)."""
    import torch
    c, randn, t = denoiser.config, torch.randn, torch.tensor(10)   # a CPU timestep: DeepCache reads it with .item()

    def extra() -> dict:    # made inside the count, on the meta device, like every input
        if c.addition_embed_type != "text_time":
            return {}
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim   # SDXL: + 6 size numbers
        return {"added_cond_kwargs": {"text_embeds": randn(passes, pooled), "time_ids": randn(passes, 6)}}
    return lambda: denoiser(randn(passes, c.in_channels, latent, latent), t,
                            randn(passes, 77, c.cross_attention_dim), **extra())


FAMILY = Family(
    "sd", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "unet", None,
    negative_prompt=True, classifier_free=True, flow_matching=False, safety_checker=True, patch=1,
    denoiser_call=unet_call,
    shipped=(("CompVis/stable-diffusion-v1-4", "sd-v1-4"), ("stabilityai/sd-turbo", "sd-turbo")),
    tiny=Tiny("tiny-sd", embedded.assemble, version=embedded.VERSION),    # its parts are seeded in embedded
    generators=(
        Generator("generator-sd-turbo", "SD-Turbo, 1 step", dict(guidance=0.0, steps=1),
                  {"model": "stabilityai/sd-turbo", "resolution": 512}, tiny=False,
                  prices=(("SD-Turbo, 1 step, no cfg", 512),)),
    ),
)
