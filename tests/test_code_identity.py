"""The keys of users' finished work. Each work folder (shards, LE sentences, CLIP scores, CLIP
features) is named by a hash that includes a `code_identity()`: a hash of the source of the
functions that decide the bytes. A value below changing means every user's cache of that kind is
thrown away on upgrade (hundreds of GPU-hours of shards): change one only on purpose, update it
here, and say so in the release note (docs/caching.md).
"""
import json

import pytest
import torch

from imagenet_sd.clip_tune import features
from imagenet_sd.filter import clip_filter
from imagenet_sd.generate import generation
from imagenet_sd.language import language
from imagenet_sd.models import open_clip_model

PINNED = {
    # e9fb5286f8055ff0 and 61ac5751d3056579 until issue 23: any diffusers family (draw passes the family's
    # arguments, families.CallSettings.options is hashed, img2img is the family's), and records that name
    # the weights, pipeline, sampler config and split, on purpose; every sd-generate work folder is
    # re-keyed once (docs/caching.md).
    "generation": (generation.code_identity, "48abef90a15dcd0d"),
    "generation, real guidance": (lambda: generation.code_identity(real_guidance=True), "766e48b47cfb4496"),
    # c46afb8270fee3e0 until issue 22: the filter's texts became params (CLIP's class names, templates
    # averaged by class_directions), on purpose; the score caches are re-keyed once (docs/caching.md).
    "clip_filter": (clip_filter.code_identity, "752ce79427462a0f"),
    "language": (language.code_identity, "5e0f115274b55511"),
    "clip_tune.features": (features.code_identity, "36431ad93849fab6"),
    # An OpenCLIP model's clip-filter scores and clip-tune features also hash this (clip_model.backend_key).
    "open_clip_model": (open_clip_model.code_identity, "c94f8a0650bd7631"),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_code_identity_is_pinned(name):
    identity, pinned = PINNED[name]
    assert identity() == pinned, (
        f"{name}.code_identity() is now {identity()}, was {pinned}: every user's finished work of this kind "
        "gets a new work folder. If the change to the hashed functions is deliberate, update PINNED and "
        "state it in the release note (docs/caching.md); if not (a rename, a moved import, an edited "
        "docstring inside a hashed function), undo it.")


def test_a_transformers_clip_keeps_the_recipe_it_had_before_open_clip():
    """OpenCLIP models add their backend to the clip-filter and clip-tune keys; a transformers model's
    recipes (hence its work folders) have exactly the fields and libraries they had before (issue 31)."""
    cpu = torch.device("cpu")
    model = "openai/clip-vit-base-patch32"
    scores = clip_filter.scores_recipe(model, "fingerprint", ["goldfish"], ("a photo of a {}.",), cpu)
    assert sorted(scores) == ["code", "device", "libraries", "model", "names", "precision", "templates", "weights"]
    processor = type("Processor", (), {"to_json_string": lambda self: json.dumps({"size": 224})})()
    encoded = features.features_recipe(model, "fingerprint", processor, cpu)
    assert sorted(encoded) == ["code", "device", "libraries", "model", "precision", "processor", "weights"]
    for recipe in (scores, encoded):
        assert list(recipe["libraries"]) == ["torch", "transformers", "pillow", "numpy"]
    other = clip_filter.scores_recipe("open_clip:RN50-quickgelu/openai", "fingerprint", ["goldfish"], ("{}",), cpu)
    assert other["backend"] == "open_clip" and other["backend_code"] == open_clip_model.code_identity()
    assert "open_clip_torch" in other["libraries"] and "transformers" not in other["libraries"]
