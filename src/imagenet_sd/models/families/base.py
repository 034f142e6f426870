"""What a generator family is: the `Family` record each module of this package defines, with the
family's tiny random-weight model (`Tiny`) and its rows of the experiments' generator axis
(`Generator`). Nothing outside a family's own module branches on its name: code that differs by
family reads it from these fields.

Docs: docs/layout.md#a-generator-family
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Tiny:
    """A family's tiny random-weight model, models/<folder>: the family's pipeline with the real
    architecture's component classes at a size that draws 64 px images on two CPU cores (its images
    are noise). module tiny_families builds it: torch's seed `seed`, then `assemble(workdir)`, saved
    with the marker file embedded.MARKER holding `version`."""
    folder: str                              # models/<folder>
    assemble: Callable[[Path], object]       # workdir -> the pipeline (random weights), not yet saved
    seed: int | None = None                  # None: assemble seeds each of its parts itself
    version: int = 1                         # a folder holding another version is built again


@dataclass(frozen=True)
class Generator:
    """One row of the experiments' `generators` group (experiments/catalog.py): a checkpoint of the
    family at its model card's setting, priced by scripts/benchmark_price.py."""
    name: str                    # the experiment's name before the profile: generator-sdxl
    label: str                   # what a reader calls it
    settings: dict               # top-level params that differ from the group's (guidance, steps)
    paper: dict                  # the paper profile's generate params: model (a Hub id of `shipped`), resolution, ...
    tiny: bool = True            # the embedded profile runs the family's tiny model (a distilled variant: none)
    prices: tuple[tuple[str, int], ...] = ()   # benchmark_price.py's rows: (label, resolution)


@dataclass(frozen=True)
class Family:
    name: str
    pipeline: str                   # diffusers' text-to-image pipeline class (model_index.json's _class_name)
    img2img: str | None             # its image-to-image pipeline (real guidance); None: the family has none
    denoiser: str                   # the pipeline component that runs every step: unet | transformer
    long_tokenizer: str | None      # the T5 tokenizer whose limit is max_sequence_length; None: CLIP's 77 only
    negative_prompt: bool           # takes a negative prompt (the unconditional branch of guidance)
    classifier_free: bool           # guidance > 1 runs the denoiser on a doubled batch (FLUX's is distilled in)
    flow_matching: bool             # samples a flow-matching ODE: the DDPM-family samplers do not apply
    safety_checker: bool            # ships SD's safety checker
    patch: int                      # latent cells a side of one denoiser token (transformers' patch; UNets 1)
    call_options: tuple[tuple[str, object], ...] = ()   # fixed pipeline arguments (why: in the family's module)
    # The FLOP count's denoiser call (generate/estimates.py): (denoiser built on the meta device, passes
    # (2 with classifier-free guidance), latent cells a side, text tokens) -> a call of it as its pipeline
    # makes one, for one image; its inputs are made inside the call, on the meta device.
    denoiser_call: Callable | None = field(default=None, compare=False, repr=False)
    # Real checkpoints whose configs (no weights) data/ ships: (Hub id, data/ folder); SOURCE.md there.
    shipped: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    tiny: Tiny | None = field(default=None, compare=False, repr=False)
    generators: tuple[Generator, ...] = field(default=(), compare=False, repr=False)

    @property
    def has_sequence_length(self) -> bool:
        return self.long_tokenizer is not None
