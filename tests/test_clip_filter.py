"""The clip-filter stage (He et al.'s CLIP filter) and the kept set training reads, with the tiny CLIP on CPU."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import embedded_raw, set_param, write_synthetic_shards
from imagenet_sd.core import params
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import kept, readers, shards
from imagenet_sd.filter import clip_filter, registry
from imagenet_sd.models import clip_model, tiny_clip
from imagenet_sd.prompts import prompts
from imagenet_sd.train import state, training

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["goldfish", "pirate, pirate ship", "papillon", "lorikeet"]
KEYS = [f"n0000000{i}" for i in range(len(NAMES))]
TRAIN, HOLDOUT, PER_SHARD = 6, 1, 3          # images a class; 7 a class in shards of 3 a class: 3 shards
TARGET = 4                                   # `overgenerated`: the filter keeps 4 of the 6 a class


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path, dict[bytes, tuple[int, int]]]:
    """(shards folder with index.json, prompt table, JPEG bytes -> (label, image index)), laid out as sd-generate lays them out."""
    root = tmp_path_factory.mktemp("synthetic")
    rows = [prompts.ClassPrompt(wnid=k, index=i, c=name, h_c="", d_c="", prompt=name)
            for i, (k, name) in enumerate(zip(KEYS, NAMES))]
    prompts.write(root / "prompts.tsv", rows)
    identities = write_synthetic_shards(root / "shards", rows, TRAIN, HOLDOUT, PER_SHARD)
    return root / "shards", root / "prompts.tsv", identities


@pytest.fixture(scope="module")
def overgenerated(synthetic, tmp_path_factory) -> tuple[Path, Path, dict[bytes, tuple[int, int]]]:
    """The same images, as sd-generate publishes them with filter.overgenerate 0.5: 6 made, 4 to keep a class."""
    folder, prompts_path, identities = synthetic
    root = tmp_path_factory.mktemp("overgenerated")
    shutil.copytree(folder, root / "shards")
    index = json.loads((root / "shards" / shards.INDEX_FILE).read_text())
    index.update(overgenerate=0.5, train_targets=dict.fromkeys(KEYS, TARGET))
    (root / "shards" / shards.INDEX_FILE).write_text(json.dumps(index))
    return root / "shards", prompts_path, identities


def raw_params(tmp_path: Path, clip: Path | str, top_filter: str = "clip", **settings) -> dict:
    raw = embedded_raw()
    raw.update(profile="embedded", filter=top_filter)
    block = raw["profiles"]["embedded"]
    block["filter"].update({"model": str(clip), "device": "cpu", "workers": 0, "batch_size": 5,
                            "work_dir": str(tmp_path / "scores"), **settings})
    block["train"].update({"holdout_per_class": HOLDOUT, "work_dir": str(tmp_path / "train"), "device": "cpu"})
    return raw


def run(tmp_path: Path, synthetic, clip, name: str = "out", top_filter: str = "clip", seed: int = 0,
        **settings) -> dict:
    folder, prompts_path, _ = synthetic
    p = params.parse({**raw_params(tmp_path, clip, top_filter, **settings), "seed": seed})
    out = tmp_path / name
    registry.run(p, prompts_path, folder, out / "filtered", out / "filter.json", out / "details.json")
    return json.loads((out / "details.json").read_text())


@pytest.fixture
def counted(monkeypatch):
    """How often the stage loads CLIP and runs its image tower."""
    calls = {"load": 0, "batches": 0}
    load, score = clip_model.load, clip_model.score_batch

    def counting_load(*args, **kwargs):
        calls["load"] += 1
        return load(*args, **kwargs)

    def counting_score(*args, **kwargs):
        calls["batches"] += 1
        return score(*args, **kwargs)
    monkeypatch.setattr(clip_model, "load", counting_load)
    monkeypatch.setattr(clip_model, "score_batch", counting_score)
    return calls


def bits(out: Path) -> np.ndarray:
    return np.unpackbits(np.load(out / "filtered" / kept.BITS_FILE))[:len(KEYS) * (TRAIN + HOLDOUT)].astype(bool)


def test_the_kept_set_is_deterministic_and_keeps_the_held_out_images(tmp_path, synthetic, clip_dir):
    first = run(tmp_path / "a", synthetic, clip_dir, keep="passing")
    second = run(tmp_path / "b", synthetic, clip_dir, keep="passing", batch_size=3)   # scored again, in other batches
    assert first["scored"] == second["scored"] == len(KEYS) * (TRAIN + HOLDOUT)
    for name in (kept.BITS_FILE, kept.KEPT_FILE):
        assert (tmp_path / "a/out/filtered" / name).read_bytes() == (tmp_path / "b/out/filtered" / name).read_bytes()
    keep = bits(tmp_path / "a/out").reshape(len(KEYS), TRAIN + HOLDOUT)
    assert keep[:, :HOLDOUT].all()                   # held-out images are never filtered
    assert first["kept"] == keep[:, HOLDOUT:].sum() and first["kept"] + first["dropped"] == len(KEYS) * TRAIN
    assert first["threshold"] == 1 / len(KEYS)       # chance: He et al.'s 1 / number of classes


def test_a_threshold_or_rule_change_reuses_the_scores_and_a_killed_run_resumes(tmp_path, synthetic, clip_dir, counted):
    low = run(tmp_path, synthetic, clip_dir, "low", threshold=0.2, keep="passing")
    assert counted["load"] == 1 and counted["batches"] > 0
    before = dict(counted)
    high = run(tmp_path, synthetic, clip_dir, "high", threshold=0.3, keep="passing")
    top1 = run(tmp_path, synthetic, clip_dir, "top1", rule="top1", keep="per_class")
    assert counted == before, "a threshold or rule change ran CLIP again"
    assert high["scored"] == top1["scored"] == 0 and high["reused_shards"] == 3
    # A higher threshold keeps a subset of what a lower one keeps.
    assert not (bits(tmp_path / "high") & ~bits(tmp_path / "low")).any() and high["kept"] <= low["kept"]
    # Scores of one shard lost (a run killed before writing them): only that shard is scored again.
    scores = sorted((tmp_path / "scores").glob("*/*.npz"))
    assert len(scores) == 3
    scores[0].unlink()
    again = run(tmp_path, synthetic, clip_dir, "again", threshold=0.2, keep="passing")
    assert 0 < again["scored"] < low["scored"] and again["reused_shards"] == 2
    assert bits(tmp_path / "again").tolist() == bits(tmp_path / "low").tolist()


def test_filter_none_keeps_everything_without_loading_a_model(tmp_path, synthetic, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("filter: none loaded a model")
    monkeypatch.setattr(clip_model, "load", no_model)
    monkeypatch.setattr(clip_model, "weights", no_model)
    details = run(tmp_path, synthetic, tmp_path / "no-such-clip", top_filter="none")
    assert (details["kept"], details["dropped"], details["min_per_class"]) == (len(KEYS) * TRAIN, 0, TRAIN)
    assert kept.read(tmp_path / "out/filtered", synthetic[0]) is None
    assert not (tmp_path / "out/filtered" / kept.BITS_FILE).exists()


def test_training_reads_only_the_kept_images(tmp_path, synthetic, clip_dir):
    folder, prompts_path, identities = synthetic
    details = run(tmp_path, synthetic, clip_dir, keep="passing")
    assert 0 < details["dropped"] < len(KEYS) * TRAIN, "the test needs a rule that drops some images, not all"
    kept_set = kept.read(tmp_path / "out/filtered", folder)
    index = json.loads((folder / shards.INDEX_FILE).read_text())
    paths = [folder / entry["file"] for entry in index["shards"]]
    train, holdout = readers.shard_splits(paths, KEYS, 0, HOLDOUT, lambda b: b, lambda b: b, index,
                                       decode=lambda jpeg: jpeg, kept=kept_set)
    read = [identities[jpeg] for jpeg, _ in train]
    keep = bits(tmp_path / "out").reshape(len(KEYS), TRAIN + HOLDOUT)
    expected = {(c, i) for c in range(len(KEYS)) for i in range(HOLDOUT, TRAIN + HOLDOUT) if keep[c, i]}
    assert sorted(read) == sorted(expected) and len(train) == len(expected) == details["kept"]
    assert train.skipped.value == 0                  # left out by the filter is not "skipped"
    assert sorted(label for _, label in holdout) == list(range(len(KEYS))) == sorted(range(len(holdout)))
    # The stage's own path: train-resnet50 opens the same set, and its resume key tells it apart.
    p = params.parse(raw_params(tmp_path, clip_dir, keep="passing"))
    dataset, _ = training.open_training_set(p, KEYS, folder, kept_dir=tmp_path / "out/filtered")
    assert len(dataset) == details["kept"]
    assert state.data_identity(p, folder, tmp_path / "out/filtered") != state.data_identity(p, folder)


def test_a_kept_set_of_other_shards_is_refused(tmp_path, synthetic, clip_dir):
    run(tmp_path, synthetic, clip_dir)
    other = tmp_path / "other"
    other.mkdir()
    index = json.loads((synthetic[0] / shards.INDEX_FILE).read_text())
    (other / shards.INDEX_FILE).write_text(json.dumps({**index, "scale": 2}))
    with pytest.raises(UserError, match=r"computed for other shards .* run: dvc repro clip-filter"):
        kept.read(tmp_path / "out/filtered", other)


@pytest.mark.parametrize("key, value, allowed", [
    ("profiles.embedded.filter.rule", "top5", "top1 | threshold"),
    ("profiles.embedded.filter.threshold", 1.5, "chance (1 / number of classes) or a number > 0 and < 1"),
    ("profiles.embedded.filter.threshold", "half", "chance"),
    ("profiles.embedded.filter.keep", "all", "per_class | passing"),
    ("profiles.embedded.filter.overgenerate", -0.5, ">= 0 and <= 10"),
    ("profiles.embedded.filter.batch_size", 0, ">= 1"),
    ("profiles.embedded.filter.workers", -1, ">= 0"),
    ("profiles.embedded.filter.device", "tpu", "auto | cpu | cuda"),
    ("profiles.embedded.filter.work_dir", "", "a folder kept between runs"),
])
def test_bad_params_are_one_line_naming_the_key(tmp_path, key, value, allowed):
    raw = raw_params(tmp_path, "models/tiny-clip")
    set_param(raw, key, value)
    with pytest.raises(UserError) as error:
        params.parse(raw)
    message = str(error.value)
    assert "\n" not in message and f"{key} = " in message and allowed in message, message


def test_a_missing_model_is_one_line(tmp_path, synthetic, monkeypatch):
    key = "profiles.embedded.filter.model"
    with pytest.raises(UserError, match=rf"{key} = .*no-such-clip.*model not found") as error:
        run(tmp_path, synthetic, tmp_path / "no-such-clip")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"not a CLIP model folder \(no config.json\)"):
        run(tmp_path, synthetic, empty)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"not in the cache, and HF_HUB_OFFLINE is set") as hub:
        run(tmp_path, synthetic, "nobody-here/no-such-clip")
    assert "\n" not in str(error.value) + str(hub.value)


def test_the_metrics_are_few_and_the_details_per_class(tmp_path, synthetic, clip_dir):
    details = run(tmp_path, synthetic, clip_dir, keep="passing")
    metrics = json.loads((tmp_path / "out/filter.json").read_text())
    assert list(metrics) == ["kept", "dropped", "pass_rate", "min_pass_rate", "classes_topped_up", "min_per_class"]
    assert metrics["pass_rate"] == round(details["passed"] / (len(KEYS) * TRAIN), 4) and details["passed"] == metrics["kept"]
    assert sorted(details["per_class"]) == KEYS and min(details["per_class"].values()) == metrics["min_per_class"]
    assert min(details["pass_rate_per_class"].values()) == metrics["min_pass_rate"]
    assert details["images_per_second"] > 0


def test_either_backend_filters_per_class_and_reports_its_backbone(tmp_path, synthetic, clip_dir, open_clip_dir):
    """He et al.'s filter with transformers' tiny CLIP (a ViT) and OpenCLIP's tiny one (a ModifiedResNet,
    RN50's kind): a pass rate for every class either way, and reports/filter.json says which CLIP it was."""
    spellings = {"transformers": str(clip_dir), "open_clip": f"open_clip:local-dir:{open_clip_dir}"}
    for backend, model in spellings.items():
        details = run(tmp_path / backend, synthetic, model, keep="passing")
        assert details["backbone"] == {"model": model, "backend": backend,
                                       "weights": clip_model.weights(model, "filter.model")}
        assert details["scored"] == len(KEYS) * (TRAIN + HOLDOUT)
        rates = details["pass_rate_per_class"]
        assert sorted(rates) == KEYS and all(0 <= rate <= 1 for rate in rates.values())
        assert details["passed"] == sum(round(rate * TRAIN) for rate in rates.values())
        (recipe,) = (tmp_path / backend / "scores").glob(f"*/{clip_filter.RECIPE_FILE}")
        assert ("backend" in json.loads(recipe.read_text())) == (backend == "open_clip")   # transformers' keys as before


def test_the_tiny_clip_builds_to_the_same_bytes(tmp_path, clip_dir):
    tiny_clip.build(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (clip_dir / name).read_bytes(), name


@pytest.mark.slow
def test_the_stage_script_with_filter_none(tmp_path, synthetic):
    folder, prompts_path, _ = synthetic
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params(tmp_path, "models/tiny-clip", "none")))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages/clip_filter.py"), "--params", str(tmp_path / "params.yaml"),
         "--prompts", str(prompts_path), "--shards", str(folder), "--out", str(tmp_path / "filtered"),
         "--metrics", str(tmp_path / "filter.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"filter none: {len(KEYS) * TRAIN} of {len(KEYS) * TRAIN} training images kept" in result.stdout


def test_clip_texts_are_params_recorded_and_keyed(tmp_path, synthetic, clip_dir):
    """CLIP's class names and templates decide the scores: each choice has its own score cache and
    the details say which texts were used (docs/he2023.md#clips-class-names-and-templates)."""
    folder, prompts_path, _ = synthetic
    details = {}
    for names, templates in (("openai", "he2023"), ("wordnet", "he2023"), ("openai", "openai80")):
        raw = raw_params(tmp_path, clip_dir)
        raw.update(clip_class_names=names, clip_templates=templates)
        out = tmp_path / f"{names}-{templates}"
        registry.run(params.parse(raw), prompts_path, folder, out / "filtered", out / "filter.json",
                        out / "details.json")
        details[names, templates] = json.loads((out / "details.json").read_text())
    assert details["openai", "he2023"]["templates"] == ["a photo of a {}."]
    assert len(details["openai", "openai80"]["templates"]) == 80
    assert [d["class_names"] for d in details.values()] == ["openai", "wordnet", "openai"]
    # These classes are not ImageNet-1K's, so `openai` falls back to their own names: the same texts,
    # the same cache, nothing scored again. Other templates are other texts: a cache of their own.
    assert details["openai", "he2023"]["scores"] == details["wordnet", "he2023"]["scores"]
    assert details["wordnet", "he2023"]["scored"] == 0
    assert details["openai", "openai80"]["scores"] != details["openai", "he2023"]["scores"]
    assert details["openai", "openai80"]["scored"] == details["openai", "he2023"]["scored"] == len(KEYS) * (TRAIN + HOLDOUT)


def scores_of(tmp_path: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(own-class probability, passes chance) a training image, [class, image index - HOLDOUT], from the cache."""
    index = json.loads((folder / shards.INDEX_FILE).read_text())
    (cache,) = {path.parent for path in (tmp_path / "scores").glob("*/*.npz")}
    own = np.zeros((len(KEYS), TRAIN + HOLDOUT), np.float32)
    for entry in index["shards"]:
        scores = clip_filter.load_scores(clip_filter.scores_file(cache, entry))
        own[scores["labels"], scores["indices"]] = scores["own"]
    return own[:, HOLDOUT:], own[:, HOLDOUT:] > 1 / len(KEYS)


def test_per_class_keeps_the_target_of_every_class_passing_ones_first(tmp_path, overgenerated, clip_dir):
    """He et al.'s count: a random target's worth of the passing images when enough pass, else every
    passing one and the most confident failing ones (docs/he2023.md#clip-filtering)."""
    details = run(tmp_path, overgenerated, clip_dir)
    keep = bits(tmp_path / "out").reshape(len(KEYS), TRAIN + HOLDOUT)
    assert keep[:, :HOLDOUT].all() and keep[:, HOLDOUT:].sum(axis=1).tolist() == [TARGET] * len(KEYS)
    assert details["kept"] == len(KEYS) * TARGET and details["candidates"] == len(KEYS) * TRAIN
    own, passing = scores_of(tmp_path, overgenerated[0])
    assert 0 < passing.sum() < passing.size, "the test needs a class mix of passing and failing images"
    topped = 0
    for c in range(len(KEYS)):
        chosen = keep[c, HOLDOUT:]
        if passing[c].sum() >= TARGET:
            assert passing[c][chosen].all()
        else:
            topped += 1
            assert chosen[passing[c]].all()                   # every passing one ...
            failing = ~passing[c]                             # ... then the most confident failing ones
            assert own[c][failing & chosen].min() >= own[c][failing & ~chosen].max(initial=-1)
    assert details["classes_topped_up"] == topped and details["failing_kept"] == int((~passing & keep[:, HOLDOUT:]).sum())
    # train-resnet50 reads exactly the target a class.
    p = params.parse(raw_params(tmp_path, clip_dir))
    dataset, _ = training.open_training_set(p, KEYS, overgenerated[0], kept_dir=tmp_path / "out/filtered")
    assert len(dataset) == len(KEYS) * TARGET


def test_which_passing_images_are_kept_follows_the_seed(tmp_path, overgenerated, clip_dir):
    """When more pass than the target, the choice is random from the seed: the same seed, the same
    kept set (bytes); another seed, another set; `keep: passing` never keeps more than the target."""
    chosen = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        details = run(tmp_path, overgenerated, clip_dir, name, seed=seed, threshold=0.01)    # every image passes
        assert details["kept"] == len(KEYS) * TARGET and details["classes_topped_up"] == 0 and details["pass_rate"] == 1
        chosen[name] = bits(tmp_path / name)
    assert chosen["a"].tolist() == chosen["b"].tolist() and chosen["a"].tolist() != chosen["c"].tolist()
    passing = run(tmp_path, overgenerated, clip_dir, "passing", keep="passing", threshold=0.01)
    assert passing["kept"] == len(KEYS) * TARGET and bits(tmp_path / "passing").tolist() == chosen["a"].tolist()
    none_pass = run(tmp_path, overgenerated, clip_dir, "strict", keep="passing", threshold=0.99)
    assert (none_pass["kept"], none_pass["min_pass_rate"]) == (0, 0)
    topped = run(tmp_path, overgenerated, clip_dir, "topped", threshold=0.99)
    assert topped["kept"] == len(KEYS) * TARGET and topped["classes_topped_up"] == len(KEYS)


def test_per_class_without_overgeneration_warns_that_it_keeps_everything(tmp_path, synthetic, clip_dir, capsys):
    details = run(tmp_path, synthetic, clip_dir)
    assert details["kept"] == len(KEYS) * TRAIN and details["dropped"] == 0
    assert "keeps every image when nothing is over-generated" in capsys.readouterr().err
