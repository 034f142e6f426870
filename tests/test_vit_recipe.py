"""The ViT-B recipe (train_recipes.vit_b, DeiT's): the named recipe over a profile's train block, AdamW
without decay on what timm exempts, Mixup/CutMix targets that match the pixels they mix, the deit crop
style, and a tiny ViT trained with the whole recipe resuming to the same weights."""
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from imagenet_sd.core import params
from imagenet_sd.core.errors import UserError
from imagenet_sd.models import network
from imagenet_sd.models.heads.linear import Linear
from imagenet_sd.train import loop, recipe, training
from imagenet_sd.train import state as train_state
from imagenet_sd.train.augmentation import MultiCrop
from imagenet_sd.train.mixing import Mixing
from test_training import KEYS, killed_in_epoch_2_then_resumed, write_colour_shards

TINY_VIT = "timm:test_vit"


def vit_params(tmp_path: Path, checkpoint_every_steps: int = 0, **recipe_keys) -> params.Params:
    """The embedded profile with train_recipe vit_b on a tiny ViT, at test size."""
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw.update(profile="embedded", train_recipe="vit_b")
    raw["profiles"]["embedded"]["train"].update({"batch_size": 4, "global_crop_size": 32, "holdout_per_class": 1,
                                                 "workers": 0, "device": "cpu", "work_dir": str(tmp_path / "work"),
                                                 "checkpoint_every_steps": checkpoint_every_steps})
    raw["train_recipes"]["vit_b"].update({"arch": TINY_VIT, "epochs": 2, "warmup_epochs": 1, "lr": 0.01, "min_lr": 1e-6,
                                         **recipe_keys})
    return params.parse(raw)


def test_the_named_recipe_replaces_only_its_own_keys_of_the_profiles_block(tmp_path):
    raw = yaml.safe_load(Path("params.yaml").read_text())
    base = params.parse(raw).train
    assert (base.arch, base.optimizer, base.mixup, base.global_crop_style) == ("resnet50", "sgd", 0.0, "trex")
    raw["train_recipe"] = "vit_b"
    vit = params.parse(raw).train
    block = raw["train_recipes"]["vit_b"]
    assert all(getattr(vit, k) == (tuple(v) if isinstance(v, list) else v) for k, v in block.items())
    assert (vit.arch, vit.optimizer, vit.lr, vit.weight_decay) == ("timm:vit_base_patch16_224", "adamw", 0.00025, 0.05)
    # Where and at what size the profile trains stay the profile's.
    assert (vit.batch_size, vit.global_crop_size, vit.work_dir) == (base.batch_size, base.global_crop_size, base.work_dir)
    block["batch_size"] = 1024
    with pytest.raises(UserError, match="unknown key train_recipes.vit_b.batch_size"):
        params.parse(raw)
    del block["batch_size"]
    block["random_erasing"] = 2
    with pytest.raises(UserError, match=r"train_recipes.vit_b.random_erasing = 2 is not valid"):
        params.parse(raw)
    raw["train_recipe"] = "nope"
    with pytest.raises(UserError, match="train_recipe = 'nope' is not valid; allowed: base | vit_b"):
        params.parse(raw)


def test_adamw_leaves_norms_biases_position_embedding_and_class_token_undecayed():
    net = network.build(TINY_VIT, Linear(), 3)
    tp = params.TrainParams(**{**vars(vit_defaults()), "optimizer": "adamw"})
    optimizer = recipe.build_optimizer(net, tp)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in net.named_parameters()}
    undecayed = {names[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert {"trunk.pos_embed", "trunk.cls_token"} <= undecayed
    assert all(n.endswith(("bias", "pos_embed", "cls_token")) or ".norm" in n or "norm" in n.split(".")[-2]
               for n in undecayed)
    assert "trunk.patch_embed.proj.weight" in {names[id(p)] for p in optimizer.param_groups[0]["params"]}


def vit_defaults() -> params.TrainParams:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["train_recipe"] = "vit_b"
    return params.parse(raw).train


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_mixed_targets_weigh_each_label_by_the_pixels_it_keeps(mixup, cutmix):
    labels = torch.tensor([0, 1, 2, 1])
    # Each image a constant: image i is i + 1 everywhere, so a pixel says whose it is.
    crops = [torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 3, s, s).contiguous() for s in (32, 16)]
    mixed, targets = Mixing(mixup, cutmix, 3)(crops, labels, seed=7)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    kept = targets[torch.arange(4), labels]                  # image i's own label's weight
    other = targets[torch.arange(4), labels.flip(0)]         # its partner's (the batch read backwards)
    first = mixed[0]
    for i in (0, 3):          # labels differ from their partner's (0 with 1, 1 with 0)
        if cutmix:
            share = (first[i] == i + 1).float().mean()
            assert torch.isclose(kept[i], share, atol=1e-6) and torch.isclose(other[i], 1 - share, atol=1e-6)
        else:
            lam = kept[i]
            assert torch.allclose(first[i], lam * (i + 1) + (1 - lam) * (4 - i))
    assert 0 < kept[0] < 1
    # The same step draws the same mixing: a resumed run mixes as an uninterrupted one.
    again, targets_again = Mixing(mixup, cutmix, 3)(crops, labels, seed=7)
    assert torch.equal(again[1], mixed[1]) and torch.equal(targets_again, targets)


def test_the_soft_target_loss_is_timms_mixup_loss_with_smoothing():
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy
    logits, labels = torch.randn(4, 5), torch.tensor([0, 3, 2, 4])
    lam = 0.3
    ours_targets = torch.nn.functional.one_hot(labels, 5).float() * lam + \
        torch.nn.functional.one_hot(labels.flip(0), 5).float() * (1 - lam)
    ours = recipe.multicrop_loss(logits, None, ours_targets, label_smoothing=0.1)
    theirs = SoftTargetCrossEntropy()(logits, mixup_target(labels, 5, lam=lam, smoothing=0.1))
    assert torch.isclose(ours, theirs, atol=1e-6)


def test_the_deit_style_crops_in_the_loader_only_and_a_seed_gives_the_same_crops(tmp_path):
    tp = vit_params(tmp_path).train
    multicrop = MultiCrop.from_params(tp)
    assert not multicrop.drawable
    assert training.augment_on_device(tp, torch.device("cuda")) is False     # auto: the loader workers
    with pytest.raises(UserError, match="global_crop_style 'deit' runs in the loader workers only"):
        training.augment_on_device(vit_params(tmp_path, global_crop_style="deit").train.__class__(
            **{**vars(tp), "augment_device": "cuda"}), torch.device("cuda"))
    image = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    import random

    import numpy as np

    def crops(seed):
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        return [multicrop(image)[0] for _ in range(8)]
    a, b = crops(1), crops(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].shape == (3, 32, 32)
    assert not all(torch.equal(x, y) for x, y in zip(a, crops(2)))
    # Magnitude 10, no noise: PosterizeIncreasing keeps 0 bits, which Pillow 11+ refuses; the crop is made.
    strongest = MultiCrop(32, (0.08, 1), 0, 16, (0.1, 0.2), 1, "deit", "rand-n3-m10-mstd0-inc1")
    posterize = next(op for op in strongest.views[0].augment.ops if op.name == "PosterizeIncreasing")
    posterize.prob = 1.0
    assert posterize(Image.new("RGB", (8, 8), (200, 100, 50))).getextrema() == ((0, 0),) * 3
    with pytest.raises(UserError, match="train.randaugment = 'rand-q9': timm cannot read it"):
        MultiCrop(32, (0.08, 1), 0, 16, (0.1, 0.2), 1, "deit", "rand-q9")


def test_bad_combinations_are_one_line_before_training(tmp_path):
    write_colour_shards(tmp_path / "shards", per_class=2, holdout=1)
    with pytest.raises(UserError, match="head = 'trex' learns each crop under its one label"):
        training.prepare(vit_params(tmp_path, head="trex"), tmp_path / "missing.tsv", tmp_path / "shards")
    with pytest.raises(UserError, match=r"arch = 'resnet50' \(torchvision's\) has no stochastic depth"):
        training.prepare(vit_params(tmp_path, arch="resnet50"), tmp_path / "missing.tsv", tmp_path / "shards")
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["profiles"]["digits"]["train"]["random_erasing"] = 0.25       # trex crop style
    with pytest.raises(UserError, match="random_erasing = 0.25 is not valid; allowed: 0 with global_crop_style 'trex'"):
        params.parse(raw)


def test_the_base_recipe_keeps_its_training_state_key(tmp_path):
    """The new keys at their neutral values are not in the key: ResNet-50 states made before stay resumable."""
    write_colour_shards(tmp_path / "shards", per_class=2)
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["profiles"]["digits"]["train"]["work_dir"] = str(tmp_path / "work")
    path = train_state.state_file(params.parse(raw), KEYS, tmp_path / "shards")
    import json
    recipe_json = json.loads((path.parent / "recipe.json").read_text())["recipe"]
    assert not {"arch", "optimizer", "mixup", "cutmix", "drop_path", "randaugment", "random_erasing"} & set(recipe_json)


@pytest.mark.slow
def test_a_tiny_vit_on_the_whole_recipe_resumes_mid_epoch_to_the_same_weights(tmp_path, monkeypatch):
    """AdamW, warm-up and cosine, Mixup/CutMix, RandAugment, random erasing and drop path: every random
    draw of the recipe comes back the same after a resume."""
    write_colour_shards(tmp_path, per_class=4, holdout=1)
    p = vit_params(tmp_path, checkpoint_every_steps=2)
    tp = p.train
    assert (tp.optimizer, tp.mixup, tp.cutmix, tp.randaugment, tp.drop_path) == ("adamw", 0.8, 1.0,
                                                                                "rand-m9-mstd0.5-inc1", 0.1)
    dataset, holdout = training.open_training_set(p, KEYS, tmp_path)     # 12 images: 3 steps an epoch
    cpu = torch.device("cpu")
    clean = loop.train(dataset, len(KEYS), tp, 0, cpu, holdout=holdout)
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in clean.history)

    resumed = killed_in_epoch_2_then_resumed(monkeypatch, dataset, tp, tmp_path / "state" / "last.pt", holdout)
    a, b = clean.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s.loss for s in resumed.history] == [s.loss for s in clean.history]
