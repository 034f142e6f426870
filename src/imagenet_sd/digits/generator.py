"""The digits profile's generator: a small Stable Diffusion v1 pipeline trained here on the digits' train split.

It is a `StableDiffusionPipeline` of the classes sd-generate loads for SD v1.4, at toy size:

- `vae`: an `AutoencoderKL` with one block, so its scale factor is 1 (8 px images, 8x8x4
  latents), trained first as an autoencoder on the train split (`VAE_STEPS`);
  `scaling_factor` is set so the latents have unit standard deviation, as SD's 0.18215 does.
- `text_encoder` + `tokenizer`: the embedded tiny CLIP text encoder and byte-level tokenizer
  (`models.embedded`), random and **frozen**: the UNet learns to read its outputs.
- `unet`: a `UNet2DConditionModel` of 0.7M parameters, cross-attention in its 4x4 middle
  block, trained `UNET_STEPS` steps with SD's noise schedule (SD v1.4's DDPM config) to
  predict the noise, from captions of the train images (`captions`), 10 % of them empty so
  that classifier-free guidance has an unconditional branch.
- `scheduler`: SD v1.4's PNDM config, as `scheduler: model` gives for SD v1.4.

Captions: each training image gets, at every step, one of its class's prompts of the
paper's Table 1 variants `c`, `c, h_c`, `c, d_c` and `c, h_c inside b` (b any Places365
scene), built by the same code as the wordnet-prompts stage. So every variant a run uses
is in the model's training distribution, and a background is text the model has learned
to ignore (a digit has none): the variants differ here far less than on ImageNet.

`build(out)` writes the pipeline with `save_pretrained`, then `trained_classes.json`
(the wnids it learned, which sd-generate checks a run's classes against, `TRAINED_CLASSES`)
and the marker. Every random draw is seeded and nothing in the folder depends on the clock: on one
machine and thread count a build gives the same bytes, so sd-generate's work folders keep their key
(hub.fingerprint); across CPUs float rounding may differ in the last bits.

Docs (the model card): docs/digits.md
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from imagenet_sd.core.paths import DATA
from imagenet_sd.datasets import digits
from imagenet_sd.models import embedded
from imagenet_sd.models.sd_model import TRAINED_CLASSES
from imagenet_sd.prompts import backgrounds, classes, prompts

VERSION = 1
MARKER = "digits-model.json"
DEFAULT_DIR = Path("models/digits-sd")
SD_V14_SCHEDULER = DATA / "sd-v1-4" / "scheduler"

RESOLUTION = 8                 # load_digits' own size; the VAE's scale factor is 1
LATENT_CHANNELS = 4
VAE_CHANNELS = (32,)
UNET_CHANNELS = (32, 64)
VAE_STEPS = 250
UNET_STEPS = 600
BATCH = 128
VAE_LR = 2e-3
UNET_LR = 2e-3
EMPTY_CAPTION_SHARE = 0.1      # captions dropped to "" (the unconditional branch of guidance)
VARIANTS = ("c", "c_hc", "c_dc", "c_hc_b")   # Table 1's prompts (c_hc_b's b: every Places365 scene)
SEEDS = {"vae": 11, "unet": 12, "text_encoder": embedded.SEEDS["text_encoder"], "batches": 13}


def captions() -> tuple[list[str], list[list[int]]]:
    """Every caption the UNet learns from: (texts, the indices of each class's texts); text 0 is ""."""
    phrases = [phrase for _, _, phrase in backgrounds.build()]
    texts, by_class = [""], []
    for spec in classes.load_class_set("digits"):
        own = []
        for variant in VARIANTS:
            row = prompts.class_prompt(spec, variant)
            for b in (phrases if prompts.BACKGROUND_SLOT in row.prompt else [None]):
                own.append(len(texts))
                texts.append(row.text(background=b))
        by_class.append(own)
    return texts, by_class


def _vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
                         up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
                         block_out_channels=VAE_CHANNELS, layers_per_block=1, norm_num_groups=8,
                         sample_size=RESOLUTION)


def _unet():
    from diffusers import UNet2DConditionModel
    # Cross-attention only in the 4x4 middle block: at 8x8 it tripled the cost of a step and
    # a digit's class is a global property.
    return UNet2DConditionModel(sample_size=RESOLUTION, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                down_block_types=("DownBlock2D",) * len(UNET_CHANNELS),
                                up_block_types=("UpBlock2D",) * len(UNET_CHANNELS),
                                block_out_channels=UNET_CHANNELS, layers_per_block=1, attention_head_dim=4,
                                norm_num_groups=8, cross_attention_dim=embedded.TEXT_HIDDEN)


def _progress(total: int, what: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=what, unit="step", file=sys.stderr, mininterval=2)


def train_vae(images, rng):
    """The autoencoder, trained to reconstruct `images` (N x 3 x 8 x 8 in [-1, 1]); returns (vae, losses)."""
    import torch
    torch.manual_seed(SEEDS["vae"])
    vae = _vae()
    optimiser = torch.optim.AdamW(vae.parameters(), VAE_LR)
    losses = []
    with _progress(VAE_STEPS, "digits generator: autoencoder") as bar:
        for _ in range(VAE_STEPS):
            batch = images[torch.from_numpy(rng.integers(0, len(images), BATCH))]
            posterior = vae.encode(batch).latent_dist
            # A KL weight this small keeps the latents close to a deterministic code, as SD's VAE.
            loss = (vae.decode(posterior.sample()).sample - batch).pow(2).mean() + 1e-6 * posterior.kl().mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            bar.update()
    return vae.eval(), losses


def train_unet(latents, labels, text_states, by_class, rng):
    """The UNet, trained on `latents` (N x 4 x 8 x 8, scaled) with captions of `labels`; returns (unet, losses)."""
    import torch
    from diffusers import DDPMScheduler
    torch.manual_seed(SEEDS["unet"])
    unet = _unet()
    noise_schedule = DDPMScheduler.from_pretrained(SD_V14_SCHEDULER)
    optimiser = torch.optim.AdamW(unet.parameters(), UNET_LR, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.OneCycleLR(optimiser, UNET_LR, total_steps=UNET_STEPS, pct_start=0.05)
    steps_total = noise_schedule.config.num_train_timesteps
    losses = []
    with _progress(UNET_STEPS, "digits generator: UNet") as bar:
        for _ in range(UNET_STEPS):
            chosen = rng.integers(0, len(latents), BATCH)
            caption = np.array([by_class[labels[i]][rng.integers(len(by_class[labels[i]]))] for i in chosen])
            caption[rng.random(BATCH) < EMPTY_CAPTION_SHARE] = 0
            x0 = latents[torch.from_numpy(chosen)]
            noise = torch.from_numpy(rng.standard_normal(x0.shape, dtype=np.float32))
            t = torch.from_numpy(rng.integers(0, steps_total, BATCH))
            predicted = unet(noise_schedule.add_noise(x0, noise, t), t, text_states[torch.from_numpy(caption)]).sample
            loss = (predicted - noise).pow(2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            lr.step()
            losses.append(loss.item())
            bar.update()
    return unet.eval(), losses


def assemble(workdir: Path):
    """The trained pipeline (not yet saved) and what its card records."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    started = time.monotonic()
    rng = np.random.default_rng(SEEDS["batches"])
    pixels, labels = digits.train_split()
    images = torch.from_numpy(pixels).float().div(127.5).sub(1).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()

    vae, vae_losses = train_vae(images, rng)
    with torch.no_grad():
        raw = vae.encode(images).latent_dist.mean
    scaling = 1.0 / raw.std().item()
    vae.register_to_config(scaling_factor=scaling)

    tokenizer = embedded._tokenizer(workdir)
    torch.manual_seed(SEEDS["text_encoder"])
    text_encoder = embedded._text_encoder(len(tokenizer), tokenizer)
    texts, by_class = captions()
    with torch.no_grad():
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        text_states = torch.cat([text_encoder(chunk)[0] for chunk in ids.split(512)])

    unet, unet_losses = train_unet(raw * scaling, labels, text_states, by_class, rng)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_pretrained(SD_V14_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    card = {"version": VERSION, "classes": list(classes.digits_wnids()), "train_images": int(len(labels)),
            "split": {"source": "sklearn.datasets.load_digits", "split_seed": digits.SPLIT_SEED,
                      "test_share": digits.TEST_SHARE},
            "captions": len(texts), "vae_steps": VAE_STEPS, "unet_steps": UNET_STEPS, "batch": BATCH,
            "vae_final_loss": round(float(np.mean(vae_losses[-20:])), 5),
            "unet_final_loss": round(float(np.mean(unet_losses[-20:])), 5),
            "latent_scaling": round(scaling, 6)}
    # Printed, not written: the folder's bytes are the model's fingerprint (its work folders' key).
    print(f"digits generator trained in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return pipe, card


def _save(workdir: Path, folder: Path) -> None:
    pipe, card = assemble(workdir)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / TRAINED_CLASSES).write_text(json.dumps({"classes": card["classes"]}) + "\n")
    (folder / "card.json").write_text(json.dumps(card, indent=1) + "\n")


def is_current(out_dir: Path) -> bool:
    return embedded.is_current(out_dir, MARKER, VERSION)


def build(out_dir: Path) -> bool:
    """Train and save the digits generator into `out_dir` unless it is there and current; True if built."""
    return embedded.build_folder(out_dir, _save, MARKER, VERSION)


def main(argv: list[str]) -> None:
    embedded.build_command(argv, DEFAULT_DIR, build, "digits generator", VERSION)


if __name__ == "__main__":
    main(sys.argv[1:])
