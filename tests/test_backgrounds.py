"""Places365 backgrounds and the rule giving each image its scene."""
from collections import Counter

import pytest

from imagenet_sd.prompts import backgrounds


def test_365_readable_phrases():
    rows = backgrounds.build()
    assert len(rows) == 365
    phrases = {category: phrase for _, category, phrase in rows}
    assert phrases["/a/airfield"] == "airfield"
    assert phrases["/c/church/indoor"] == "indoor church"
    assert phrases["/a/apartment_building/outdoor"] == "outdoor apartment building"
    assert phrases["/s/stadium/baseball"] == "baseball stadium"
    assert all("_" not in p and "/" not in p for p in phrases.values())
    assert len(set(phrases.values())) == 365


def test_phrase_table_round_trips(tmp_path):
    path = tmp_path / "backgrounds.tsv"
    backgrounds.write(path, backgrounds.build())
    assert backgrounds.read_phrases(path)[0] == "airfield"


@pytest.mark.parametrize("count", [1, 100, 365, 732, 1300])
def test_each_class_uses_scenes_as_evenly_as_its_count_allows(count):
    uses = Counter(backgrounds.scene_for("n02086910", i) for i in range(count))
    assert len(uses) == min(count, 365)
    assert max(uses.values()) - min(uses.values()) <= 1


def test_scene_of_an_image_is_fixed_and_classes_differ():
    first = [backgrounds.scene_for("n02086910", i) for i in range(50)]
    backgrounds._permutation.cache_clear()      # as in a fresh process
    assert [backgrounds.scene_for("n02086910", i) for i in range(50)] == first
    assert [backgrounds.scene_for("n03947888", i) for i in range(50)] != first
    assert backgrounds.scene_for("n02086910", 365 + 7) == first[7]
