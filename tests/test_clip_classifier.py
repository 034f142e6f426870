"""The clip-tune stage (He et al.'s classifier tuning of CLIP), with the tiny CLIP on CPU."""
import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from conftest import embedded_raw, noise_jpeg, run_script, set_param, write_synthetic_shards
from imagenet_sd.clip_tune import features, stage, tuning
from imagenet_sd.core import params
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import fewshot, kept, shards
from imagenet_sd.models import clip_model
from imagenet_sd.prompts import clip_texts, prompts

ROOT = Path(__file__).resolve().parents[1]
WNIDS = (ROOT / "data/classes/imagenet100.txt").read_text().split()[:4]
NAMES = ["goldfish", "pirate, pirate ship", "papillon", "lorikeet"]
TRAIN, HOLDOUT, PER_SHARD = 6, 1, 3          # synthetic images a class; shards of 3 a class: 3 shards
REAL, VAL = 3, 2                             # real train and val images a class


def image_folders(root: Path, per_class: int, salt: int, names=WNIDS) -> Path:
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{name}_{i}.JPEG").write_bytes(noise_jpeg(salt, c, i))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Prompt table, shards laid out as sd-generate lays them out, a kept set of everything, real
    train / val folders, a transfer folder, and a K-shot table of 2 shots."""
    root = tmp_path_factory.mktemp("world")
    rows = [prompts.ClassPrompt(wnid=w, index=i, c=name, h_c="", d_c="", prompt=name)
            for i, (w, name) in enumerate(zip(WNIDS, NAMES))]
    prompts.write(root / "prompts.tsv", rows)
    folder = root / "shards"
    write_synthetic_shards(folder, rows, TRAIN, HOLDOUT, PER_SHARD, image=lambda label, index: noise_jpeg(0, label, index))
    kept.write_everything(root / "filtered", folder)
    train = image_folders(root / "train", REAL, 1)
    image_folders(root / "val", VAL, 2)
    image_folders(root / "textures" / "train", 2, 3, names=["dotted", "striped_wide"])
    image_folders(root / "textures" / "test", 2, 4, names=["dotted", "striped_wide"])
    fewshot.write(root / "shots0.tsv", [])
    fewshot.write(root / "shots2.tsv", fewshot.draw(rows, train, 2, 0, "data.train"))
    return {"root": root, "prompts": root / "prompts.tsv", "shards": folder, "kept": root / "filtered"}


def raw_params(tmp_path: Path, world: dict, clip: Path | str, **settings) -> dict:
    raw = embedded_raw()
    raw.update(profile="embedded", clip_tune=True, shots=0, init_strength=0)
    block = raw["profiles"]["embedded"]
    root = world["root"]
    block["data"] = {"train": str(root / "train"), "val": str(root / "val"), "v2": "", "sketch": str(root / "val"),
                     "r": "", "a": "", "val_labels": ""}
    block["transfer"]["datasets"] = {"textures": str(root / "textures")}
    block["clip_classifier"].update({"model": str(clip), "device": "cpu", "workers": 0, "epochs": 3, "batch_size": 5,
                                     "encode_batch_size": 4, "work_dir": str(tmp_path / "features"), **settings})
    return raw


def run(tmp_path: Path, world: dict, clip, name: str = "out", shots: int = 0, kept_dir: Path | None = None,
        top: dict | None = None, **settings) -> tuple[dict, dict, Path]:
    """(metrics, details, output folder) of the stage."""
    raw = raw_params(tmp_path, world, clip, **settings)
    raw.update(shots=shots)
    raw.update(top or {})
    out = tmp_path / name
    stage.run(params.parse(raw), world["prompts"], world["shards"], kept_dir or world["kept"],
                        world["root"] / f"shots{shots}.tsv", out / "clip.json", out / "details.json", out / "curve.tsv")
    return json.loads((out / "clip.json").read_text()), json.loads((out / "details.json").read_text()), out


# --------------------------------------------------------------------------- the zero-shot head

def test_the_zero_shot_head_is_logit_scale_times_the_normalised_text_embeddings(clip_dir):
    clip = clip_model.load(str(clip_dir), "model", torch.device("cpu"))
    names = clip_texts.names([prompts.ClassPrompt("", i, n, "", "", "") for i, n in enumerate(NAMES)], "wordnet")
    directions = clip_model.class_directions(clip, names, clip_texts.ENSEMBLE_7, torch.device("cpu"))
    for row, name in zip(directions, names):        # each class alone, the texts in another batch
        texts = [t.format(name) for t in clip_texts.ENSEMBLE_7]
        alone = clip_model.text_features(clip, texts, torch.device("cpu"))
        assert torch.allclose(row, F.normalize(alone.mean(dim=0), dim=0), atol=1e-5)
    scale = tuning.logit_scale(clip)
    head = tuning.zero_shot_head(directions, scale)
    assert torch.allclose(head.weight, scale * directions) and not head.bias.any()
    # With one template, its logits on CLIP's image embedding are CLIPModel's own logits_per_image.
    one = clip_model.class_directions(clip, names, ("a photo of a {}.",), torch.device("cpu"))
    image = Image.open(io.BytesIO(noise_jpeg(9))).convert("RGB")
    pixels = clip.processor(images=[image], return_tensors="pt")["pixel_values"]
    tokens = clip.tokenizer([f"a photo of a {n}." for n in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = clip.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                              pixel_values=pixels).logits_per_image
        got = tuning.zero_shot_head(one, scale)(features.ImageTower(clip)(pixels))
    assert torch.allclose(got, expected, atol=1e-4)


# --------------------------------------------------------------------------- training on cached features

def feature_shards(folder: Path, classes: int, per_class: int, seed: int, means: torch.Tensor,
                   per_shard: int = 4, noise: float = 0.3) -> list[Path]:
    """Shard feature files as the stage caches them: class c's images near means[c], image indices 0.."""
    rng = np.random.default_rng(seed)
    files = []
    for k, start in enumerate(range(0, per_class, per_shard)):
        indices = np.arange(start, min(start + per_shard, per_class))
        labels = np.repeat(np.arange(classes), len(indices))
        x = means.numpy()[labels] + noise * rng.standard_normal((len(labels), means.shape[1]))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        path = folder / f"{k}.npz"
        features.save_shard(path, [np.stack([labels, np.tile(indices, classes)], 1)],
                                   [x.astype(np.float16)], means.shape[1])
        files.append(path)
    return files


def recipe(tmp_path: Path, world: dict, **settings) -> params.Params:
    return params.parse(raw_params(tmp_path, world, "models/tiny-clip", **settings))


@pytest.fixture
def toy(tmp_path):
    """4 separable classes in 16-d (nearest class mean: 96 % right); a zero-shot head that confuses
    each class with the next (its directions halfway between them)."""
    torch.manual_seed(0)
    means = F.normalize(torch.randn(4, 16), dim=-1)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    train = features.SyntheticSet(feature_shards(tmp_path / "train", 4, 40, 1, means), HOLDOUT, None)
    test = features.SyntheticSet(feature_shards(tmp_path / "test", 4, 50, 2, means), 0, None)
    x, y = zip(*test.batches(0, 1000, 0))
    misleading = F.normalize(means + means.roll(-1, dims=0), dim=-1)
    return train, (torch.cat(x), torch.cat(y), None), tuning.zero_shot_head(misleading, 10.0)


def test_training_on_cached_features_is_deterministic(tmp_path, world, toy):
    train, _, head = toy
    raw = raw_params(tmp_path, world, "models/tiny-clip", epochs=4, batch_size=16)
    runs = []
    for seed in (0, 0, 1):
        tuned = copy.deepcopy(head)
        history = tuning.train_head(tuned, train, None, params.parse({**raw, "seed": seed}),
                                             torch.device("cpu"), {})
        runs.append((tuned.weight.detach().clone(), history))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert not torch.equal(runs[0][0], runs[2][0]), "the seed does not reach the batch order"
    assert len(runs[0][1]) == 4 and runs[0][1][-1]["lr"] < runs[0][1][0]["lr"]


@pytest.mark.slow
def test_the_tuned_head_beats_the_zero_shot_head_on_a_separable_problem(tmp_path, world, toy):
    train, test, head = toy
    before = tuning.top1(head, test, torch.device("cpu"))
    after = {}
    for soft in (0.0, 0.5):
        tuned = copy.deepcopy(head)
        p = recipe(tmp_path, world, epochs=40, batch_size=16, lr=0.05, soft_label=soft)
        history = tuning.train_head(tuned, train, None, p, torch.device("cpu"), {"test": test})
        after[soft] = tuning.top1(tuned, test, torch.device("cpu"))
        assert history[-1]["test_top1"] == after[soft] and history[-1]["loss"] < history[0]["loss"]
    assert before < 60 and after[0.0] > 90, (before, after)
    # The zero-shot head's soft labels hold the tuned one back towards it, not below it.
    assert before + 20 < after[0.5] < after[0.0], (before, after)


def test_an_epoch_reads_every_training_image_once_in_a_new_order(tmp_path, monkeypatch):
    means = F.normalize(torch.randn(3, 8), dim=-1)
    files = feature_shards(tmp_path, 3, 23, 0, means, per_shard=5)
    monkeypatch.setattr(features, "BUFFER_IMAGES", 20)      # several buffers an epoch
    synthetic = features.SyntheticSet(files, 2, None)
    assert len(synthetic) == 3 * 21 and len(synthetic.holdout[1]) == 3 * 2
    epochs = []
    for epoch in (0, 1):
        batches = list(synthetic.batches(epoch, 8, 0))
        assert len(batches) == -(-len(synthetic) // 8) and all(len(y) == 8 for _, y in batches[:-1])
        x = torch.cat([x for x, _ in batches])
        assert torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=1e-5)
        epochs.append(x)
    assert len({tuple(row.tolist()) for row in epochs[0]}) == len(synthetic)
    assert sorted(map(tuple, epochs[0].tolist())) == sorted(map(tuple, epochs[1].tolist()))
    assert not torch.equal(epochs[0], epochs[1])


def test_only_kept_images_are_trained_on(tmp_path):
    means = F.normalize(torch.randn(2, 8), dim=-1)
    files = feature_shards(tmp_path, 2, 6, 0, means, per_shard=6)
    index = {"classes": ["a", "b"], "counts": {"a": 6, "b": 6}}
    keep = np.ones(12, dtype=bool)
    keep[6 + 2:6 + 6] = False                    # class b keeps images 0 (held out) and 1
    keep[3] = False                              # class a drops image 3
    bits = np.packbits(keep)
    kept_set = kept.KeptSet(offsets=kept.offsets(index), bits=bits, dropped_per_shard={})
    synthetic = features.SyntheticSet(files, 1, kept_set)
    labels = torch.cat([y for _, y in synthetic.batches(0, 4, 0)])
    assert len(synthetic) == (6 - 1 - 1) + (6 - 1 - 4) == len(labels)
    assert sorted(labels.tolist()) == [0] * 4 + [1]
    assert kept_set.keeps_all(np.array([0, 0, 1, 1, 1]), np.array([3, 4, 1, 2, 99])).tolist() == \
        [kept_set.keeps(0, 3), kept_set.keeps(0, 4), kept_set.keeps(1, 1), kept_set.keeps(1, 2), True]


# --------------------------------------------------------------------------- the stage

def test_the_stage_scores_both_heads_with_few_metrics(tmp_path, world, clip_dir):
    metrics, details, out = run(tmp_path, world, clip_dir)
    assert set(metrics) == {"zero_shot", "tuned"}
    assert set(metrics["tuned"]) == {"val", "sketch"} and set(metrics["zero_shot"]) == {"val", "sketch", "transfer"}
    flat = [leaf for head in metrics.values() for m in head.values() for leaf in m]
    assert len(flat) < 15 and set(flat) == {"top1", "average_top1"}
    assert details["setting"] == "zero-shot" and details["train_images"] == len(WNIDS) * TRAIN
    assert details["holdout_images"] == len(WNIDS) * HOLDOUT and details["real_images"] == 0
    assert details["zero_shot"]["val"]["images"] == len(WNIDS) * VAL
    assert details["skipped_test_sets"] == ["v2", "r", "a"]
    assert details["transfer_zero_shot"]["textures"]["classes"] == 2
    assert details["features"]["encoded"] == len(WNIDS) * (TRAIN + HOLDOUT)
    curve = (out / "curve.tsv").read_text().splitlines()
    assert curve[0].split("\t") == ["epoch", "loss", "lr", "holdout_top1", "val_top1"] and len(curve) == 1 + 3


def test_the_stage_tunes_an_open_clip_model(tmp_path, world, open_clip_dir):
    """clip-tune on the embedded tiny OpenCLIP (a ResNet image tower, RN50's kind): the same stage,
    its features keyed by OpenCLIP's preprocessing and backend, the details naming it."""
    model = f"open_clip:local-dir:{open_clip_dir}"
    metrics, details, _ = run(tmp_path, world, model, epochs=1)
    assert details["backbone"] == {"model": model, "backend": "open_clip", "weights": details["weights"]}
    assert set(metrics["tuned"]) == {"val", "sketch"} and details["train_images"] == len(WNIDS) * TRAIN
    assert details["features"]["encoded"] == len(WNIDS) * (TRAIN + HOLDOUT) and details["transfer_zero_shot"]["textures"]
    recipe = json.loads((Path(details["features"]["folder"]) / features.RECIPE_FILE).read_text())
    assert recipe["backend"] == "open_clip" and recipe["processor"]["open_clip_preprocess"]["size"] == 64
    assert "open_clip_torch" in recipe["libraries"]


@pytest.mark.slow
def test_the_features_are_cached_and_reused_by_another_recipe(tmp_path, world, clip_dir, monkeypatch):
    _, first, _ = run(tmp_path, world, clip_dir, "first")
    passes = []
    forward = features.ImageTower.forward
    monkeypatch.setattr(features.ImageTower, "forward",
                        lambda self, pixels: passes.append(len(pixels)) or forward(self, pixels))
    _, second, _ = run(tmp_path, world, clip_dir, "second", epochs=2, lr=0.01)
    assert passes == [] and second["features"]["encoded"] == 0
    assert second["features"]["reused_shards"] == 3 and second["features"]["test_sets_from_cache"] == ["sketch", "val"]
    assert second["zero_shot"] == first["zero_shot"]
    # The features of one shard lost (a run killed before writing them): only that shard is encoded again.
    next(Path(first["features"]["folder"], "shards").glob("*.npz")).unlink()
    _, third, _ = run(tmp_path, world, clip_dir, "third")
    assert third["features"]["encoded"] == len(WNIDS) * PER_SHARD and third["features"]["reused_shards"] == 2
    assert third["tuned"] == first["tuned"]


def test_the_stage_trains_on_the_kept_set(tmp_path, world, clip_dir):
    index = json.loads((world["shards"] / shards.INDEX_FILE).read_text())
    keep = np.ones(len(WNIDS) * (TRAIN + HOLDOUT), dtype=bool)
    keep[HOLDOUT:TRAIN + HOLDOUT] = False                  # class 0 keeps its held-out image only
    kept.write(tmp_path / "filtered", world["shards"], keep, {"filter": "clip"})
    assert kept.read(tmp_path / "filtered", world["shards"]) is not None and kept.offsets(index)[-1] == len(keep)
    _, details, _ = run(tmp_path, world, clip_dir, kept_dir=tmp_path / "filtered")
    assert details["train_images"] == (len(WNIDS) - 1) * TRAIN and details["holdout_images"] == len(WNIDS) * HOLDOUT


def test_few_shot_adds_the_real_images(tmp_path, world, clip_dir):
    _, details, _ = run(tmp_path, world, clip_dir, shots=2)
    assert details["setting"] == "few-shot" and details["real_images"] == 2 * len(WNIDS)
    assert details["training"]["lr"] == 0.001                 # few_shot_lr, He et al.'s ct_fsl
    with pytest.raises(UserError, match=r"shots = 2; run: dvc repro few-shot"):
        run(tmp_path, world, clip_dir, "stale", shots=0, top={"shots": 2})


def test_clip_tune_false_writes_skipped_without_a_model(tmp_path, world, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("clip_tune: false loaded a model")
    monkeypatch.setattr(clip_model, "load", no_model)
    monkeypatch.setattr(clip_model, "weights", no_model)
    metrics, details, out = run(tmp_path, world, tmp_path / "no-such-clip", top={"clip_tune": False})
    assert metrics == {"skipped": True} and details == {"skipped": "clip_tune: false"}
    assert (out / "curve.tsv").read_text().splitlines() == ["\t".join(stage.CURVE)]


@pytest.mark.parametrize("key, value, allowed", [
    ("clip_tune", "yes", "true or false"),
    ("profiles.embedded.clip_classifier.epochs", 0, ">= 1"),
    ("profiles.embedded.clip_classifier.lr", 0, "> 0"),
    ("profiles.embedded.clip_classifier.few_shot_lr", 2, "<= 1"),
    ("profiles.embedded.clip_classifier.weight_decay", -0.1, ">= 0"),
    ("profiles.embedded.clip_classifier.batch_size", 0, ">= 1"),
    ("profiles.embedded.clip_classifier.real_batch_size", 1.5, "an integer"),
    ("profiles.embedded.clip_classifier.soft_label", 1.5, "<= 1"),
    ("profiles.embedded.clip_classifier.soft_label_temperature", 0, "> 0"),
    ("profiles.embedded.clip_classifier.workers", -1, ">= 0"),
    ("profiles.embedded.clip_classifier.device", "tpu", "auto | cpu | cuda"),
    ("profiles.embedded.clip_classifier.work_dir", "", "a folder kept between runs"),
])
def test_bad_params_are_one_line_naming_the_key(tmp_path, world, key, value, allowed):
    raw = raw_params(tmp_path, world, "models/tiny-clip")
    set_param(raw, key, value)
    with pytest.raises(UserError) as error:
        params.parse(raw)
    message = str(error.value)
    assert "\n" not in message and f"{key} = " in message and allowed in message, message


def test_a_missing_model_fails_in_one_line_before_any_work(tmp_path, world):
    with pytest.raises(UserError, match=r"clip_classifier.model = .*no-such-clip") as error:
        run(tmp_path, world, tmp_path / "no-such-clip")
    assert "\n" not in str(error.value) and not (tmp_path / "features").exists()


@pytest.mark.slow
def test_the_stage_script(tmp_path, world, clip_dir):
    raw = raw_params(tmp_path, world, clip_dir)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    args = [sys.executable, "stages/clip_tune.py", "--params", str(tmp_path / "params.yaml"),
            "--prompts", str(world["prompts"]), "--shards", str(world["shards"]), "--kept", str(world["kept"]),
            "--shots", str(world["root"] / "shots0.tsv"), "--metrics", str(tmp_path / "clip.json"),
            "--details", str(tmp_path / "details.json"), "--plot", str(tmp_path / "curve.tsv")]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "clip-tune (zero-shot)" in result.stdout and json.loads((tmp_path / "clip.json").read_text())["tuned"]
    raw["profiles"]["embedded"]["clip_classifier"]["lr"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    bad = run_script(args, cwd=ROOT)         # bad params: the one line, without another process start
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "clip_classifier.lr" in bad.stderr
