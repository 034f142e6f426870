"""eval-imagenet: top-k, class subsets, IN-R/IN-A logit restriction, layouts, reference models and errors."""
from __future__ import annotations

import dataclasses
import json
import tarfile
import unittest.mock
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from conftest import embedded_raw
from imagenet_sd.core import params as params_module
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import read_tsv
from imagenet_sd.datasets import imagenet_scan, inference, transforms, val_labels
from imagenet_sd.datasets.imagenet_sets import TEST_SETS
from imagenet_sd.evaluate import checkpoints, evaluation, representation
from imagenet_sd.prompts import classes

REPO = Path(__file__).resolve().parents[1]
IN100 = list(classes.imagenet100_wnids())
IN1K = classes.imagenet1k_wnids()


def write_images(folder: Path, count: int, colour=(120, 60, 200)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (40, 36), colour).save(folder / f"img_{i}.JPEG")


def make_params(data: dict, references: dict | None = None, **evaluate) -> params_module.Params:
    base = params_module.parse(embedded_raw())
    # The keys of the embedded profile's data block, as params.yaml has them, and those given.
    roots = {name: (Path(data[name]) if data.get(name) else None)
             for name in dict.fromkeys(["train", *base.data.test_sets, *data, "val_labels"])}
    weights = {name: (references or {}).get(name) for name in params_module.REFERENCE_MODELS}
    ev = dataclasses.replace(base.evaluate, resize=36, crop=32, batch_size=8, device="cpu",
                             reference_models=weights, **evaluate)
    return dataclasses.replace(base, profile="embedded", evaluate=ev, data=params_module.DataParams(
        train=roots.pop("train"), val_labels=roots.pop("val_labels"), test_sets=roots))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=len(IN100))
    path = tmp_path_factory.mktemp("model") / "resnet50.pt"
    torch.save({"arch": "resnet50", "classes": IN100, "wnids": IN100, "state_dict": model.state_dict(),
                "image_size": 32, "params": {}}, path)
    return path


class ConstantLogits(nn.Module):
    """A fake classifier: the same logits for every image."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


# --------------------------------------------------------------------------- top-k

def test_topk_correct_on_known_logits():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],   # top1 = 1
                           [0.9, 0.1, 0.8, 0.7, 0.6, 0.5],   # label 5 is 5th
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.0]])  # label 5 is last
    labels = torch.tensor([1, 5, 5])
    assert inference.topk_correct(logits, labels) == {1: 1, 5: 2}


def test_topk_skips_k_larger_than_logits():
    logits = torch.tensor([[0.2, 0.5, 0.1], [0.9, 0.0, 0.1]])
    assert inference.topk_correct(logits, torch.tensor([1, 2])) == {1: 1}


# --------------------------------------------------------------------------- plans

def test_r_restriction_scores_shared_classes_despite_non_shared_favourite():
    r_wnids = imagenet_scan.subset_of(TEST_SETS["r"])
    model_wnids = IN100
    shared = [w for w in model_wnids if w in r_wnids]
    outside = next(i for i, w in enumerate(model_wnids) if w not in r_wnids)
    target = model_wnids.index(shared[0])
    logits = [0.0] * len(model_wnids)
    logits[outside] = 10.0   # favourite class is not in IN-R: ignored after restriction
    logits[target] = 5.0
    by_wnid = {shared[0]: [Path("x.jpg")] * 3, shared[1]: [Path("y.jpg")] * 2}
    eval_plan = imagenet_scan.plan(TEST_SETS["r"], by_wnid, model_wnids)
    assert eval_plan.columns == [model_wnids.index(w) for w in shared]
    restricted = torch.tensor(logits)[eval_plan.columns].expand(5, -1)
    labels = torch.tensor([label for _, label in eval_plan.samples])
    assert inference.topk_correct(restricted, labels)[1] == 3

    # Unrestricted (as for val) the same logits get every image wrong.
    full = imagenet_scan.plan(TEST_SETS["val"], by_wnid, model_wnids)
    full_labels = torch.tensor([label for _, label in full.samples])
    assert inference.topk_correct(torch.tensor(logits).expand(5, -1), full_labels)[1] == 0


def test_imagenetv2_variants_are_scored_like_v2(tmp_path):
    """threshold-0.7 and top-images: registered in datasets/imagenet_sets.py alone, read from params as v2 is."""
    for name in ("v2_threshold", "v2_top"):
        write_images(tmp_path / name / str(IN1K.index(IN100[3])), 2)
    p = make_params({"v2_threshold": tmp_path / "v2_threshold", "v2_top": tmp_path / "v2_top"})
    scanned = imagenet_scan.validate(p)
    assert {name: sorted(by_wnid) for name, by_wnid in scanned.items()} == {"v2_threshold": [IN100[3]],
                                                                             "v2_top": [IN100[3]]}
    assert imagenet_scan.plan(TEST_SETS["v2_top"], scanned["v2_top"], IN100).samples[0][1] == 3
    with pytest.raises(UserError, match=r"data\.v2_top = .*class folders named 0\.\.999"):
        imagenet_scan.validate(make_params({"v2_top": tmp_path / "v2_threshold" / str(IN1K.index(IN100[3]))}))


def test_v2_numeric_folders_map_to_wnids(tmp_path):
    for wnid in (IN100[0], IN100[7], IN1K[999]):
        write_images(tmp_path / str(IN1K.index(wnid)), 1)
    by_wnid = imagenet_scan.scan_test_set("embedded", TEST_SETS["v2"], tmp_path)
    assert sorted(by_wnid) == sorted([IN100[0], IN100[7], IN1K[999]])
    eval_plan = imagenet_scan.plan(TEST_SETS["v2"], by_wnid, IN100)
    assert sorted(label for _, label in eval_plan.samples) == [0, 7]   # IN1K[999] is not an IN-100 class
    assert len(eval_plan.columns) == 100


# --------------------------------------------------------------------------- end to end

def fixture_like_tree(root: Path) -> dict[str, Path]:
    """val + R + A folders: shared and non-shared classes, counts chosen to be checkable."""
    outside_in100 = [w for w in IN1K if w not in set(IN100)][:2]
    for w in IN100[:4] + outside_in100:
        write_images(root / "val" / w, 1)
    for name, subset in (("r", imagenet_scan.subset_of(TEST_SETS["r"])), ("a", imagenet_scan.subset_of(TEST_SETS["a"]))):
        shared = [w for w in IN100 if w in subset]
        others = sorted(subset - set(IN100))[:2]
        for w in shared[:3]:
            write_images(root / name / w, 2)
        for w in others:
            write_images(root / name / w, 1)
    return {"val": root / "val", "r": root / "r", "a": root / "a"}


@pytest.mark.slow
def test_in100_model_on_val_r_a_counts_shared_and_skips_unconfigured(tmp_path, checkpoint, capsys):
    roots = fixture_like_tree(tmp_path / "data")
    params = make_params(roots)
    metrics = evaluation.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv")

    assert metrics["skipped"] == ["v2", "sketch"]
    assert metrics["val"]["images"] == 4 and metrics["val"]["classes"] == 4
    assert metrics["val"]["logits"] == 100
    shared_r = [w for w in IN100 if w in imagenet_scan.subset_of(TEST_SETS["r"])]
    assert metrics["r"]["images"] == 6 and metrics["r"]["classes"] == 3
    assert metrics["r"]["logits"] == len(shared_r)
    for name in ("val", "r", "a"):
        assert 0 <= metrics[name]["top1"] <= metrics[name]["top5"] <= 100
    assert json.loads((tmp_path / "m.json").read_text()) == evaluation.headline(metrics)
    assert json.loads((tmp_path / "m.json").read_text())["val"] == {k: metrics["val"][k] for k in ("top1", "top5")}
    assert metrics["reference"] == {} and metrics["reference_skipped"] == list(params_module.REFERENCE_MODELS)
    rows = read_tsv(tmp_path / "p.tsv")
    assert [r["test_set"] for r in rows] == ["val", "r", "a"] and {r["model"] for r in rows} == {"trained"}
    out = capsys.readouterr().out
    assert "v2: skipped" in out and "torchvision-resnet50: skipped" in out


def test_constant_model_scores_exactly(tmp_path, checkpoint, monkeypatch):
    """All images of one shared class + logits favouring it -> 100% top-1 on val and on R."""
    wnid = next(w for w in IN100 if w in imagenet_scan.subset_of(TEST_SETS["r"]))
    write_images(tmp_path / "val" / wnid, 3)
    write_images(tmp_path / "r" / wnid, 2)
    logits = [0.0] * 100
    logits[IN100.index(wnid)] = 1.0
    fake = checkpoints.LoadedModel(ConstantLogits(logits), IN100, IN100)
    monkeypatch.setattr(evaluation, "load_checkpoint", lambda path: fake)
    params = make_params({"val": tmp_path / "val", "r": tmp_path / "r"})
    metrics = evaluation.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv")
    assert metrics["val"] == {"top1": 100.0, "top5": 100.0, "classes": 1, "images": 3, "logits": 100,
                              "per_class_top1": {wnid: 100.0}}      # per class: only classes with images
    assert metrics["r"]["top1"] == 100.0 and metrics["r"]["images"] == 2
    assert "per_class_top1" not in json.loads((tmp_path / "m.json").read_text())["val"]   # the details only


def test_per_class_top1_tells_the_classes_apart(tmp_path, checkpoint, monkeypatch):
    """A model that always answers class A: 100 % on A's images, 0 on B's; the total is their mix."""
    a, b = IN100[:2]
    write_images(tmp_path / "val" / a, 3)
    write_images(tmp_path / "val" / b, 1)
    logits = [0.0] * 100
    logits[0] = 1.0
    monkeypatch.setattr(evaluation, "load_checkpoint",
                        lambda path: checkpoints.LoadedModel(ConstantLogits(logits), IN100, IN100))
    metrics = evaluation.run(make_params({"val": tmp_path / "val"}), checkpoint, tmp_path / "m.json", tmp_path / "p.tsv")
    assert metrics["val"]["top1"] == 75.0 and metrics["val"]["per_class_top1"] == {a: 100.0, b: 0.0}


def test_top5_null_with_fewer_than_five_logits(tmp_path, monkeypatch):
    wnids = IN100[:3]
    for w in wnids:
        write_images(tmp_path / "val" / w, 1)
    fake = checkpoints.LoadedModel(ConstantLogits([0.0, 1.0, 0.0]), wnids, wnids)
    monkeypatch.setattr(evaluation, "load_checkpoint", lambda path: fake)
    metrics = evaluation.run(make_params({"val": tmp_path / "val"}), tmp_path / "unused.pt",
                             tmp_path / "m.json", tmp_path / "p.tsv")
    assert metrics["val"]["top1"] == pytest.approx(33.33) and metrics["val"]["top5"] is None
    assert read_tsv(tmp_path / "p.tsv") == [{"test_set": "val", "model": "trained", "top1": "33.33", "top5": ""}]


# --------------------------------------------------------------------------- errors

def test_missing_root_is_one_line_user_error_before_any_output(tmp_path, checkpoint):
    roots = fixture_like_tree(tmp_path / "data")
    roots["sketch"] = tmp_path / "nowhere"
    with pytest.raises(UserError) as err:
        evaluation.run(make_params(roots), checkpoint, tmp_path / "m.json", tmp_path / "p.tsv")
    message = str(err.value)
    assert "profiles.embedded.data.sketch" in message and "nowhere" in message and "\n" not in message
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "p.tsv").exists()


@pytest.mark.parametrize("name, make", [
    ("v2", lambda root: write_images(root / IN100[0], 1)),          # wnid folders where numbers belong
    ("val", lambda root: write_images(root / "0", 1)),              # numbers where wnids belong
    ("r", lambda root: (root / IN100[0]).mkdir(parents=True)),      # class folder without images
])
def test_malformed_root_names_key_and_layout(tmp_path, checkpoint, name, make):
    root = tmp_path / name
    root.mkdir()
    make(root)
    with pytest.raises(UserError) as err:
        evaluation.run(make_params({name: root}), checkpoint, tmp_path / "m.json", tmp_path / "p.tsv")
    message = str(err.value)
    assert f"profiles.embedded.data.{name}" in message and str(root) in message
    assert "expected class folders" in message and "\n" not in message


def test_missing_and_garbled_checkpoints(tmp_path):
    with pytest.raises(UserError, match="dvc repro train-resnet50"):
        checkpoints.load_checkpoint(tmp_path / "absent.pt")
    garbled = tmp_path / "garbled.pt"
    garbled.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(UserError, match="garbled.pt.*dvc repro train-resnet50"):
        checkpoints.load_checkpoint(garbled)
    wrong = tmp_path / "wrong.pt"
    torch.save({"arch": "resnet50", "classes": ["a", "b"], "wnids": ["", ""],
                "state_dict": {"fc.weight": torch.zeros(3, 3)}}, wrong)
    with pytest.raises(UserError, match="wrong.pt.*do not fit"):
        checkpoints.load_checkpoint(wrong)


def test_load_checkpoint_returns_eval_model(checkpoint):
    model, keys, wnids = checkpoints.load_checkpoint(checkpoint)
    assert not model.training and keys == IN100 and wnids == IN100
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


def test_transform_gives_crop_size():
    image = Image.fromarray(np.zeros((50, 80, 3), dtype=np.uint8))
    assert transforms.build_transform(36, 32)(image).shape == (3, 32, 32)


# --------------------------------------------------------------------------- flat ILSVRC-2012 val

def ilsvrc_id(wnid: str) -> int:
    """A stand-in ILSVRC2012_ID: reversed class order, so labels read as class indices would be wrong."""
    return 1000 - IN1K.index(wnid)


def write_meta_mat(path: Path) -> None:
    """meta.mat as in the devkit: a 'synsets' struct array, leaf synsets 1..1000 then a non-leaf one."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    entries = [(ilsvrc_id(w), w, 0) for w in IN1K] + [(1001, "n00001740", 3)]
    synsets = np.empty((len(entries), 1), dtype=[(f, "O") for f in fields])
    for row, (number, wnid, children) in enumerate(entries):
        synsets[row, 0] = (np.array([[number]], dtype=np.uint16), np.array([wnid]), np.array(["words"]),
                           np.array(["gloss"]), np.array([[children]], dtype=np.uint8),
                           np.zeros((1, children), dtype=np.uint16), np.array([[0]], dtype=np.uint8),
                           np.array([[1300]], dtype=np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"synsets": synsets})


def write_devkit(folder: Path, image_wnids: list[str]) -> Path:
    """A tiny ILSVRC2012_devkit_t12 folder in `folder`: ground truth for images 1..n, real meta.mat structure."""
    devkit = folder / val_labels.DEVKIT
    write_meta_mat(devkit / "data" / "meta.mat")
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ilsvrc_id(w)}\n" for w in image_wnids))
    return devkit


def write_flat_val(root: Path, count: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, count + 1)]
    for path in paths:
        Image.new("RGB", (40, 36), (90, 20, 160)).save(path)
    return paths


OUTSIDE_IN100 = next(w for w in IN1K if w not in set(IN100))
FLAT_WNIDS = [IN100[3], OUTSIDE_IN100, IN100[3], IN100[0], IN1K[999]]


def expected_by_wnid(paths: list[Path]) -> dict[str, list[Path]]:
    expected: dict[str, list[Path]] = {}
    for path, wnid in zip(paths, FLAT_WNIDS):
        expected.setdefault(wnid, []).append(path)
    return expected


def devkit_archive(tmp_path: Path, at: Path) -> Path:
    devkit = write_devkit(tmp_path / "unpacked", FLAT_WNIDS)
    with tarfile.open(at, "w:gz") as tar:
        tar.add(devkit, arcname=val_labels.DEVKIT)
    return at


def solution_csv(tmp_path: Path, at: Path) -> Path:
    rows = [f"ILSVRC2012_val_{n:08d},{w} 1 2 30 40 {w} 5 6 70 80" for n, w in enumerate(FLAT_WNIDS, start=1)]
    at.write_text("ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")
    return at


@pytest.mark.parametrize("form", ["devkit beside", "devkit configured", "archive inside", "csv configured"])
def test_flat_val_is_labelled_by_each_label_form(tmp_path, form):
    root = tmp_path / "imagenet" / "val"
    paths = write_flat_val(root, len(FLAT_WNIDS))
    labels = None
    if form == "devkit beside":
        write_devkit(tmp_path / "imagenet", FLAT_WNIDS)
    elif form == "devkit configured":
        labels = write_devkit(tmp_path / "elsewhere", FLAT_WNIDS)
    elif form == "archive inside":
        devkit_archive(tmp_path, root / f"{val_labels.DEVKIT}.tar.gz")
    else:
        labels = solution_csv(tmp_path, tmp_path / "LOC_val_solution.csv")
    by_wnid = imagenet_scan.scan_test_set("embedded", TEST_SETS["val"], root, labels)
    assert by_wnid == expected_by_wnid(paths)


def test_flat_val_end_to_end_scores_only_the_models_classes(tmp_path, checkpoint, monkeypatch):
    root = tmp_path / "val"
    write_flat_val(root, len(FLAT_WNIDS))
    devkit = write_devkit(tmp_path / "kit", FLAT_WNIDS)
    logits = [0.0] * 100
    logits[3] = 1.0   # IN100[3]: 2 of the 3 images of ImageNet-100 classes
    logits[0] = 0.5   # IN100[0], the third: second best, so within the top 5
    monkeypatch.setattr(evaluation, "load_checkpoint",
                        lambda path: checkpoints.LoadedModel(ConstantLogits(logits), IN100, IN100))
    metrics = evaluation.run(make_params({"val": root, "val_labels": devkit}), checkpoint,
                             tmp_path / "m.json", tmp_path / "p.tsv")
    assert metrics["val"] == {"top1": 66.67, "top5": 100.0, "classes": 2, "images": 3, "logits": 100,
                              "per_class_top1": {IN100[0]: 0.0, IN100[3]: 100.0}}


def test_flat_val_without_labels_names_both_layouts(tmp_path, checkpoint):
    root = tmp_path / "val"
    write_flat_val(root, 2)
    with pytest.raises(UserError) as err:
        evaluation.run(make_params({"val": root}), checkpoint, tmp_path / "m.json", tmp_path / "p.tsv")
    message = str(err.value)
    assert "profiles.embedded.data.val" in message and str(root) in message and "\n" not in message
    assert "profiles.embedded.data.val_labels" in message and "ILSVRC2012_devkit_t12" in message
    assert "LOC_val_solution.csv" in message


@pytest.mark.slow
@pytest.mark.parametrize("damage, expected", [
    (lambda kit: (kit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("5\n"),
     "no label for 4 of the 5 images"),
    (lambda kit: (kit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("5\n0\n7\n1\n2\n"),
     "ground-truth line 2 ('0') is not an ILSVRC2012_ID"),
    (lambda kit: (kit / "data" / "meta.mat").write_bytes(b"not a mat file" * 20), "meta.mat has no 'synsets'"),
    (lambda kit: (kit / "data" / "meta.mat").unlink(), "ILSVRC2012_devkit_t12/data/meta.mat; expected"),
])
def test_malformed_devkit_is_one_line_error_naming_it(tmp_path, checkpoint, damage, expected):
    root = tmp_path / "val"
    write_flat_val(root, len(FLAT_WNIDS))
    devkit = write_devkit(tmp_path / "kit", FLAT_WNIDS)
    damage(devkit)
    with pytest.raises(UserError) as err:
        evaluation.run(make_params({"val": root, "val_labels": devkit}), checkpoint,
                       tmp_path / "m.json", tmp_path / "p.tsv")
    message = str(err.value)
    assert "profiles.embedded.data.val_labels" in message and str(devkit) in message
    assert expected in message and "\n" not in message
    assert not (tmp_path / "m.json").exists()


def test_missing_labels_path_and_mixed_layouts_are_errors(tmp_path, checkpoint):
    root = tmp_path / "val"
    write_flat_val(root, 2)
    with pytest.raises(UserError, match=r"data.val_labels = '.*nowhere': no such file or folder"):
        imagenet_scan.validate(make_params({"val": root, "val_labels": tmp_path / "nowhere"}))
    write_images(root / IN100[0], 1)
    with pytest.raises(UserError, match="both class folders and flat ILSVRC2012_val_.*not both"):
        imagenet_scan.validate(make_params({"val": root}))


def test_solution_csv_with_wrong_header_is_rejected(tmp_path):
    bad = tmp_path / "LOC_val_solution.csv"
    bad.write_text("id,label\nILSVRC2012_val_00000001,n01440764\n")
    with pytest.raises(UserError, match="header ImageId,PredictionString"):
        val_labels.read_val_labels("here", bad)


# --------------------------------------------------------------------------- reference models

@pytest.fixture(scope="module")
def reference_files(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Weight files as users download them, of randomly initialised models: (path, original state_dict)."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    tv = torchvision.models.resnet50().state_dict()
    torch.save(tv, folder / "resnet50-0676ba61.pth")
    torch.manual_seed(2)
    # As some exports do, without BatchNorm's num_batches_tracked (torch fills it in on load).
    tm = {k: v.contiguous() for k, v in timm.create_model("resnet50").state_dict().items()
          if not k.endswith("num_batches_tracked")}
    save_file(tm, str(folder / "model.safetensors"))
    return {"torchvision-resnet50": (folder / "resnet50-0676ba61.pth", tv),
            "timm-resnet50-a1": (folder / "model.safetensors", tm)}


def test_reference_models_load_the_given_weights_as_imagenet1k_models(reference_files):
    params = make_params({}, {name: path for name, (path, _) in reference_files.items()})
    models = checkpoints.reference_models(params)
    assert sorted(models) == sorted(params_module.REFERENCE_MODELS)
    for name, (_, original) in reference_files.items():
        model, keys, wnids = models[name]
        assert not model.training and keys == list(IN1K) and wnids == list(IN1K)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    assert type(models["timm-resnet50-a1"].model).__module__.startswith("timm")


@pytest.mark.slow
def test_rsb_a1_is_also_scored_with_timms_own_preprocessing(tmp_path, checkpoint, reference_files):
    roots = fixture_like_tree(tmp_path / "data")
    params = make_params(roots, {"timm-resnet50-a1": reference_files["timm-resnet50-a1"][0]},
                         work_dir=tmp_path / "work")
    own, config = checkpoints.timm_transform(checkpoints.reference_models(params)["timm-resnet50-a1"].model)
    # resnet50.a1_in1k's pretrained config: bicubic, crop_pct 0.95 (resize 235), centre crop 224.
    assert (config["interpolation"], config["crop_pct"], config["input_size"]) == ("bicubic", 0.95, (3, 224, 224))
    assert "235" in repr(own) and "bicubic" in repr(own)
    metrics = evaluation.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv")
    shared, timms = metrics["reference"]["timm-resnet50-a1"], metrics["reference"]["timm-resnet50-a1-own-preprocessing"]
    assert shared.keys() == timms.keys() and timms["val"]["images"] == shared["val"]["images"] == 6
    assert all(0 <= timms[name]["top1"] <= 100 for name in timms)
    written = json.loads((tmp_path / "m.json").read_text())["reference"]
    assert set(written) == {"timm-resnet50-a1", "timm-resnet50-a1-own-preprocessing"}


@pytest.mark.slow
def test_reference_rows_score_full_test_sets_as_imagenet1k_models(tmp_path, checkpoint, reference_files):
    roots = fixture_like_tree(tmp_path / "data")
    params = make_params(roots, {"torchvision-resnet50": reference_files["torchvision-resnet50"][0]},
                         work_dir=tmp_path / "work")
    metrics = evaluation.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv", tmp_path / "d.json")
    ref = metrics["reference"]["torchvision-resnet50"]
    # The trained IN-100 model sees 4 of the 6 val classes; the IN-1K reference model sees all 6.
    assert metrics["val"]["images"] == 4
    assert ref["val"]["images"] == 6 and ref["val"]["classes"] == 6 and ref["val"]["logits"] == 1000
    assert ref["r"]["images"] == 8 and ref["r"]["classes"] == 5 and ref["r"]["logits"] == 200
    assert ref["a"]["logits"] == 200
    assert metrics["reference_skipped"] == ["timm-resnet50-a1"]
    # The encoder's feature statistics on val, from the same pass; one val image a class allows no
    # intra-class distance (nor, with these few near-identical images, redundancy), which is left
    # out with its reason rather than failing the stage.
    assert {"sparsity", "coding_length"} <= set(metrics["representation"])
    assert set(metrics["representation"]) | set(metrics["representation_skipped"]) == set(representation.KEYS)
    assert 0 <= metrics["representation"]["sparsity"] <= 1 and metrics["representation"]["coding_length"] > 0
    assert "2 images" in metrics["representation_skipped"]["intra_class_distance"]
    # The metrics file holds the scores; what they cover is in the details file.
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["representation"] == metrics["representation"]
    assert written["reference"]["torchvision-resnet50"]["val"] == {k: ref["val"][k] for k in ("top1", "top5")}
    assert set(written["val"]) == {"top1", "top5"} and set(written["r"]) <= set(evaluation.SCORES)
    assert "skipped" not in written and json.loads((tmp_path / "d.json").read_text()) == metrics
    rows = {r["test_set"]: r["model"] for r in read_tsv(tmp_path / "p.tsv")}
    assert rows["val"] == "trained" and rows["val (torchvision-resnet50)"] == "torchvision-resnet50"
    assert "torchvision-resnet50" in evaluation.summary_table(metrics)


@pytest.mark.slow
def test_reference_scores_are_reused_until_what_decides_them_changes(tmp_path, checkpoint, reference_files,
                                                                     monkeypatch):
    roots = fixture_like_tree(tmp_path / "data")
    weights = tmp_path / "resnet50.pth"
    weights.write_bytes(reference_files["torchvision-resnet50"][0].read_bytes())
    params = make_params(roots, {"torchvision-resnet50": weights}, work_dir=tmp_path / "work")
    scored = []
    real_score = evaluation.score
    monkeypatch.setattr(evaluation, "score", lambda model, plan, *a: scored.append(a[3]) or real_score(model, plan, *a))   # a[3]: desc

    def reference_runs() -> int:
        before = len(scored)
        metrics = evaluation.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv")
        assert metrics["reference"]["torchvision-resnet50"]["val"]["images"] == 6
        return len([d for d in scored[before:] if d.startswith("torchvision-resnet50")])

    assert reference_runs() == 3                      # val, r, a
    first = json.loads((tmp_path / "m.json").read_text())["reference"]
    assert reference_runs() == 0                      # the next experiment: from the work folder
    for cached in (tmp_path / "work" / "reference-scores").iterdir():
        cached.write_text("{truncated")
    assert reference_runs() == 3                      # a damaged file is scored again, not an error
    assert json.loads((tmp_path / "m.json").read_text())["reference"] == first
    image = next(p for p in roots["r"].rglob("*") if p.is_file())
    image.write_bytes(image.read_bytes() + b"\0")     # a test image changed: scored again
    assert reference_runs() == 3
    params = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, crop=24))
    assert reference_runs() == 3                      # other preprocessing
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    assert reference_runs() == 3                      # other weights in the same file


def test_r_is_scored_both_restricted_and_over_every_logit():
    """The paper does not say whether IN-R's logits are restricted: both are reported."""
    r_wnids = imagenet_scan.subset_of(TEST_SETS["r"])
    shared = [w for w in IN100 if w in r_wnids]
    outside = next(i for i, w in enumerate(IN100) if w not in r_wnids)
    logits = [0.0] * len(IN100)
    logits[outside] = 10.0                  # wins over every logit, ignored once restricted
    logits[IN100.index(shared[0])] = 5.0
    eval_plan = imagenet_scan.plan(TEST_SETS["r"], {shared[0]: [Path("x.jpg")] * 4}, IN100)
    fixed = ConstantLogits(logits)
    def batches(model, data, device, desc):    # the planned labels, no images to read
        labels = torch.tensor([label for _, label in data.dataset.samples])
        yield model(torch.zeros(len(labels), 3, 4, 4)), labels

    with unittest.mock.patch.object(evaluation, "forward_batches", batches):
        metrics = evaluation.score(fixed, eval_plan, None, 8, torch.device("cpu"), "r")
    assert metrics["top1"] == 100.0 and metrics["top1_all_logits"] == 0.0
    assert metrics["top5"] == 100.0 and metrics["top5_all_logits"] == 100.0     # 2nd of all logits
    val = imagenet_scan.plan(TEST_SETS["val"], {shared[0]: [Path("x.jpg")] * 4}, IN100)
    with unittest.mock.patch.object(evaluation, "forward_batches", batches):
        assert "top1_all_logits" not in evaluation.score(fixed, val, None, 8, torch.device("cpu"), "val")


def test_imagenet1k_model_on_r_uses_the_200_class_restriction():
    by_wnid = {w: [Path(f"{w}.jpg")] for w in sorted(imagenet_scan.subset_of(TEST_SETS["r"]))[:3]}
    eval_plan = imagenet_scan.plan(TEST_SETS["r"], by_wnid, list(IN1K))
    assert eval_plan.columns == [i for i, w in enumerate(IN1K) if w in imagenet_scan.subset_of(TEST_SETS["r"])]
    assert len(eval_plan.columns) == 200 and eval_plan.classes == 3


def test_reference_weight_errors_are_one_line_naming_the_key(tmp_path, checkpoint):
    key = "profiles.embedded.evaluate.reference_models.torchvision-resnet50"
    garbled = tmp_path / "garbled.pth"
    garbled.write_bytes(b"not weights" * 10)
    cases = [(tmp_path / "absent.pth", "no such weight file"),
             (garbled, "not a readable weight file"),
             # the IN-100 checkpoint of train-resnet50: a wrapped state_dict with a 100-class head
             (checkpoint, "weights do not fit (fc.weight is (100, 2048), expected (1000, 2048))")]
    for path, expected in cases:
        with pytest.raises(UserError) as err:
            checkpoints.reference_models(make_params({}, {"torchvision-resnet50": path}))
        message = str(err.value)
        assert key in message and str(path) in message and expected in message and "\n" not in message


def test_reference_model_params_validate_names_and_expand_home(monkeypatch):
    raw = embedded_raw()
    evaluate = raw["profiles"]["embedded"]["evaluate"]
    monkeypatch.setenv("HOME", "/home/someone")
    evaluate["reference_models"] = {"timm-resnet50-a1": "~/w/model.safetensors"}
    parsed = params_module.parse(raw).evaluate.reference_models
    assert parsed == {"torchvision-resnet50": None, "timm-resnet50-a1": Path("/home/someone/w/model.safetensors")}
    evaluate["reference_models"] = {"resnet18": "x.pth"}
    with pytest.raises(UserError, match="unknown key profiles.embedded.evaluate.reference_models.resnet18"):
        params_module.parse(raw)
    evaluate["reference_models"] = {"torchvision-resnet50": 3}
    with pytest.raises(UserError, match="reference_models.torchvision-resnet50 = 3 is not valid"):
        params_module.parse(raw)
    assert set(checkpoints.REFERENCE_MODELS) == set(params_module.REFERENCE_MODELS)


def test_read_weights_unwraps_training_checkpoints(tmp_path):
    state = {"fc.bias": torch.ones(3)}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "checkpoint.pth")
    assert checkpoints.read_weights("k", tmp_path / "checkpoint.pth", "weights").keys() == state.keys()
