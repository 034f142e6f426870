"""Prompt c_hc_bm: each class's b drawn among its top-k Places365 scenes under the generator's text encoder.

The embedded tiny model's text encoder has random weights: these tests check the
mechanics (k distinct scenes, determinism, the ranking is the cosine ranking, the
scene rule, the work-folder key, the errors), not that the matches make sense.
Whether SD v1.4's encoder puts "aquarium" near "goldfish" cannot be checked
offline, and nothing here pretends to.
"""
import copy
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from conftest import embedded_raw, run_script
from imagenet_sd.core import params as params_module
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import plan as planning
from imagenet_sd.datasets import shards
from imagenet_sd.generate import generation
from imagenet_sd.models import sd_model
from imagenet_sd.prompts import backgrounds, classes, matching, prompts
from imagenet_sd.prompts.prompts import ClassPrompt

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = embedded_raw()
PHRASES = [phrase for _, _, phrase in backgrounds.build()]
NAMES = {"n01440764": ("tench, Tinca tinca", "cyprinid"), "n01443537": ("goldfish, Carassius auratus", "cyprinid"),
         "n01484850": ("great white shark, white shark, man-eater", "mackerel shark"),
         "n01491361": ("tiger shark, Galeocerdo cuvieri", "requiem shark")}


def rows(variant: str = "c_hc_bm") -> list[ClassPrompt]:
    template = prompts.TEMPLATES[variant]
    return [ClassPrompt(wnid=w, index=i, c=c, h_c=h, d_c="", prompt=template.format(c=c, h_c=h, d_c="", b="{b}"))
            for i, (w, (c, h)) in enumerate(NAMES.items())]


@pytest.fixture(scope="module")
def encoder(tiny_model):
    # One thread: the tiny encoder's calls are too small to gain from two, and on a busy
    # 2-core machine two threads make each call ~40x slower. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield sd_model.load_text_encoder(str(tiny_model))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranked(encoder) -> list[matching.Match]:
    return matching.rank(rows(), PHRASES, 10, *encoder)


def by_class(matches: list[matching.Match]) -> dict[str, tuple[int, ...]]:
    found = {}
    for m in matches:
        found.setdefault(m.key, []).append((m.rank, m.scene))
    return {key: tuple(scene for _, scene in sorted(pairs)) for key, pairs in found.items()}


# --------------------------------------------------------------------------- the ranking

@pytest.mark.slow
def test_top_k_has_k_distinct_scenes_per_class_best_first_and_is_deterministic(encoder, ranked):
    matched = by_class(ranked)
    assert list(matched) == list(NAMES)
    for key, scenes in matched.items():
        assert len(scenes) == len(set(scenes)) == 10
        ordered = [m for m in ranked if m.key == key]
        assert [m.rank for m in ordered] == list(range(1, 11))
        assert all(m.phrase == PHRASES[m.scene] for m in ordered)
        assert [m.similarity for m in ordered] == sorted((m.similarity for m in ordered), reverse=True)
        assert ordered[0].name == NAMES[key][0].split(",")[0]
    assert len(set(matched.values())) > 1                 # classes get their own scenes
    assert matching.rank(rows(), PHRASES, 10, *encoder) == ranked       # the same on a second call


def test_ranking_is_the_cosine_ranking_of_the_pooled_text_embeddings(encoder, ranked):
    tokenizer, model = encoder
    # The embedding is the pooled output: the final-layer-norm state at the end-of-text token.
    ids = tokenizer("goldfish, Carassius auratus, cyprinid", return_tensors="pt").input_ids
    with torch.inference_mode():
        hidden = model(input_ids=ids).last_hidden_state[0]
    eos = ids[0].tolist().index(tokenizer.eos_token_id)
    assert torch.allclose(torch.from_numpy(matching.embed(["goldfish, Carassius auratus, cyprinid"], *encoder)[0]),
                          hidden[eos].double(), atol=1e-6)
    # Brute force, in plain Python, from the same embeddings.
    class_vectors = matching.embed([f"{c}, {h}" for c, h in NAMES.values()], *encoder)
    scene_vectors = matching.embed(PHRASES, *encoder)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    for key, vector in zip(NAMES, class_vectors):
        similarity = [cos(vector, s) for s in scene_vectors]
        expected = sorted(range(len(PHRASES)), key=lambda j: (-similarity[j], j))[:10]
        found = [m for m in ranked if m.key == key]
        assert [m.scene for m in found] == expected
        assert [m.similarity for m in found] == pytest.approx([similarity[j] for j in expected], abs=1e-12)


def test_ties_go_to_the_lower_scene_index():
    similarity = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]], dtype=torch.float64).numpy()
    assert matching.top_k(similarity, 4).tolist() == [[1, 3, 0, 2]]


def test_class_text_is_c_and_its_hypernym():
    row = rows()[1]
    assert matching.class_text(row) == "goldfish, Carassius auratus, cyprinid"
    assert matching.class_text(dataclasses.replace(row, h_c="")) == "goldfish, Carassius auratus"


def test_changing_k_changes_the_lists_and_the_work_folder_key(encoder, ranked):
    five = by_class(matching.rank(rows(), PHRASES, 5, *encoder))
    ten = by_class(ranked)
    assert five != ten and all(ten[key][:5] == scenes for key, scenes in five.items())   # a prefix: same ranking
    p = make_params(prompt="c_hc_bm")
    keys = {generation.work_key(recipe(p, matched)) for matched in (five, ten, None)}
    assert len(keys) == 3


# --------------------------------------------------------------------------- the prompts and the recipe

def test_c_hc_bm_prompts_name_only_the_class_top_k_cycling_through_them(ranked):
    matched = by_class(ranked)
    layout = planning.Layout(rows(), dict.fromkeys(NAMES, 25), PHRASES, per_class=25, matched=matched)
    items = [it for s in layout for it in s.items]
    assert len(items) == 100
    for key, scenes in matched.items():
        mine = [it for it in items if it.cls.key == key]
        used = Counter(it.prompt.rsplit(" inside ", 1)[1] for it in mine)
        assert set(used) == {PHRASES[s] for s in scenes}                  # all k scenes, and only them
        assert max(used.values()) - min(used.values()) <= 1               # 25 images over 10 scenes: 2 or 3 each
        for it in mine:
            scene = scenes[backgrounds.scene_for(key, it.image_index, len(scenes))]
            assert it.prompt == f"{it.cls.c}, {it.cls.h_c} inside {PHRASES[scene]}"


def old_prompt_for(row, image_index, phrases):
    """plan.prompt_for before c_hc_bm existed."""
    if prompts.BACKGROUND_SLOT not in row.prompt:
        return row.text()
    return row.text(phrases[backgrounds.scene_for(row.key, image_index, len(phrases))])


# generation.recipe's keys before c_hc_bm existed: the work folders of the other variants keep their
# keys as long as nothing is added for them (the values come from the same params either way).
RECIPE_KEYS = {"model", "weights", "resolution", "dtype", "device", "scheduler", "guidance", "steps", "seed",
               "safety_checker", "jpeg_quality", "stored_size", "images_per_class_per_shard", "classes",
               "backgrounds", "libraries", "code"}


def make_params(**top) -> params_module.Params:
    raw = copy.deepcopy(DEFAULT)
    raw.update({"profile": "embedded", **top})
    return params_module.parse(raw)


def recipe(p, matched, variant="c_hc_bm"):
    return generation.recipe(p, rows(variant), PHRASES, torch.device("cpu"), torch.float32, 2, {"weights": "weights"}, matched)


@pytest.mark.parametrize("variant", ["c", "c_hc", "c_dc", "c_hc_b"])
def test_other_variants_keep_their_prompts_and_work_folder_key(variant):
    layout = planning.Layout(rows(variant), dict.fromkeys(NAMES, 400), PHRASES, per_class=50, seed=3)
    for shard in layout:
        assert [it.prompt for it in shard.items] == [old_prompt_for(it.cls, it.image_index, PHRASES)
                                                     for it in shard.items]
    assert set(recipe(make_params(prompt=variant), None, variant)) == RECIPE_KEYS


@pytest.mark.slow
def test_c_hc_b_prompts_are_pinned():
    """Values computed with the code before c_hc_bm existed: papillon's images under c_hc_b."""
    row = prompts.class_prompt(classes.ClassSpec(index=0, wnid="n02086910"), "c_hc_b")
    assert [planning.prompt_for(row, i, PHRASES) for i in range(3)] == [
        "papillon, toy spaniel inside outdoor swimming pool", "papillon, toy spaniel inside vegetable garden",
        "papillon, toy spaniel inside cemetery"]
    texts = "\n".join(planning.prompt_for(row, i, PHRASES) for i in range(730))
    assert hashlib.sha256(texts.encode()).hexdigest()[:16] == "0a6ed25b49fb5af8"


# --------------------------------------------------------------------------- params and the table

@pytest.mark.parametrize("value", [0, 366, "x", 2.5, True])
def test_bad_top_k_is_one_line_naming_the_key_and_the_range(value):
    with pytest.raises(UserError) as info:
        make_params(background_top_k=value)
    message = str(info.value)
    assert "background_top_k" in message and repr(value) in message and ">= 1 and <= 365" in message
    assert "\n" not in message


def test_top_k_param_bounds_are_the_scene_count():
    assert params_module.NUM_SCENES == backgrounds.NUM_SCENES
    assert make_params(background_top_k=1).background_top_k == 1
    assert make_params(background_top_k=365).background_top_k == 365
    assert "c_hc_bm" in params_module.PROMPT_VARIANTS and set(params_module.PROMPT_VARIANTS) == set(prompts.TEMPLATES)


def test_matched_table_round_trips_and_is_checked(tmp_path, ranked):
    path = tmp_path / "matched.tsv"
    backgrounds.write_matched(path, [m.row() for m in ranked])
    header, first = path.read_text().splitlines()[:2]
    assert header == "class\tname\trank\tscene\tphrase\tsimilarity"
    assert first.startswith("n01440764\ttench\t1\t")
    assert backgrounds.read_matched(path, list(NAMES), 10, PHRASES) == by_class(ranked)
    stale = [(["n01440764", "n01443537"], 10, "has scenes for class n01484850"),
             (list(NAMES) + ["n09999999"], 10, "has no scenes for class n09999999"),
             (list(NAMES), 5, "but background_top_k = 5"),
             (list(NAMES), 10, "does not match the background table")]
    for keys, k, expected in stale:
        phrases = PHRASES if expected != "does not match the background table" else PHRASES[::-1]
        with pytest.raises(UserError, match=expected) as info:
            backgrounds.read_matched(path, keys, k, phrases)
        assert "dvc repro places-backgrounds" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", [None, "class\tname\trank\tscene\tphrase\tsimilarity\n"])
def test_missing_or_empty_table_says_to_run_the_stage(tmp_path, content):
    path = tmp_path / "matched.tsv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match="run: dvc repro places-backgrounds") as info:
        backgrounds.read_matched(path, list(NAMES), 10, PHRASES)
    assert "\n" not in str(info.value)


def test_missing_or_incomplete_model_is_the_generators_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = make_params(prompt="c_hc_bm")
    for model, expected in ((tmp_path / "absent", "model not found"),
                            (tmp_path, "not a complete diffusers pipeline folder")):
        if model == tmp_path:
            (tmp_path / "model_index.json").write_text("{}")
        bad = dataclasses.replace(p, generate=dataclasses.replace(p.generate, model=str(model)))
        with pytest.raises(UserError, match=f"profiles.embedded.generate.model = .*{expected}") as info:
            matching.text_encoder(bad)
        assert "\n" not in str(info.value)


def test_rehearsal_generator_has_no_text_encoder():
    p = make_params(prompt="c_hc_bm", profile="rehearsal")
    with pytest.raises(UserError, match="profiles.rehearsal.generate.model = 'rehearsal'.*has none"):
        matching.text_encoder(p)


# --------------------------------------------------------------------------- the stages

def environment() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def write_params(folder: Path, tiny: Path, **top) -> Path:
    raw = copy.deepcopy(DEFAULT)
    raw.update({"profile": "embedded", "steps": 2, "seed": 0, **top})
    raw["profiles"]["embedded"]["generate"].update(model=str(tiny), resolution=64, batch_size=4, processes=1,
                                                   images_per_shard=4, device="cpu",
                                                   work_dir=str(folder / "work"))
    train = folder / "train"
    for wnid in NAMES:
        (train / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (train / wnid / f"{i}.JPEG").write_bytes(b"")
    raw["profiles"]["embedded"]["data"]["train"] = str(train)
    raw["profiles"]["embedded"]["train"]["holdout_per_class"] = 0
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    prompts.write(folder / "prompts.tsv", rows(top.get("prompt", "c_hc_bm")))
    return folder / "params.yaml"


def places_stage(folder: Path) -> subprocess.CompletedProcess:
    return run_script([sys.executable, str(ROOT / "stages" / "places_backgrounds.py"),
                       "--params", str(folder / "params.yaml"), "--out", str(folder / "bg.tsv"),
                       "--prompts", str(folder / "prompts.tsv"), "--matched", str(folder / "matched.tsv")],
                      cwd=folder, env=environment())


def generate_stage(folder: Path) -> subprocess.CompletedProcess:
    return run_script([sys.executable, str(ROOT / "stages" / "sd_generate.py"),
                       "--params", str(folder / "params.yaml"), "--prompts", str(folder / "prompts.tsv"),
                       "--backgrounds", str(folder / "bg.tsv"), "--matched", str(folder / "matched.tsv"),
                       "--out", str(folder / "out"), "--metrics", str(folder / "metrics.json"),
                       "--grid", str(folder / "grid.png")],
                      cwd=folder, env=environment())


def test_other_prompts_write_a_header_only_table_without_loading_a_model(tmp_path):
    write_params(tmp_path, Path("/no/such/model"), prompt="c_hc_b")
    result = places_stage(tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "matched.tsv").read_text() == "class\tname\trank\tscene\tphrase\tsimilarity\n"
    assert backgrounds.read_phrases(tmp_path / "bg.tsv") == PHRASES


@pytest.mark.slow
def test_c_hc_bm_without_its_table_is_one_line(tmp_path, tiny_model):
    write_params(tmp_path, tiny_model, prompt="c_hc_bm")
    backgrounds.write(tmp_path / "bg.tsv", backgrounds.build())
    for table in (None, ""):            # missing, then header only (written for another prompt)
        if table is not None:
            backgrounds.write_matched(tmp_path / "matched.tsv", [])
        result = generate_stage(tmp_path)
        assert result.returncode == 2
        assert result.stderr.startswith("error:") and "run: dvc repro places-backgrounds" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.slow
def test_c_hc_bm_end_to_end_images_name_only_their_class_scenes(tmp_path, tiny_model):
    write_params(tmp_path, tiny_model, prompt="c_hc_bm", background_top_k=2)
    result = places_stage(tmp_path)
    assert result.returncode == 0, result.stderr
    matched = backgrounds.read_matched(tmp_path / "matched.tsv", list(NAMES), 2, PHRASES)
    result = generate_stage(tmp_path)
    assert result.returncode == 0, result.stderr
    records = [record for path in shards.list_shards(tmp_path / "out")
               for _, _, record in shards.iter_shard(path)]
    assert len(records) == 3 * len(NAMES)
    for record in records:
        scene = record["prompt"].rsplit(" inside ", 1)[1]
        assert scene in {PHRASES[s] for s in matched[record["class"]]}
    index = json.loads((tmp_path / "out" / shards.INDEX_FILE).read_text())
    assert index["prompt"] == "c_hc_bm" and index["background_top_k"] == 2
    assert "2 scenes closest to it under the generator's text encoder" in (tmp_path / "out" / "README.md").read_text()
    recipe_ = json.loads(next((tmp_path / "work").glob("*/recipe.json")).read_text())
    assert recipe_["matched_backgrounds"] == {key: list(scenes) for key, scenes in matched.items()}
