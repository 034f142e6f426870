"""CLIP's texts (prompts.clip_texts): the class names and templates clip-filter and clip-tune use."""
import pytest

from conftest import embedded_raw
from imagenet_sd.core import params as params_module
from imagenet_sd.core.io import read_tsv
from imagenet_sd.prompts import clip_texts
from imagenet_sd.prompts.classes import imagenet1k_wnids
from imagenet_sd.prompts.prompts import ClassPrompt


def row(index: int, wnid: str, c: str) -> ClassPrompt:
    return ClassPrompt(wnid=wnid, index=index, c=c, h_c="", d_c="", prompt=c)


def test_the_openai_names_file_is_imagenet_1k_in_class_index_order():
    rows = read_tsv(clip_texts.NAMES_FILE)
    assert [int(r["index"]) for r in rows] == list(range(1000))
    assert [r["wnid"] for r in rows] == list(imagenet1k_wnids())
    assert all(r["name"].strip() == r["name"] and r["name"] for r in rows)


def test_openai_names_by_wnid_and_custom_classes_keep_their_own():
    rows = [row(2, "", "my widget, gadget"), row(0, "n01440764", "tench, Tinca tinca"),
            row(1, "n04606251", "wreck")]                     # given out of order: names come in logit order
    assert clip_texts.names(rows, "openai") == ["tench", "shipwreck", "my widget"]
    assert clip_texts.names(rows, "wordnet") == ["tench", "wreck", "my widget"]


def test_templates_by_choice_and_stage():
    eighty = clip_texts.templates("openai80", "filter")
    assert len(eighty) == len(set(eighty)) == 80 and all("{}" in t for t in eighty)
    assert clip_texts.templates("openai80", "tune") == eighty
    # He et al.'s code: one template to filter, CLIP's 7-template ImageNet ensemble to tune.
    assert clip_texts.templates("he2023", "filter") == ("a photo of a {}.",)
    assert clip_texts.templates("he2023", "tune") == clip_texts.ENSEMBLE_7 and len(set(clip_texts.ENSEMBLE_7)) == 7
    assert set(clip_texts.ENSEMBLE_7) <= set(eighty)
    assert clip_texts.templates("single", "tune") == ("a photo of a {}.",)


@pytest.mark.parametrize("key, value", [("clip_class_names", "clip"), ("clip_templates", "eighty")])
def test_a_bad_choice_is_one_line_naming_the_choices(key, value):
    raw = embedded_raw()
    raw[key] = value
    with pytest.raises(params_module.UserError, match=rf"{key} = '{value}'.*(openai|he2023)"):
        params_module.parse(raw)
