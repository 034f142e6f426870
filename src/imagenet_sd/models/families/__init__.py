"""The text-to-image families sd-generate runs, and what each one's pipeline takes: the registry.

A checkpoint's family is its pipeline class, read from its model_index.json
(`_class_name`), so any checkpoint of a known family works as `generate.model`:
SD 1.x/2.x and SD-Turbo (`sd`), SDXL and SDXL-Turbo (`sdxl`), SD3 (`sd3`),
PixArt-Sigma (`pixart-sigma`), FLUX.1 schnell and dev (`flux`), SANA (`sana`). Each family is one
module of this package holding everything that differs (base.Family: its pipeline's
arguments, its FLOP count's denoiser call, its shipped configs, its tiny random-weight
model, its experiments); FAMILIES below registers it, one line a family. The facts come
from diffusers 0.42's pipelines (their `__call__` arguments and components).

Docs: docs/generating.md#generators, docs/layout.md#a-generator-family
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from imagenet_sd.core.errors import UserError
from imagenet_sd.models.families import flux, pixart_sigma, sana, sd, sd3, sdxl
from imagenet_sd.models.families.base import Family, Generator, Tiny

__all__ = ["Family", "Generator", "Tiny", "FAMILIES", "BY_PIPELINE", "family_of", "of", "read_model_index",
           "default_sequence_length", "CallSettings", "settings_for", "check_resolution", "check_scheduler",
           "check_img2img", "config_digest"]

# The registry, in the order the experiments' generators group and the price table list them.
FAMILIES = {f.name: f for f in (
    sd.FAMILY,
    sdxl.FAMILY,
    sd3.FAMILY,
    pixart_sigma.FAMILY,
    flux.FAMILY,
    sana.FAMILY,
)}
BY_PIPELINE = {f.pipeline: f for f in FAMILIES.values()}


def family_of(model_index: dict, key: str, model: str) -> Family:
    """The family of a checkpoint from its model_index.json; a one-line error for any other pipeline."""
    name = model_index.get("_class_name")
    if name not in BY_PIPELINE:
        known = ", ".join(f"{f.pipeline} ({f.name})" for f in FAMILIES.values())
        raise UserError(f"{key} = {model!r} is a {name or 'pipeline without _class_name'}; sd-generate runs the "
                        f"text-to-image pipelines {known}")
    return BY_PIPELINE[name]


def of(pipe) -> Family:
    """The family of a loaded pipeline (sd_model.load_pipeline only loads known ones)."""
    return BY_PIPELINE[type(pipe).__name__]


def read_model_index(source: str, local_files_only: bool = False) -> dict:
    """A checkpoint's model_index.json (a local folder, or a Hub id through its cache): no weights read."""
    from diffusers import DiffusionPipeline
    return dict(DiffusionPipeline.load_config(source, local_files_only=local_files_only))


def default_sequence_length(family: Family) -> int | None:
    """The pipeline's own default max_sequence_length (None where it takes none)."""
    if not family.has_sequence_length:
        return None
    import inspect

    import diffusers
    return inspect.signature(getattr(diffusers, family.pipeline).__call__).parameters["max_sequence_length"].default


@dataclass(frozen=True)
class CallSettings:
    """What sd-generate passes to a pipeline beyond prompt, seed, steps, guidance and size; part of every
    record and of the work folder's key (only the keys that apply, so an SD run's stay as they were)."""
    negative_prompt: str = ""
    max_sequence_length: int | None = None

    def options(self, family: Family, batch: int) -> dict:
        """Keyword arguments of one pipeline call of `batch` images."""
        out = dict(family.call_options)
        if self.negative_prompt:
            out["negative_prompt"] = [self.negative_prompt] * batch
        if self.max_sequence_length is not None:
            out["max_sequence_length"] = self.max_sequence_length
        return out

    def record(self) -> dict:
        out = {}
        if self.negative_prompt:
            out["negative_prompt"] = self.negative_prompt
        if self.max_sequence_length is not None:
            out["max_sequence_length"] = self.max_sequence_length
        return out


def settings_for(family: Family, negative_prompt: str, max_sequence_length: int, key: str, model: str,
                 guidance: float) -> CallSettings:
    """The call settings for `family`, checked: a setting the family's pipeline lacks is a one-line error.

    `key` is the profile's generate key (profiles.<name>.generate); `max_sequence_length` 0 is the
    pipeline's default.
    """
    if negative_prompt and not family.negative_prompt:
        raise UserError(f"negative_prompt = {negative_prompt!r}, but {model!r} is {family.name}, whose pipeline "
                        "has no unconditional branch to steer; set negative_prompt: ''")
    if negative_prompt and guidance <= 1:
        raise UserError(f"negative_prompt = {negative_prompt!r} only acts through classifier-free guidance, "
                        f"which is off at guidance {guidance:g}; set guidance > 1 or negative_prompt: ''")
    if max_sequence_length and not family.has_sequence_length:
        raise UserError(f"{key}.max_sequence_length = {max_sequence_length}, but {model!r} is {family.name}, "
                        "whose CLIP text encoders read 77 tokens; set it to 0")
    length = (max_sequence_length or default_sequence_length(family)) if family.has_sequence_length else None
    return CallSettings(negative_prompt, length)


def check_resolution(family: Family, resolution: int, key: str, model: str, vae_scale_factor: int) -> None:
    """`resolution` must be whole tokens: the model's VAE scale factor x the family's patch pixels."""
    token = vae_scale_factor * family.patch
    if resolution % token:
        raise UserError(f"{key}.resolution = {resolution}: {model!r} ({family.name}) draws in "
                        f"{token}-pixel latent tokens (VAE scale factor {vae_scale_factor} x patch {family.patch}); "
                        f"use a multiple of {token}")


def check_scheduler(family: Family, scheduler: str, model: str) -> None:
    if family.flow_matching and scheduler != "model":
        raise UserError(f"scheduler = {scheduler!r} is a sampler for noise-prediction models, but {model!r} "
                        f"({family.name}) is a flow-matching model; use scheduler: model (its flow-matching Euler)")


def check_img2img(family: Family, model: str) -> None:
    if family.img2img is None:
        raise UserError(f"init_strength > 0 needs an image-to-image pipeline, and {model!r} ({family.name}) has "
                        "none in diffusers; set init_strength: 0 or use another generate.model")


def config_digest(config: dict) -> str:
    """sha256 (16 hex) of a component config, without diffusers' bookkeeping keys (_diffusers_version,
    _name_or_path): which config, not which library wrote it."""
    kept = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
