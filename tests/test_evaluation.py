"""eval-imagenet: top-k, class subsets, IN-R/IN-A logit restriction, layouts and errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from imagenet_sd import classes, evaluation, params as params_module
from imagenet_sd.errors import UserError
from imagenet_sd.io import read_tsv

REPO = Path(__file__).resolve().parents[1]
IN100 = list(classes.imagenet100_wnids())
IN1K = classes.imagenet1k_wnids()


def write_images(folder: Path, count: int, colour=(120, 60, 200)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (40, 36), colour).save(folder / f"img_{i}.JPEG")


def make_params(data: dict, **evaluate) -> params_module.Params:
    base = params_module.load(REPO / "params.yaml")
    roots = {name: (Path(data[name]) if data.get(name) else None) for name in ("train", "val", "v2", "sketch", "r", "a")}
    ev = dataclasses.replace(base.evaluate, resize=36, crop=32, batch_size=8, device="cpu", **evaluate)
    return dataclasses.replace(base, profile="embedded", data=params_module.DataParams(**roots), evaluate=ev)


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
    assert evaluation.topk_correct(logits, labels) == {1: 1, 5: 2}


def test_topk_skips_k_larger_than_logits():
    logits = torch.tensor([[0.2, 0.5, 0.1], [0.9, 0.0, 0.1]])
    assert evaluation.topk_correct(logits, torch.tensor([1, 2])) == {1: 1}


# --------------------------------------------------------------------------- plans

def test_r_restriction_scores_shared_classes_despite_non_shared_favourite():
    r_wnids = classes.imagenet_r_wnids()
    model_wnids = IN100
    shared = [w for w in model_wnids if w in r_wnids]
    outside = next(i for i, w in enumerate(model_wnids) if w not in r_wnids)
    target = model_wnids.index(shared[0])
    logits = [0.0] * len(model_wnids)
    logits[outside] = 10.0   # favourite class is not in IN-R: ignored after restriction
    logits[target] = 5.0
    by_wnid = {shared[0]: [Path("x.jpg")] * 3, shared[1]: [Path("y.jpg")] * 2}
    eval_plan = evaluation.plan(evaluation.TEST_SETS["r"], by_wnid, model_wnids)
    assert eval_plan.columns == [model_wnids.index(w) for w in shared]
    restricted = torch.tensor(logits)[eval_plan.columns].expand(5, -1)
    labels = torch.tensor([label for _, label in eval_plan.samples])
    assert evaluation.topk_correct(restricted, labels)[1] == 3

    # Unrestricted (as for val) the same logits get every image wrong.
    full = evaluation.plan(evaluation.TEST_SETS["val"], by_wnid, model_wnids)
    full_labels = torch.tensor([label for _, label in full.samples])
    assert evaluation.topk_correct(torch.tensor(logits).expand(5, -1), full_labels)[1] == 0


def test_v2_numeric_folders_map_to_wnids(tmp_path):
    for wnid in (IN100[0], IN100[7], IN1K[999]):
        write_images(tmp_path / str(IN1K.index(wnid)), 1)
    by_wnid = evaluation.scan_test_set("embedded", evaluation.TEST_SETS["v2"], tmp_path)
    assert sorted(by_wnid) == sorted([IN100[0], IN100[7], IN1K[999]])
    eval_plan = evaluation.plan(evaluation.TEST_SETS["v2"], by_wnid, IN100)
    assert sorted(label for _, label in eval_plan.samples) == [0, 7]   # IN1K[999] is not an IN-100 class
    assert len(eval_plan.columns) == 100


# --------------------------------------------------------------------------- end to end

def fixture_like_tree(root: Path) -> dict[str, Path]:
    """val + R + A folders: shared and non-shared classes, counts chosen to be checkable."""
    outside_in100 = [w for w in IN1K if w not in set(IN100)][:2]
    for w in IN100[:4] + outside_in100:
        write_images(root / "val" / w, 1)
    for name, subset in (("r", classes.imagenet_r_wnids()), ("a", classes.imagenet_a_wnids())):
        shared = [w for w in IN100 if w in subset]
        others = sorted(subset - set(IN100))[:2]
        for w in shared[:3]:
            write_images(root / name / w, 2)
        for w in others:
            write_images(root / name / w, 1)
    return {"val": root / "val", "r": root / "r", "a": root / "a"}


def test_in100_model_on_val_r_a_counts_shared_and_skips_unconfigured(tmp_path, checkpoint, capsys):
    roots = fixture_like_tree(tmp_path / "data")
    params = make_params(roots)
    metrics = evaluation.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv")

    assert metrics["skipped"] == ["v2", "sketch"]
    assert metrics["val"]["images"] == 4 and metrics["val"]["classes"] == 4
    assert metrics["val"]["logits"] == 100
    shared_r = [w for w in IN100 if w in classes.imagenet_r_wnids()]
    assert metrics["r"]["images"] == 6 and metrics["r"]["classes"] == 3
    assert metrics["r"]["logits"] == len(shared_r)
    for name in ("val", "r", "a"):
        assert 0 <= metrics[name]["top1"] <= metrics[name]["top5"] <= 100
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    rows = read_tsv(tmp_path / "p.tsv")
    assert [r["test_set"] for r in rows] == ["val", "r", "a"]
    assert "skipped" in capsys.readouterr().out


def test_constant_model_scores_exactly(tmp_path, checkpoint, monkeypatch):
    """All images of one shared class + logits favouring it -> 100% top-1 on val and on R."""
    wnid = next(w for w in IN100 if w in classes.imagenet_r_wnids())
    write_images(tmp_path / "val" / wnid, 3)
    write_images(tmp_path / "r" / wnid, 2)
    logits = [0.0] * 100
    logits[IN100.index(wnid)] = 1.0
    fake = evaluation.LoadedModel(ConstantLogits(logits), IN100, IN100)
    monkeypatch.setattr(evaluation, "load_checkpoint", lambda path: fake)
    params = make_params({"val": tmp_path / "val", "r": tmp_path / "r"})
    metrics = evaluation.run(params, checkpoint, tmp_path / "m.json", tmp_path / "p.tsv")
    assert metrics["val"] == {"top1": 100.0, "top5": 100.0, "classes": 1, "images": 3, "logits": 100}
    assert metrics["r"]["top1"] == 100.0 and metrics["r"]["images"] == 2


def test_top5_null_with_fewer_than_five_logits(tmp_path, monkeypatch):
    wnids = IN100[:3]
    for w in wnids:
        write_images(tmp_path / "val" / w, 1)
    fake = evaluation.LoadedModel(ConstantLogits([0.0, 1.0, 0.0]), wnids, wnids)
    monkeypatch.setattr(evaluation, "load_checkpoint", lambda path: fake)
    metrics = evaluation.run(make_params({"val": tmp_path / "val"}), tmp_path / "unused.pt",
                             tmp_path / "m.json", tmp_path / "p.tsv")
    assert metrics["val"]["top1"] == pytest.approx(33.33) and metrics["val"]["top5"] is None
    assert read_tsv(tmp_path / "p.tsv") == [{"test_set": "val", "top1": "33.33", "top5": ""}]


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
        evaluation.load_checkpoint(tmp_path / "absent.pt")
    garbled = tmp_path / "garbled.pt"
    garbled.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(UserError, match="garbled.pt.*dvc repro train-resnet50"):
        evaluation.load_checkpoint(garbled)
    wrong = tmp_path / "wrong.pt"
    torch.save({"arch": "resnet50", "classes": ["a", "b"], "wnids": ["", ""],
                "state_dict": {"fc.weight": torch.zeros(3, 3)}}, wrong)
    with pytest.raises(UserError, match="wrong.pt.*do not fit"):
        evaluation.load_checkpoint(wrong)


def test_load_checkpoint_returns_eval_model(checkpoint):
    model, keys, wnids = evaluation.load_checkpoint(checkpoint)
    assert not model.training and keys == IN100 and wnids == IN100
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


def test_transform_gives_crop_size():
    image = Image.fromarray(np.zeros((50, 80, 3), dtype=np.uint8))
    assert evaluation.build_transform(36, 32)(image).shape == (3, 32, 32)
