"""CLIP's settings: the profile's `filter` block (clip-filter) and `clip_classifier` block (clip-tune),
and the top-level choice of CLIP's texts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imagenet_sd.core.errors import param_error
from imagenet_sd.core.params.reader import DEVICES, Section, as_number, keys_of, work_dir_at

CLIP_CLASS_NAMES = ("openai", "wordnet")           # CLIP's texts, clip-filter and clip-tune (module prompts.clip_texts)
CLIP_TEMPLATES = ("he2023", "openai80", "single")
FILTER_RULES = ("top1", "threshold")
FILTER_KEEPS = ("per_class", "passing")            # filter.keep: He et al.'s exact count a class | passing images only
CHANCE = "chance"                                  # filter.threshold: 1 / number of classes (He et al.'s)


@dataclass(frozen=True)
class FilterParams:
    """The clip-filter stage's CLIP and rule (module clip_filter); used when `filter: clip`."""
    model: str              # local folder or Hugging Face id of a transformers CLIPModel, or open_clip:... (an OpenCLIP one)
    rule: str               # one of FILTER_RULES: own class is CLIP's top-1 | its probability > threshold
    threshold: float | None  # None: chance, 1 / number of classes
    keep: str               # one of FILTER_KEEPS: exactly real x scale a class (He et al.'s) | every passing one, at most that
    overgenerate: float     # sd-generate makes ceil(real x scale x this) more a class for the filter to choose among
    batch_size: int
    workers: int            # loader processes decoding and preprocessing the images
    device: str
    work_dir: Path          # CLIP scores per shard, reused by any rule or threshold


@dataclass(frozen=True)
class ClipClassifierParams:
    """The clip-tune stage's CLIP and recipe (module clip_classifier); used when `clip_tune: true`."""
    model: str              # local folder or Hugging Face id of a transformers CLIPModel, or open_clip:... (an OpenCLIP one)
    epochs: int
    lr: float               # AdamW's peak lr with shots: 0 (cosine to 0 over every step)
    few_shot_lr: float      # the same with shots > 0
    weight_decay: float
    batch_size: int         # synthetic image features a step
    real_batch_size: int    # shots > 0: real image features a step, beside them
    soft_label: float       # weight of the zero-shot head's softened predictions in the synthetic images' loss
    soft_label_temperature: float
    encode_batch_size: int  # images a CLIP forward pass
    workers: int            # loader processes decoding and preprocessing the synthetic images
    device: str
    work_dir: Path          # CLIP image features per shard and per real image set, shared by experiments


def parse_filter(s: Section) -> FilterParams:
    s.no_unknown_keys(keys_of(FilterParams))
    return FilterParams(
        model=s.text("model"),
        rule=s.choice("rule", FILTER_RULES),
        threshold=_threshold(s),
        keep=s.choice("keep", FILTER_KEEPS),
        overgenerate=s.number("overgenerate", float, low=0, high=10),
        batch_size=s.number("batch_size", int, low=1),
        workers=s.number("workers", int, low=0),
        device=s.choice("device", DEVICES),
        work_dir=work_dir_at(s),
    )


def parse_clip_classifier(s: Section) -> ClipClassifierParams:
    s.no_unknown_keys(keys_of(ClipClassifierParams))
    return ClipClassifierParams(
        model=s.text("model"),
        epochs=s.number("epochs", int, low=1),
        lr=s.number("lr", float, low=0, low_open=True, high=1),
        few_shot_lr=s.number("few_shot_lr", float, low=0, low_open=True, high=1),
        weight_decay=s.number("weight_decay", float, low=0),
        batch_size=s.number("batch_size", int, low=1),
        real_batch_size=s.number("real_batch_size", int, low=1),
        soft_label=s.number("soft_label", float, low=0, high=1),
        soft_label_temperature=s.number("soft_label_temperature", float, low=0, low_open=True),
        encode_batch_size=s.number("encode_batch_size", int, low=1),
        workers=s.number("workers", int, low=0),
        device=s.choice("device", DEVICES),
        work_dir=work_dir_at(s),
    )


def _threshold(s: Section) -> float | None:
    """The probability of its own class an image needs (rule threshold); `chance`: 1 / classes."""
    value = s.get("threshold")
    if value == CHANCE:
        return None
    value = as_number(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
        raise param_error(s.path("threshold"), value, f"{CHANCE} (1 / number of classes) or a number > 0 and < 1")
    return float(value)
