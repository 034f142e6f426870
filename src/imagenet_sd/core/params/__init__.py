"""params.yaml, validated once into typed objects.

Every stage calls `load()` first. A wrong value stops the stage before it touches
any output, with one line naming the key, the value and what is allowed.
Paths are checked for existence only by the stage that reads them
(`require_file` / `require_dir`), so that e.g. the prompt stage does not demand
ImageNet on disk. The top-level keys and `Params` are here; each profile block in the
module of its section (generate, train, evaluate, clip, cluster); reader.py reads them.
Docs: docs/parameters.md
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imagenet_sd.core.errors import UserError, param_error
from imagenet_sd.core.params.clip import (
    CHANCE,
    CLIP_CLASS_NAMES,
    CLIP_TEMPLATES,
    FILTER_KEEPS,
    FILTER_RULES,
    ClipClassifierParams,
    FilterParams,
    parse_clip_classifier,
    parse_filter,
)
from imagenet_sd.core.params.cluster import LAUNCHERS, SlurmParams, parse_slurm
from imagenet_sd.core.params.evaluate import (
    PROBES,
    REFERENCE_MODELS,
    CogParams,
    EvaluateParams,
    TransferParams,
    parse_evaluate,
    parse_transfer,
)
from imagenet_sd.core.params.generate import (
    ATTENTION_BACKENDS,
    DTYPES,
    SAFETY_POLICIES,
    SCHEDULERS,
    GenerateParams,
    parse_generate,
)
from imagenet_sd.core.params.reader import (
    DEVICES,
    Section,
    expanded,
    registered_name,
    require_dir,
    require_file,
    writable_dir,
)
from imagenet_sd.core.params.train import GLOBAL_CROP_STYLES, PRECISIONS, TrainParams, parse_train, recipe_overlay

__all__ = ["ATTENTION_BACKENDS", "CHANCE", "CLASS_SETS", "CLIP_CLASS_NAMES", "CLIP_TEMPLATES", "DEVICES", "DTYPES",
           "LE_CLASS_NAMES",
           "FILTER_KEEPS", "FILTER_RULES", "GLOBAL_CROP_STYLES", "LAUNCHERS", "NUM_SCENES", "PRECISIONS", "PROBES",
           "PROMPT_VARIANTS", "REFERENCE_MODELS", "SAFETY_POLICIES", "SCHEDULERS", "SOURCES", "ClipClassifierParams",
           "CogParams", "DataParams", "EvaluateParams", "FilterParams", "GenerateParams", "Params", "SlurmParams",
           "TrainParams", "TransferParams", "load", "parse", "require_dir", "require_file", "writable_dir"]

CLASS_SETS = ("imagenet100", "imagenet1k", "digits", "custom")
PROMPT_VARIANTS = ("c", "c_hc", "c_dc", "c_hc_b", "c_hc_bm", "le")   # le: language enhancement (module language)
NUM_SCENES = 365            # Places365 (backgrounds.NUM_SCENES): the range of background_top_k
SOURCES = ("synthetic", "real")


@dataclass(frozen=True)
class DataParams:
    """Roots of the real image folders; None where not configured ('', or a test set left out)."""
    train: Path | None
    # Test set name -> root, each key of `data` but train and val_labels. datasets/imagenet_scan.py checks
    # the names against datasets/imagenet_sets.py, which this module does not import: a new test set then
    # changes the deps of the stages that score test sets only (dvc.yaml), not of every stage.
    test_sets: dict[str, Path | None]
    val_labels: Path | None = None   # labels of a flat val folder; None: look beside it

    @property
    def val(self) -> Path | None:
        """ImageNet val: also the real test split of cog's and the digits profile's probes."""
        return self.test_sets.get("val")


@dataclass(frozen=True)
class Params:
    profile: str
    classes: str
    custom_classes: Path
    prompt: str
    background_top_k: int   # c_hc_bm: b is drawn among the class's k best-matching scenes (module matching)
    guidance: float
    steps: int
    scheduler: str
    negative_prompt: str    # '' for none; families.settings_for checks the model takes one
    safety_checker: str
    scale: float
    seed: int
    source: str
    # Which synthetic images train-resnet50 reads: a filter's name, checked by filter/registry.py's
    # `chosen` (this layer cannot import the filters).
    filter: str
    generate: GenerateParams
    data: DataParams
    train_recipe: str         # the train_recipes block over the profile's train block ('base': none)
    train: TrainParams
    evaluate: EvaluateParams
    transfer: TransferParams
    filtering: FilterParams   # the profile's `filter` block
    clip_tune: bool         # the clip-tune stage runs (He et al.'s classifier tuning); false: it writes "skipped"
    clip_classifier: ClipClassifierParams   # the profile's `clip_classifier` block
    # Few-shot setting and real-image guidance (He et al., ICLR 2023; module fewshot, docs/he2023.md#real-image-guidance-and-k-shot-subsets).
    shots: int = 0            # K real images a class (the few-shot stage's K-shot subset); 0: zero-shot
    init_strength: float = 0.0   # > 0: each image starts from a real shot noised to this img2img strength
    # CLIP's texts in clip-filter and clip-tune (module prompts.clip_texts).
    clip_class_names: str = "openai"   # one of CLIP_CLASS_NAMES
    clip_templates: str = "he2023"     # one of CLIP_TEMPLATES
    # Language enhancement (prompt le, module language): distinct sentences a class, images cycling over them.
    le_sentences_per_class: int = 200  # 0: one sentence an image; He et al.: 200, 10 images each
    le_class_names: str = "clip"       # one of LE_CLASS_NAMES: the words the T5 writes from (module language)
    # > 0: image i of a class gets sentence i // this (He et al.: 10), ceil(images / this) sentences a class,
    # instead of le_sentences_per_class's i mod N (which must then be 0).
    le_images_per_sentence: int = 0
    # Where the GPU stages run: this machine (torchrun for processes > 1) or Slurm jobs (core/slurm.py).
    launcher: str = "local"
    slurm: SlurmParams | None = None


def _custom_classes(top: Section) -> Path:
    """The class file, as written: dvc.yaml names it as a dependency (`${custom_classes}`) and DVC does not
    expand `~` or `$VARS`, so an unexpanded path would have the stage read one file and DVC watch another."""
    value = top.text("custom_classes")
    path = expanded(value)
    if str(path) != value:
        raise param_error("custom_classes", value, f"a path without ~ or $VARS (DVC watches this file as written "
                          f"and does not expand them): write {str(path)!r}")
    return path


def _data(s: Section) -> DataParams:
    """train and val_labels, and every other key a test set's root (evaluation checks their names)."""
    own = ("train", "val_labels")
    return DataParams(train=s.optional_path("train"), val_labels=s.optional_path("val_labels"),
                      test_sets={str(name): s.optional_path(name) for name in s.raw if name not in own})


# Language enhancement's input words: `clip` the name clip_class_names gives a class (CLIP's curated ImageNet
# names by default: He et al.'s LE and CLIP filter read one label list), `wordnet` its first WordNet lemma.
LE_CLASS_NAMES = ("clip", "wordnet")

_TOP_KEYS = ("profile", "classes", "custom_classes", "prompt", "background_top_k", "guidance", "steps",
             "scheduler", "safety_checker", "scale", "seed", "source", "filter", "profiles")
_TOP_KEYS += ("shots", "init_strength")        # the few-shot setting and real guidance (_few_shot)
_TOP_KEYS += ("clip_tune",)                    # the clip-tune stage on or off (parse_clip_classifier: its recipe)
_TOP_KEYS += ("clip_class_names", "clip_templates")   # CLIP's texts in clip-filter and clip-tune
_TOP_KEYS += ("le_sentences_per_class", "le_class_names", "le_images_per_sentence")   # prompt le (module language)
_TOP_KEYS += ("negative_prompt",)             # the generator's negative prompt (families.CallSettings)
_TOP_KEYS += ("train_recipe", "train_recipes")   # a named recipe over the profile's train block (_train)


def _train(top: Section, profile: Section) -> tuple[str, TrainParams]:
    """(train_recipe, the profile's train block with that recipe's keys in place of its own)."""
    recipes = top.section("train_recipes")
    name = top.choice("train_recipe", tuple(recipes.raw))
    return name, parse_train(recipe_overlay(profile.section("train"), recipes.section(name)))


def _images_per_sentence(top: Section) -> int:
    """le_images_per_sentence, which decides the sentence count itself: le_sentences_per_class must be 0."""
    k = top.number("le_images_per_sentence", int, low=0)
    if k and top.number("le_sentences_per_class", int, low=0):
        raise param_error(top.path("le_images_per_sentence"), k, "0 while le_sentences_per_class is set (one of "
                          "the two decides how many sentences a class has: set le_sentences_per_class: 0 to use this)")
    return k


def _few_shot(top: Section, steps: int) -> dict:
    """shots (K real images a class) and init_strength (img2img strength from them; 0: text-to-image)."""
    shots = top.number("shots", int, low=0)
    strength = top.number("init_strength", float, low=0, high=1)
    if strength and not shots:
        raise param_error("init_strength", strength, "0 while shots = 0; real guidance starts each image from a "
                          "real image of its class: set shots to K > 0 (He et al.: 1, 2, 4, 8, 16), or init_strength: 0")
    # diffusers' img2img runs int(steps x strength) denoising steps and fails on none.
    if strength and int(steps * strength) < 1:
        raise param_error("init_strength", strength, f"0 (text-to-image) or a number > 0 and <= 1 with "
                          f"steps x init_strength >= 1 (steps = {steps}: at least {1 / steps:.4g})")
    return {"shots": shots, "init_strength": strength}


def parse(raw: Any) -> Params:
    """Validate the content of params.yaml (already parsed YAML) into `Params`."""
    top = Section(raw, "")
    top.no_unknown_keys(_TOP_KEYS)
    profiles = top.section("profiles")
    profile = top.choice("profile", tuple(profiles.raw))
    chosen = profiles.section(profile)
    chosen.no_unknown_keys(("generate", "data", "train", "evaluate", "transfer", "filter", "clip_classifier",
                            "launcher", "slurm"))
    train_recipe, train = _train(top, chosen)
    return Params(
        profile=profile,
        classes=top.choice("classes", CLASS_SETS),
        custom_classes=_custom_classes(top),
        prompt=top.choice("prompt", PROMPT_VARIANTS),
        background_top_k=top.number("background_top_k", int, low=1, high=NUM_SCENES),
        guidance=top.number("guidance", float, low=0),
        steps=top.number("steps", int, low=1),
        scheduler=top.choice("scheduler", SCHEDULERS),
        negative_prompt=top.text("negative_prompt").strip(),
        safety_checker=top.choice("safety_checker", SAFETY_POLICIES),
        scale=top.number("scale", float, low=0.1, high=50),
        seed=top.number("seed", int, low=0),
        source=top.choice("source", SOURCES),
        filter=registered_name(top, "filter"),
        generate=parse_generate(chosen.section("generate")),
        data=_data(chosen.section("data")),
        train_recipe=train_recipe,
        train=train,
        evaluate=parse_evaluate(chosen.section("evaluate")),
        transfer=parse_transfer(chosen.section("transfer")),
        filtering=parse_filter(chosen.section("filter")),
        clip_tune=top.flag("clip_tune"),
        clip_classifier=parse_clip_classifier(chosen.section("clip_classifier")),
        launcher=chosen.choice("launcher", LAUNCHERS),
        slurm=parse_slurm(chosen.section("slurm")),
        **_few_shot(top, top.number("steps", int, low=1)),
        clip_class_names=top.choice("clip_class_names", CLIP_CLASS_NAMES),
        clip_templates=top.choice("clip_templates", CLIP_TEMPLATES),
        le_sentences_per_class=top.number("le_sentences_per_class", int, low=0),
        le_images_per_sentence=_images_per_sentence(top),
        le_class_names=top.choice("le_class_names", LE_CLASS_NAMES),
    )


def load(path: str | Path = "params.yaml") -> Params:
    return parse(_read(Path(path)))


def check_every_profile(path: str | Path = "params.yaml") -> list[str]:
    """Validate params.yaml as `load` does with each profile chosen in turn (the check-params stage);
    the profiles' names."""
    raw = _read(Path(path))
    names = list(Section(raw, "").section("profiles").raw)
    for name in names:
        parse({**raw, "profile": name})
    return names


def _read(path: Path):
    if not path.is_file():
        raise UserError(f"{path}: not found; run stages from the repository root, where params.yaml is")
    try:
        # libyaml's loader where PyYAML has it: the same safe loading, about 10x faster on this file.
        return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}; fix the syntax") from None
