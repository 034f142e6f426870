"""The digits profile (docs/digits.md): the paper's protocol with a generator that has learned something.

One end-to-end run, shared by the tests below: sd-generate draws a clone of the digits from their
class names with the generator setup trained (models/digits-sd), train-resnet50 trains on it alone,
eval-imagenet scores it on the real test split, which neither has seen. It is smaller than the main
job (half the images, 15 DDIM steps, 10 epochs, timm's resnet10t instead of ResNet-50), and still far
above chance in every class, so a label that goes astray anywhere between the shards and the scores
fails here: the swapped classes' top-1 falls towards 0 while the others hold. (ResNet-50's own
learning from the clone is the main job's number, 82 %: docs/digits.md.)
"""
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from imagenet_sd.core import params as params_module
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import digits, imagenet_scan, shards
from imagenet_sd.digits import generator
from imagenet_sd.evaluate import evaluation
from imagenet_sd.generate import generation, memorisation
from imagenet_sd.prompts import backgrounds, classes, prompts
from imagenet_sd.train import training

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((ROOT / "params.yaml").read_text())
# The label path is under test, not the network: timm's resnet10t trains in 15 s where ResNet-50 takes 57 s
# (one thread), and separates the classes more (87 % in all, the weakest, 2, at 57 %; ResNet-50 here: 74 %
# and 36 %). With the prompts of classes 3 and 8 swapped, theirs fell to 7.3 % and 0.0 % (docs/digits.md).
ARCH = "timm:resnet10t"
PER_CLASS_FLOOR = 25.0      # every class far above chance (10 %): a swap of two classes' labels takes theirs towards 0


@pytest.fixture(scope="module")
def assets():
    if not (digits.is_current(ROOT / "data/digits") and generator.is_current(ROOT / generator.DEFAULT_DIR)):
        pytest.fail("the digits profile's data and generator are not built: run bash scripts/setup.sh "
                    "(dvc repro digits-assets)")
    return ROOT / "data/digits", ROOT / generator.DEFAULT_DIR


def digits_params(tmp: Path, **top) -> params_module.Params:
    p = params_module.parse(dict(SHIPPED, **top))
    return dataclasses.replace(
        p, generate=dataclasses.replace(p.generate, work_dir=tmp / "generate", model=str(ROOT / p.generate.model)),
        data=dataclasses.replace(p.data, train=ROOT / p.data.train,
                                test_sets={**p.data.test_sets, "val": ROOT / p.data.val}),
        train=dataclasses.replace(p.train, epochs=10, batch_size=32, arch=ARCH, work_dir=tmp / "train", device="cpu"),
        evaluate=dataclasses.replace(p.evaluate, work_dir=tmp / "evaluate", device="cpu"))


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    """sd-generate -> train-resnet50 -> eval-imagenet on the digits profile, in-process."""
    tmp = tmp_path_factory.mktemp("digits")
    p = digits_params(tmp, scale=0.5, steps=15, scheduler="ddim", guidance=2.0)
    rows = prompts.build(classes.load_class_set("digits"), p.prompt)
    prompts.write(tmp / "prompts.tsv", rows)
    phrases = [phrase for _, _, phrase in backgrounds.build()]
    plan = generation.make_plan(p, rows, phrases)
    gen = generation.generate(p, plan, tmp / "synthetic", tmp / "generate.json")
    train = training.run(p, tmp / "prompts.tsv", tmp / "synthetic", tmp / "resnet50.pt", tmp / "train.json",
                         tmp / "live")
    scores = evaluation.run(p, tmp / "resnet50.pt", tmp / "imagenet.json", tmp / "imagenet.tsv",
                            tmp / "imagenet-details.json")
    return {"tmp": tmp, "params": p, "generate": gen, "train": train, "scores": scores}


@pytest.mark.slow
def test_a_clone_made_from_class_names_teaches_every_digit(run):
    val = run["scores"]["val"]
    per_class = val["per_class_top1"]
    assert set(per_class) == set(classes.digits_wnids())
    low = {wnid: top1 for wnid, top1 in per_class.items() if top1 < PER_CLASS_FLOOR}
    assert not low, f"classes far below the others on the real test split (a label mix-up?): {low}; all: {per_class}"
    assert val["top1"] > 60, val


@pytest.mark.slow
def test_the_generator_draws_new_digits_not_copies_of_its_training_split(run):
    copies = run["generate"]["memorisation"]
    assert copies["real_images"] == 1258 and copies["generated_checked"] == run["generate"]["images"]
    assert copies["memorised_share"] < 5, copies


def test_memorisation_catches_copies(tmp_path):
    """The check itself: a dataset of the train images' own pixels is all near copies."""
    paths = sorted((ROOT / "data/digits/train").rglob("*.png"))[:200]
    samples = []
    for i, path in enumerate(paths):
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, "JPEG", quality=95)
        samples.append((shards.sample_key(0, i), buffer.getvalue(), {"label": 0}))
    size, sha = shards.write_shard(tmp_path / "shard-000000.tar", samples)
    (tmp_path / shards.INDEX_FILE).write_text(json.dumps(
        {"classes": ["n13742358"], "counts": {"n13742358": len(samples)}, "resolution": 8, "stored_size": None,
         "shards": [{"file": "shard-000000.tar", "images": len(samples)}]}))
    copies = memorisation.check(ROOT / "data/digits/train", tmp_path)
    assert copies["memorised_share"] > 90, copies


def test_a_class_the_generator_never_learned_is_refused_in_one_line(assets, tmp_path):
    p = digits_params(tmp_path, classes="imagenet100")
    rows = prompts.build(classes.load_class_set("imagenet100"), "c")
    with pytest.raises(UserError, match=r"not among the 10 classes .*generate.model .* trained on") as err:
        generation.make_plan(p, rows, [])
    assert "\n" not in str(err.value)


def test_a_missing_test_split_is_named_with_its_key(assets, tmp_path):
    p = digits_params(tmp_path)
    p = dataclasses.replace(p, data=dataclasses.replace(p.data, test_sets={**p.data.test_sets,
                                                                        "val": tmp_path / "no-test-split"}))
    with pytest.raises(UserError, match=r"profiles\.digits\.data\.val") as err:
        imagenet_scan.validate(p)
    assert "\n" not in str(err.value)


def test_the_split_is_fixed_stratified_and_disjoint():
    pixels, labels = digits.load()
    split = digits.split(labels)
    assert (len(split["train"]), len(split["test"])) == (1258, 539)
    assert not set(split["train"]) & set(split["test"])
    assert np.array_equal(split["test"], digits.split(labels)["test"])
    share = np.bincount(labels[split["test"]]) / np.bincount(labels)
    assert np.all(np.abs(share - 0.3) < 0.01), share


def test_resolution_is_checked_against_the_models_own_vae_scale_factor(assets, tiny_model):
    from imagenet_sd.models import families, sd_model
    sd = families.FAMILIES["sd"]
    assert sd_model.vae_scale_factor(str(assets[1])) == 1 and sd_model.vae_scale_factor(str(tiny_model)) == 8
    families.check_resolution(sd, 12, "profiles.digits.generate", "models/digits-sd", 1)    # any size >= 8
    with pytest.raises(UserError, match="multiple of 8"):
        families.check_resolution(sd, 12, "profiles.embedded.generate", "models/tiny-sd", 8)
