"""CLIP's texts for a class set, shared by clip-filter and clip-tune: the name each class goes by
(`clip_class_names`) and the templates that wrap it (`clip_templates`).

Names: `openai`, the ImageNet-1K names CLIP's authors curated for zero-shot use
(data/clip/openai_classnames.tsv; He et al.'s code uses the same list as `openai_classnames`),
looked up by wnid, a class outside ImageNet-1K (custom classes) keeping its own name; `wordnet`,
the class's first WordNet lemma ("pirate" of "pirate, pirate ship").
Templates: `he2023`, what He et al.'s code uses, "a photo of a {}." for the filter and CLIP's
7-template ImageNet ensemble for classifier tuning; `openai80`, CLIP's 80 ImageNet templates
(data/clip/imagenet_templates_80.txt) for both; `single`, "a photo of a {}." for both.
Several templates make one direction a class (clip_model.class_directions).
Docs: docs/he2023.md#clips-class-names-and-templates
"""
from __future__ import annotations

import functools

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import read_tsv
from imagenet_sd.core.paths import DATA
from imagenet_sd.prompts.prompts import ClassPrompt

NAMES_FILE = DATA / "clip" / "openai_classnames.tsv"
TEMPLATES_80_FILE = DATA / "clip" / "imagenet_templates_80.txt"
SINGLE = ("a photo of a {}.",)
# CLIP's 7-template selection for ImageNet (its prompt-engineering notebook), He et al.'s `imagenet_template`.
ENSEMBLE_7 = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
              "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


@functools.cache
def openai_names() -> dict[str, str]:
    """wnid -> CLIP's name, for the 1000 ImageNet-1K classes."""
    try:
        rows = read_tsv(NAMES_FILE)
    except OSError:
        raise UserError(f"{NAMES_FILE}: missing; restore it: git checkout -- data/clip") from None
    return {row["wnid"]: row["name"] for row in rows}


@functools.cache
def templates_80() -> tuple[str, ...]:
    return tuple(line for line in TEMPLATES_80_FILE.read_text().splitlines() if line.strip())


def first_lemma(row: ClassPrompt) -> str:
    """The class's first lemma: "pirate" of "pirate, pirate ship"."""
    return row.c.split(",")[0].strip()


def names(rows: list[ClassPrompt], source: str) -> list[str]:
    """Each class's name in logit (index) order."""
    ordered = sorted(rows, key=lambda r: r.index)
    if source == "wordnet":
        return [first_lemma(r) for r in ordered]
    known = openai_names()
    return [known.get(r.wnid) or first_lemma(r) for r in ordered]


def templates(choice: str, stage: str) -> tuple[str, ...]:
    """The templates of `choice` (one of params.CLIP_TEMPLATES) for `stage` (filter | tune)."""
    if choice == "openai80":
        return templates_80()
    if choice == "he2023" and stage == "tune":
        return ENSEMBLE_7
    return SINGLE
