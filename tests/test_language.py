"""Prompt le: He et al.'s language enhancement, a T5 sentence for every image (module language).

The embedded tiny T5 has random weights: these tests check the mechanics (seeding, dedup,
exhaustion and reuse, counts, files, resume, the work-folder key, the errors), not that the
sentences mean anything; what CommonGen's T5 writes cannot be checked offline.
"""
import copy
import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import embedded_raw, run_script
from imagenet_sd.core import params as params_module
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import plan as planning
from imagenet_sd.datasets import shards
from imagenet_sd.generate import generation
from imagenet_sd.language import language
from imagenet_sd.models import tiny_t5
from imagenet_sd.prompts import prompts
from imagenet_sd.prompts.prompts import ClassPrompt

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = embedded_raw()
NAMES = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark, white shark, man-eater"}
REAL = {"n01440764": 3, "n01443537": 5, "n01484850": 2}


@pytest.fixture(scope="module")
def t5(tiny_t5_dir):
    return language.load(str(tiny_t5_dir), "profiles.embedded.generate.language_model", torch.device("cpu"))


def rows(variant: str = "le") -> list[ClassPrompt]:
    template = prompts.TEMPLATES[variant]
    return [ClassPrompt(wnid=w, index=i, c=c, h_c="fish", d_c="a fish",
                        prompt=template.format(c=c, h_c="fish", d_c="a fish", b="{b}", s="{s}"))
            for i, (w, c) in enumerate(NAMES.items())]


def train_folder(root: Path) -> Path:
    for wnid, n in REAL.items():
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / wnid / f"{i}.JPEG").write_bytes(b"")
    return root


def make_params(tmp_path: Path, model: Path | str, scale: float = 1.0, holdout: int = 1, **top):
    raw = copy.deepcopy(DEFAULT)
    raw.update({"profile": "embedded", "prompt": "le", **top})
    p = params_module.parse(raw)
    generate = dataclasses.replace(p.generate, language_model=str(model), work_dir=tmp_path / "work", device="cpu")
    return dataclasses.replace(p, generate=generate, scale=scale,
                               data=dataclasses.replace(p.data, train=train_folder(tmp_path / "train")),
                               train=dataclasses.replace(p.train, holdout_per_class=holdout))


def table(folder: Path) -> list[tuple[str, int, str]]:
    lines = (folder / language.TABLE).read_text().splitlines()
    assert lines[0] == "\t".join(language.COLUMNS)
    return [(k, int(i), s) for k, i, s in (line.split("\t", 2) for line in lines[1:])]


# --------------------------------------------------------------------------- the tiny T5

def test_tiny_t5_is_deterministic_and_shipped_like_the_real_checkpoint(tiny_t5_dir, tmp_path):
    again = tmp_path / "again"
    assert tiny_t5.build(again) is True and tiny_t5.build(again) is False
    files = sorted(p.name for p in again.iterdir())
    assert "spiece.model" in files and "config.json" in files and "tokenizer.json" not in files
    assert {p.name: p.read_bytes() for p in again.iterdir()} == \
        {p.name: p.read_bytes() for p in tiny_t5_dir.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]      # no temporary folder left


def test_tiny_t5_tokenizer_loads_from_spiece_model_and_round_trips(t5):
    assert type(t5.tokenizer).__name__ == "T5Tokenizer" and type(t5.net).__name__ == "T5ForConditionalGeneration"
    ids = t5.tokenizer(language.model_input("great white shark")).input_ids
    assert ids[-2:] == [1, 1]               # keytotext's "</s>" and the tokenizer's own
    assert t5.tokenizer.decode(ids, skip_special_tokens=True) == "great white shark"
    assert t5.net.config.vocab_size == len(t5.tokenizer)


# --------------------------------------------------------------------------- sampling

def test_a_candidate_depends_on_its_seed_alone(t5):
    whole = t5.sample("goldfish", 0, "n01443537", 0, 12)
    assert t5.sample("goldfish", 0, "n01443537", 0, 12) == whole
    assert t5.sample("goldfish", 0, "n01443537", 0, 5) + t5.sample("goldfish", 0, "n01443537", 5, 7) == whole
    assert t5.sample("goldfish", 0, "n01443537", 7, 1) == whole[7:8]
    assert t5.sample("goldfish", 1, "n01443537", 0, 12) != whole          # another seed
    assert t5.sample("goldfish", 0, "n01440764", 0, 12) != whole          # another class
    assert all("\t" not in s and "\n" not in s and s == s.strip() for s in whole)


def test_gumbel_top_k_draws_from_the_softmax_over_the_top_k():
    rows_, vocab = 20000, 60
    scores = torch.linspace(3.0, -3.0, vocab).repeat(rows_, 1)
    noise = torch.stack([language.gumbel(j) for j in range(rows_)])
    out = language.GumbelTopK(noise)(torch.zeros(rows_, 1, dtype=torch.long), scores)
    picks = out.argmax(1)
    assert torch.isfinite(out).sum(1).eq(1).all()                         # one token left a row
    assert picks.max() < language.TOP_K                                     # only the top 50 are drawn
    expected = torch.softmax(scores[0, :language.TOP_K], 0)
    found = torch.bincount(picks, minlength=language.TOP_K).float() / rows_
    assert (found - expected).abs().max() < 0.01                            # 3 sigma is ~0.008 at p = 0.1


# --------------------------------------------------------------------------- streams: dedup, exhaustion, reuse

def fake(texts):
    """A sampler whose candidate j is texts(j), counting its calls."""
    calls = []

    def sample(start, count):
        calls.append((start, count))
        return [texts(j) for j in range(start, start + count)]
    sample.calls = calls
    return sample


def test_duplicates_and_empty_candidates_are_skipped_first_occurrence_first():
    stream = language.Stream(key="k", name="thing")
    language.extend(stream, 4, fake(lambda j: ["", "a", "b", "a", "", "c", "b", "d", "e"][j % 9]))
    assert stream.sentences[:4] == ["a", "b", "c", "d"] and stream.first[:4] == [1, 2, 5, 7]


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1024])
def test_the_stream_does_not_depend_on_batch_size_or_on_being_extended(batch_size):
    texts = lambda j: f"s{(j * 7919) % 1500}"       # noqa: E731  1,500 distinct, then repeats
    reference = language.Stream(key="k", name="thing")
    language.extend(reference, 1400, fake(texts), batch_size=1024)
    stream = language.Stream(key="k", name="thing")
    for need in (3, 40, 1400):                       # a scale-up: the first sentences stay
        language.extend(stream, need, fake(texts), batch_size=batch_size)
        assert stream.sentences[:need] == reference.sentences[:need]


def test_a_window_adding_few_new_sentences_ends_the_stream_and_images_reuse_sentences():
    sample = fake(lambda j: f"s{j % 5}")
    stream = language.Stream(key="k", name="thing")
    language.extend(stream, 12, sample, batch_size=100)
    assert stream.exhausted and stream.sentences == [f"s{i}" for i in range(5)]
    assert stream.candidates == language.WINDOW                  # one window, then it stopped
    assert all(count <= 100 for _, count in sample.calls)
    assert [stream.sentence(i) for i in range(12)] == [f"s{i % 5}" for i in range(12)]
    empty = language.Stream(key="k", name="thing")
    language.extend(empty, 3, fake(lambda j: ""))
    assert empty.exhausted and [empty.sentence(i) for i in range(3)] == ["thing"] * 3   # the class name
    with pytest.raises(ValueError):
        language.Stream(key="k", name="thing").sentence(0)      # not drawn yet is not a reuse


def test_a_productive_window_does_not_end_the_stream():
    stream = language.Stream(key="k", name="thing")
    language.extend(stream, language.WINDOW + 10, fake(lambda j: f"s{j // 4}"))    # 256 new a window
    assert not stream.exhausted and len(stream.sentences) >= language.WINDOW + 10


# --------------------------------------------------------------------------- the stage's files

def test_one_sentence_per_image_held_out_ones_included_read_back_by_offsets(tmp_path, t5, tiny_t5_dir):
    p = make_params(tmp_path, tiny_t5_dir, scale=2.0, holdout=1, le_sentences_per_class=0)
    out = tmp_path / "sentences"
    language.write(p, rows(), out, tmp_path / "details.json", model=t5)
    counts = planning.counts_for(p, rows())
    assert counts == {w: 2 * n + 1 for w, n in REAL.items()}
    found = table(out)
    assert Counter(k for k, _, _ in found) == counts
    assert [(k, i) for k, i, _ in found] == [(k, i) for k in NAMES for i in range(counts[k])]   # logit order
    for key in NAMES:
        mine = [s for k, _, s in found if k == key]
        assert len(set(mine)) == len(mine) and all(mine)                     # distinct, none empty
    index = json.loads((out / language.INDEX).read_text())
    assert index["counts"] == counts and index["reused"] == 0 and index["short_classes"] == {}
    details = json.loads((tmp_path / "details.json").read_text())
    assert details["made"] == sum(counts.values()) and details["sentences_per_second"] > 0
    reader = language.Sentences(out)
    reader.check(counts)
    assert [reader.text(r, i) for r in rows() for i in range(counts[r.key])] == [s for _, _, s in found]
    offsets = np.load(out / language.OFFSETS)
    assert offsets.dtype == np.uint64 and len(offsets) == len(found) + 1


def test_n_sentences_a_class_are_the_first_n_of_the_stream_and_images_cycle_over_them(tmp_path, t5, tiny_t5_dir):
    """le_sentences_per_class (He et al.: 200 a class, 10 images each): image i gets sentence i mod N;
    the streams' cache is the same, only sd-generate's key says N (docs/he2023.md#language-enhancement)."""
    one = make_params(tmp_path, tiny_t5_dir, scale=2.0, le_sentences_per_class=0)
    language.write(one, rows(), tmp_path / "one", tmp_path / "one.json", model=t5)
    two = make_params(tmp_path, tiny_t5_dir, scale=2.0, le_sentences_per_class=2)
    language.write(two, rows(), tmp_path / "two", tmp_path / "two.json", model=t5)
    counts = planning.counts_for(two, rows())
    assert min(counts.values()) > 2, "the test needs classes of more images than sentences"
    each, shared = table(tmp_path / "one"), table(tmp_path / "two")
    assert [(k, i) for k, i, _ in shared] == [(k, i) for k, i, _ in each]
    for key in NAMES:
        mine = [s for k, _, s in each if k == key]
        assert [s for k, _, s in shared if k == key] == [mine[i % 2] for i in range(counts[key])]
    details = json.loads((tmp_path / "two.json").read_text())
    assert details["made"] == 0, "the streams' cache was not shared"
    assert (details["distinct_per_class_max"], details["distinct"]) == (2, 2 * len(NAMES))
    assert details["images_per_sentence_max"] == -(-max(counts.values()) // 2)
    assert json.loads((tmp_path / "one.json").read_text())["distinct"] == sum(counts.values())
    readers = {name: language.Sentences(tmp_path / name) for name in ("one", "two")}
    assert readers["two"].per_class == 2 and readers["one"].per_class == 0
    assert "sentences_per_class" not in json.loads((tmp_path / "one" / language.INDEX).read_text())
    keys = {name: generation.work_key(recipe(one, "le", reader)) for name, reader in readers.items()}
    assert keys["one"] != keys["two"]
    assert "sentences_per_class" not in recipe(one, "le", readers["one"])["language"]


def test_same_sentences_whatever_the_batch_size_and_a_cached_rerun_draws_nothing(tmp_path, t5, tiny_t5_dir):
    outs = []
    for batch_size in (3, 1024):
        folder = tmp_path / str(batch_size)
        p = make_params(folder, tiny_t5_dir)
        language.write(p, rows(), folder / "sentences", folder / "details.json", batch_size=batch_size, model=t5)
        outs.append((folder / "sentences" / language.TABLE).read_bytes())
    assert outs[0] == outs[1]
    language.write(p, rows(), folder / "again", folder / "details.json", model=t5)
    assert json.loads((folder / "details.json").read_text())["made"] == 0
    assert (folder / "again" / language.TABLE).read_bytes() == outs[1]


def test_a_scale_up_keeps_every_sentence_and_draws_only_the_new_ones(tmp_path, t5, tiny_t5_dir):
    language.write(make_params(tmp_path, tiny_t5_dir), rows(), tmp_path / "1x", model=t5)
    language.write(make_params(tmp_path, tiny_t5_dir, scale=3.0), rows(), tmp_path / "3x", tmp_path / "d.json", model=t5)
    small, large = table(tmp_path / "1x"), set(table(tmp_path / "3x"))
    assert set(small) <= large
    # Sentences cached beyond 1x's needs (a call draws a few spare candidates) are not drawn again.
    assert 0 < json.loads((tmp_path / "d.json").read_text())["made"] <= len(large) - len(small)


class Killed(Exception):
    pass


def test_a_killed_run_keeps_its_finished_classes_and_ends_with_the_same_sentences(tmp_path, t5, tiny_t5_dir):
    uninterrupted = tmp_path / "whole"
    language.write(make_params(uninterrupted, tiny_t5_dir), rows(), uninterrupted / "out", model=t5)

    class Dying:
        """The T5 until its `calls_left`-th call, which dies like a killed process (mid-class)."""
        def __init__(self, calls_left):
            self.calls_left, self.calls, self.device = calls_left, [], t5.device

        def sample(self, name, *args):
            self.calls.append(name)
            self.calls_left -= 1
            if self.calls_left < 0:
                raise Killed
            return t5.sample(name, *args)

    p = make_params(tmp_path / "killed", tiny_t5_dir)
    out = tmp_path / "killed" / "out"
    with pytest.raises(Killed):
        language.write(p, rows(), out, model=Dying(2))          # two classes finished, the third dies
    assert not (out / language.INDEX).exists() and not (out / language.TABLE).exists()
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]
    again = Dying(100)
    language.write(p, rows(), out, model=again)
    assert again.calls == ["great white shark"]                 # only the unfinished class is drawn
    assert (out / language.TABLE).read_bytes() == (uninterrupted / "out" / language.TABLE).read_bytes()


def test_short_classes_are_counted(tmp_path, monkeypatch, tiny_t5_dir):
    class Repetitive:
        device = torch.device("cpu")

        def sample(self, name, seed, key, start, count):
            return [f"{name} {j % 2}" for j in range(start, start + count)]
    p = make_params(tmp_path, tiny_t5_dir)
    language.write(p, rows(), tmp_path / "out", tmp_path / "d.json", model=Repetitive())
    index = json.loads((tmp_path / "out" / language.INDEX).read_text())
    counts = planning.counts_for(p, rows())
    assert index["short_classes"] == {k: 2 for k in NAMES}
    assert index["reused"] == sum(n - 2 for n in counts.values())
    assert json.loads((tmp_path / "d.json").read_text())["short_classes"] == 3
    assert [s for k, i, s in table(tmp_path / "out") if k == "n01440764"] == ["tench 0", "tench 1"] * 2


def test_other_prompts_write_the_header_only_without_a_model(tmp_path):
    p = make_params(tmp_path, "/no/such/model", prompt="c")
    out = tmp_path / "sentences"
    assert "header only" in language.write(p, [], out, tmp_path / "d.json")
    assert table(out) == [] and np.load(out / language.OFFSETS).tolist() == [len("class\timage_index\tsentence\n")]
    with pytest.raises(UserError, match="written for prompt = 'c'.*dvc repro language-enhancement"):
        language.Sentences(out)


def test_a_table_for_other_counts_or_none_at_all_is_one_line(tmp_path, t5, tiny_t5_dir):
    with pytest.raises(UserError, match="no sentence table.*run: dvc repro language-enhancement") as info:
        language.Sentences(tmp_path / "absent")
    assert "\n" not in str(info.value)
    p = make_params(tmp_path, tiny_t5_dir)
    language.write(p, rows(), tmp_path / "out", model=t5)
    reader = language.Sentences(tmp_path / "out")
    other = planning.counts_for(dataclasses.replace(p, scale=2.0), rows())
    with pytest.raises(UserError, match="has 4 sentences for class n01440764, which has 7 images") as info:
        reader.check(other)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- prompts, plan and the work key

def test_image_i_is_prompted_with_sentence_i(tmp_path, t5, tiny_t5_dir):
    p = make_params(tmp_path, tiny_t5_dir)
    language.write(p, rows(), tmp_path / "out", model=t5)
    reader = language.Sentences(tmp_path / "out")
    layout = planning.Layout(rows(), reader.counts, [], per_class=2, sentences=reader)
    expected = {(k, i): s for k, i, s in table(tmp_path / "out")}
    items = [it for shard in layout for it in shard.items]
    assert len(items) == len(expected)
    assert all(it.prompt == expected[(it.cls.key, it.image_index)] for it in items)
    with pytest.raises(ValueError):
        rows()[0].text()                    # le's "{s}" needs a sentence


def recipe(p, variant, sentences=None):
    return generation.recipe(p, rows(variant), [], torch.device("cpu"), torch.float32, 2, {"weights": "weights"},
                             sentences=sentences)


@pytest.mark.parametrize("variant", ["c", "c_hc", "c_dc", "c_hc_b", "c_hc_bm"])
def test_other_variants_keep_their_work_folder_key(tmp_path, variant, tiny_t5_dir):
    # generation.recipe's keys before le existed (tests/test_matched_backgrounds.py RECIPE_KEYS).
    keys = {"model", "weights", "resolution", "dtype", "device", "scheduler", "guidance", "steps", "seed",
            "safety_checker", "jpeg_quality", "stored_size", "images_per_class_per_shard", "classes",
            "backgrounds", "libraries", "code"}
    assert set(recipe(make_params(tmp_path, tiny_t5_dir, prompt=variant), variant)) == keys


def test_le_work_key_follows_the_sentences_key_not_the_scale(tmp_path, t5, tiny_t5_dir):
    keys = {}
    for scale in (1.0, 3.0):
        p = make_params(tmp_path, tiny_t5_dir, scale=scale)
        language.write(p, rows(), tmp_path / f"out{scale}", model=t5)
        keys[scale] = generation.work_key(recipe(p, "le", language.Sentences(tmp_path / f"out{scale}")))
    assert keys[1.0] == keys[3.0]          # a scale-up reuses the finished shards
    reader = language.Sentences(tmp_path / "out1.0")
    reader.key = "another"
    assert generation.work_key(recipe(make_params(tmp_path, tiny_t5_dir), "le", reader)) != keys[1.0]


# --------------------------------------------------------------------------- params and model errors

@pytest.mark.parametrize("value, allowed", [("", "a local folder or Hugging Face id of a T5 model"),
                                            (5, "a string")])
def test_bad_language_model_param_is_one_line(value, allowed):
    raw = copy.deepcopy(DEFAULT)
    raw["profiles"]["embedded"]["generate"]["language_model"] = value
    with pytest.raises(UserError) as info:
        params_module.parse(raw)
    message = str(info.value)
    assert "profiles.embedded.generate.language_model" in message and allowed in message and "\n" not in message


def test_the_t5_writes_from_clips_class_names_or_the_first_wordnet_lemma(tmp_path, tiny_t5_dir):
    """The two ImageNet cranes share their first lemma; CLIP's curated names tell the bird from the machine
    (docs/he2023.md#what-le-does-and-why-it-differs). Each class's stream is keyed by its input words."""
    cranes = {"n02012849": "crane", "n03126707": "crane"}
    (tmp_path / "train").mkdir()
    for wnid in cranes:
        (tmp_path / "train" / wnid).mkdir()
        (tmp_path / "train" / wnid / "0.JPEG").write_bytes(b"")
    crane_rows = [ClassPrompt(wnid=w, index=i, c=c, h_c="", d_c="", prompt="{s}") for i, (w, c) in enumerate(cranes.items())]

    class Echo:
        device = torch.device("cpu")

        def sample(self, name, seed, key, start, count):
            return [f"a photo of a {name}, take {j}" for j in range(start, start + count)]
    found = {}
    for choice in ("clip", "wordnet"):
        p = make_params(tmp_path / choice, tiny_t5_dir, le_class_names=choice, holdout=0)
        p = dataclasses.replace(p, data=dataclasses.replace(p.data, train=tmp_path / "train"))
        language.write(p, crane_rows, tmp_path / choice / "out", tmp_path / choice / "d.json", model=Echo())
        found[choice] = {(k, i): s for k, i, s in table(tmp_path / choice / "out")}
        details = json.loads((tmp_path / choice / "d.json").read_text())
        assert details["class_names"] == {"clip": "clip (openai)", "wordnet": "wordnet (first lemma)"}[choice]
    assert found["clip"][("n02012849", 0)] == "a photo of a crane bird, take 0"
    assert found["clip"][("n03126707", 0)] == "a photo of a construction crane, take 0"
    assert found["wordnet"][("n02012849", 0)] == found["wordnet"][("n03126707", 0)] == "a photo of a crane, take 0"
    assert details["names_other_than_first_lemma"] == {}
    assert json.loads((tmp_path / "clip" / "d.json").read_text())["names_other_than_first_lemma"] == \
        {"n02012849": "crane bird", "n03126707": "construction crane"}


def test_images_per_sentence_gives_consecutive_images_one_sentence_and_a_scale_up_keeps_them(tmp_path, t5, tiny_t5_dir):
    """le_images_per_sentence k: image i gets sentence i // k (He et al.: 10 consecutive images a sentence),
    ceil(images / k) distinct sentences a class, so a scale-up only adds sentences for its new images."""
    found = {}
    for scale in (1.0, 3.0):
        p = make_params(tmp_path, tiny_t5_dir, scale=scale, le_sentences_per_class=0, le_images_per_sentence=2)
        out = tmp_path / f"out{scale:g}"
        language.write(p, rows(), out, tmp_path / "d.json", model=t5)
        found[scale] = table(out)
        counts = planning.counts_for(p, rows())
        for key, n in counts.items():
            mine = [s for k, _, s in found[scale] if k == key]
            assert mine[::2] == mine[1::2] + ([mine[-1]] if n % 2 else [])     # pairs share a sentence
            assert len(set(mine)) == -(-n // 2)                                  # ceil(n / 2) distinct ones
        assert language.Sentences(out).per_sentence == 2                         # in sd-generate's work key
        assert json.loads((tmp_path / "d.json").read_text())["images_per_sentence"] == 2
    at_1x = {(k, i): s for k, i, s in found[1.0]}
    assert all(s == at_1x[k, i] for k, i, s in found[3.0] if (k, i) in at_1x)     # every image keeps its sentence


def test_images_per_sentence_beside_sentences_per_class_is_one_line():
    with pytest.raises(UserError, match=r"le_images_per_sentence = 10 is not valid; allowed: 0 while "
                                        r"le_sentences_per_class is set"):
        params_module.parse({**copy.deepcopy(DEFAULT), "le_images_per_sentence": 10})


def test_bad_le_class_names_is_one_line():
    with pytest.raises(UserError, match=r"le_class_names = 'openai' is not valid; allowed: clip \| wordnet"):
        params_module.parse({**copy.deepcopy(DEFAULT), "le_class_names": "openai"})


@pytest.mark.parametrize("value", [-1, 2.5, "all"])
def test_bad_sentences_per_class_is_one_line(value):
    raw = {**copy.deepcopy(DEFAULT), "le_sentences_per_class": value}
    with pytest.raises(UserError) as info:
        params_module.parse(raw)
    message = str(info.value)
    assert "le_sentences_per_class = " in message and "an integer >= 0" in message and "\n" not in message


def test_the_profiles_name_the_tiny_t5_and_he_et_al_s_checkpoint():
    assert params_module.parse(DEFAULT).generate.language_model == str(tiny_t5.DEFAULT_DIR)
    raw = copy.deepcopy(DEFAULT)
    raw["profile"] = "paper"
    assert params_module.parse(raw).generate.language_model == "mrm8488/t5-base-finetuned-common_gen"
    assert "le" in params_module.PROMPT_VARIANTS and set(params_module.PROMPT_VARIANTS) == set(prompts.TEMPLATES)


def test_missing_or_wrong_models_are_one_line_naming_the_param(tmp_path, monkeypatch, tiny_t5_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)                   # models/tiny-t5 is not built here
    key = "profiles.embedded.generate.language_model"
    empty, clip = tmp_path / "empty", tmp_path / "clip"
    empty.mkdir()
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip"}))
    cases = [("models/tiny-t5", "model not found.*dvc repro embedded-assets"),
             (str(tmp_path / "absent" / "x"), "model not found"),
             ("someone/not-cached-t5", "not in the cache, and HF_HUB_OFFLINE is set"),
             (str(empty), "not a T5 model folder \\(no config.json\\)"),
             (str(clip), "is a clip model, not T5")]
    for model, expected in cases:
        with pytest.raises(UserError, match=f"{key} = .*{expected}") as info:
            language.load(model, key, torch.device("cpu"))
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- the stages

def environment() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))


def write_params(folder: Path, t5_dir, tiny_sd, **top) -> Path:
    raw = copy.deepcopy(DEFAULT)
    raw.update({"profile": "embedded", "prompt": "le", "steps": 2, "seed": 0, **top})
    raw["profiles"]["embedded"]["generate"].update(model=str(tiny_sd), language_model=str(t5_dir), batch_size=4,
                                                   processes=1, images_per_shard=3, device="cpu",
                                                   work_dir=str(folder / "work"))
    raw["profiles"]["embedded"]["data"]["train"] = str(train_folder(folder / "train"))
    raw["profiles"]["embedded"]["train"]["holdout_per_class"] = 0
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    prompts.write(folder / "prompts.tsv", rows(top.get("prompt", "le")))
    return folder / "params.yaml"


def stage(folder: Path, script: str, *args) -> subprocess.CompletedProcess:
    return run_script([sys.executable, str(ROOT / "stages" / script), "--params", str(folder / "params.yaml"),
                       *map(str, args)], cwd=folder, env=environment())


def le_stage(folder: Path) -> subprocess.CompletedProcess:
    return stage(folder, "language_enhancement.py", "--prompts", folder / "prompts.tsv",
                 "--out", folder / "sentences", "--details", folder / "language.json")


@pytest.mark.slow
def test_stage_with_a_bad_model_exits_2_with_one_line(tmp_path, tiny_model):
    write_params(tmp_path, tmp_path / "no-such-t5", tiny_model)
    result = le_stage(tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "profiles.embedded.generate.language_model" in lines[0]


@pytest.mark.slow
def test_le_end_to_end_every_image_records_its_sentence(tmp_path, tiny_t5_dir, tiny_model):
    write_params(tmp_path, tiny_t5_dir, tiny_model)
    result = le_stage(tmp_path)
    assert result.returncode == 0, result.stderr
    (tmp_path / "bg.tsv").write_text("index\tcategory\tphrase\n")
    result = stage(tmp_path, "sd_generate.py", "--prompts", tmp_path / "prompts.tsv", "--backgrounds",
                   tmp_path / "bg.tsv", "--sentences", tmp_path / "sentences", "--out", tmp_path / "out",
                   "--metrics", tmp_path / "metrics.json", "--grid", tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    sentences = {(k, i): s for k, i, s in table(tmp_path / "sentences")}
    records = [r for path in shards.list_shards(tmp_path / "out") for _, _, r in shards.iter_shard(path)]
    assert len(records) == len(sentences) == sum(REAL.values())
    assert all(r["prompt"] == sentences[(r["class"], r["image_index"])] for r in records)
    index = json.loads((tmp_path / "out" / shards.INDEX_FILE).read_text())
    assert index["prompt"] == "le" and index["language_model"] == str(tiny_t5_dir)
    recipe_ = json.loads(next((tmp_path / "work").glob("*/recipe.json")).read_text())
    assert recipe_["language"]["key"] == json.loads((tmp_path / "sentences" / language.INDEX).read_text())["key"]
