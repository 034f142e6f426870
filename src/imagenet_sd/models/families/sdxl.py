"""SDXL and SDXL-Turbo: `StableDiffusionXLPipeline`, a UNet with text-time conditioning (pooled
text + image size and crop), two CLIP text encoders.

Docs: docs/generating.md#generators
"""
from __future__ import annotations

from pathlib import Path

from imagenet_sd.models import tiny_parts
from imagenet_sd.models.families import sd
from imagenet_sd.models.families.base import Family, Generator, Tiny

SEED = 11                        # the tiny model's; beside embedded.SEEDS, tiny_clip's, tiny_t5's, the others'
SCHEDULER = "sdxl-base-1.0"      # data/<folder>/scheduler: the real checkpoint's scheduler config


def tiny(workdir: Path):
    import diffusers
    hidden = tiny_parts.HIDDEN
    tokenizer, text_encoder = tiny_parts.clip(workdir, "clip-1")
    tokenizer_2, text_encoder_2 = tiny_parts.clip(workdir, "clip-2", projection=True)
    time_dim = 8
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=(2, 4), norm_num_groups=8,
        cross_attention_dim=2 * hidden,                     # the two encoders' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=hidden + 6 * time_dim,   # pooled text + 6 size/crop numbers
        use_linear_projection=True, transformer_layers_per_block=1).eval()
    return diffusers.StableDiffusionXLPipeline(
        vae=tiny_parts.vae(4, 0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet,
        scheduler=tiny_parts.scheduler(SCHEDULER, lambda: diffusers.EulerDiscreteScheduler(timestep_spacing="leading")))


_STORED = {"stored_size": 512}     # drawn at its native size, stored at SD v1.4's
FAMILY = Family(
    "sdxl", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "unet", None,
    negative_prompt=True, classifier_free=True, flow_matching=False, safety_checker=False, patch=1,
    denoiser_call=sd.unet_call,
    shipped=(("stabilityai/stable-diffusion-xl-base-1.0", "sdxl-base-1.0"), ("stabilityai/sdxl-turbo", "sdxl-turbo")),
    tiny=Tiny("tiny-sdxl", tiny, SEED),
    generators=(
        Generator("generator-sdxl", "SDXL base 1.0, Euler 50, cfg 5", dict(guidance=5.0, steps=50),
                  {"model": "stabilityai/stable-diffusion-xl-base-1.0", "resolution": 1024, **_STORED},
                  prices=(("SDXL base, Euler 50, cfg 5, 1024 px", 1024), ("SDXL base, Euler 50, cfg 5, 512 px", 512))),
        Generator("generator-sdxl-turbo", "SDXL-Turbo, 1 step", dict(guidance=0.0, steps=1),
                  {"model": "stabilityai/sdxl-turbo", "resolution": 512}, tiny=False,
                  prices=(("SDXL-Turbo, 1 step, no cfg", 512),)),
    ),
)
