"""Training data (synthetic shards, real folders) and the ResNet-50 training loop, at tiny sizes on CPU."""
import io
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from conftest import embedded_raw, run_script, write_synthetic_shards
from imagenet_sd.core import params
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import readers, shards
from imagenet_sd.evaluate import checkpoints, transfer
from imagenet_sd.models import network
from imagenet_sd.models.heads import trex as trex_head
from imagenet_sd.models.heads.linear import Linear
from imagenet_sd.prompts import prompts
from imagenet_sd.train import loop, recipe, training
from imagenet_sd.train import state as train_state
from imagenet_sd.train.augmentation import MultiCrop

KEYS = ["n00000001", "n00000002", "n00000003"]
# Where the loop's logic is under test rather than ResNet-50 (24 M parameters): timm's 0.4 M-parameter
# test_resnet, a ResNet still (BatchNorm, residual blocks), about 20 times faster a step on the CPU.
TINY = "timm:test_resnet"
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 230)]


def jpeg(colour, size=32, quality=95) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def record(label, image_index, key=None) -> dict:
    key = KEYS[label] if key is None else key
    return {"wnid": key, "class": key, "label": label, "image_index": image_index, "prompt": key,
            "seed": image_index, "guidance": 7.5, "steps": 50, "model": "test", "flagged": False}


def id_colour(i):
    """A colour that survives JPEG and encodes the sample number i (< 30)."""
    return (8 * i, 255 - 8 * i, 100)


def colour_id(image) -> int:
    """Transform used by the tests: the sample number back from the image's colour."""
    return round(image.getpixel((16, 16))[0] / 8)


def write_numbered_shards(folder: Path, sizes: list[int]) -> int:
    i = 0
    for s, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            label = i % len(KEYS)
            samples.append((shards.sample_key(label, i), jpeg(id_colour(i)), record(label, i)))
            i += 1
        shards.write_shard(folder / shards.SHARD_PATTERN.format(s), samples)
    return i


def write_colour_shards(folder: Path, per_class: int, per_shard: int = 20, holdout: int = 0) -> None:
    """Classes of distinct solid colours with a little noise: learnable in a few epochs. Laid out
    as sd-generate lays out its shards (conftest.write_synthetic_shards), `per_class` training
    images a class and `holdout` more, about `per_shard` images a shard."""
    generator = torch.Generator().manual_seed(0)
    rows = [prompts.ClassPrompt(wnid=k, index=i, c=k, h_c="", d_c="", prompt=k) for i, k in enumerate(KEYS)]

    def image(label: int, index: int) -> bytes:
        noise = (torch.randint(-25, 26, (3,), generator=generator)).tolist()
        return jpeg(tuple(c + n for c, n in zip(COLOURS[label], noise)))
    write_synthetic_shards(folder, rows, per_class, holdout, max(1, per_shard // len(KEYS)), image=image,
                           record=lambda label, index, key: record(label, index))


def tiny_params(tmp_path: Path, **train) -> params.Params:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["profile"] = "embedded"
    block = raw["profiles"]["embedded"]
    block["train"].update({"epochs": 1, "batch_size": 8, "lr": 3.2, "warmup_epochs": 0, "global_crop_size": 32,
                           "local_crops": 1, "local_crop_size": 16, "holdout_per_class": 0, "workers": 0,
                           "device": "cpu", "work_dir": str(tmp_path / "work"), **train})
    block["data"]["train"] = str(tmp_path / "real")
    return params.parse(raw)


def write_prompts(path: Path, keys=KEYS) -> Path:
    prompts.write(path, [prompts.ClassPrompt(wnid=k, index=i, c=k, h_c="", d_c="", prompt=k)
                         for i, k in enumerate(keys)])
    return path


# --------------------------------------------------------------------------- shard dataset

def test_ranks_and_workers_split_the_shards_without_repeats_or_gaps(tmp_path):
    total = write_numbered_shards(tmp_path, [7, 11, 5, 6, 3])
    seen = []
    for rank in range(2):
        dataset = readers.ShardDataset(shards.list_shards(tmp_path), KEYS, colour_id, seed=0, buffer_size=4)
        dataset.set_rank(rank, 2)
        dataset.set_epoch(1)
        seen += [i for batch, _ in DataLoader(dataset, batch_size=3, num_workers=2) for i in batch.tolist()]
    assert sorted(seen) == list(range(total))

@pytest.mark.parametrize("workers", [0, 2])
def test_every_shard_sample_once_per_epoch(tmp_path, workers):
    total = write_numbered_shards(tmp_path, [7, 11, 5, 6])
    dataset = readers.ShardDataset(shards.list_shards(tmp_path), KEYS, colour_id, seed=0, buffer_size=4)
    assert len(dataset) == total
    orders = []
    for epoch in (1, 2):
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=3, num_workers=workers)
        ids, labels = [], []
        for batch_ids, batch_labels in loader:
            ids += batch_ids.tolist()
            labels += batch_labels.tolist()
        assert sorted(ids) == list(range(total))
        assert labels == [i % len(KEYS) for i in ids]
        orders.append(ids)
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_more_loader_workers_than_shards_read_every_image_once(tmp_path):
    total = write_numbered_shards(tmp_path, [5])
    dataset = readers.ShardDataset(shards.list_shards(tmp_path), KEYS, colour_id, seed=0)
    assert sorted(i for batch, _ in DataLoader(dataset, batch_size=2, num_workers=2) for i in batch.tolist()) == \
        list(range(total))


def test_shard_order_is_reproducible(tmp_path):
    write_numbered_shards(tmp_path, [8, 8])
    runs = []
    for _ in range(2):
        dataset = readers.ShardDataset(shards.list_shards(tmp_path), KEYS, colour_id, seed=3, buffer_size=4)
        dataset.set_epoch(1)
        runs.append([i for i, _ in dataset])
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_batches_of_an_imagenet_1k_shaped_shard_set_look_random(tmp_path):
    """sd-generate's ImageNet-1K layout (shard k = image k of every class) read by the training
    loader: batches of 256 as varied as random draws (issue 12's targets)."""
    from imagenet_sd.datasets import plan as planning
    keys = [f"n{i:08d}" for i in range(1000)]
    rows = [prompts.ClassPrompt(wnid=k, index=i, c=k, h_c="", d_c="", prompt=k) for i, k in enumerate(keys)]
    counts = dict.fromkeys(keys, 20)
    layout = planning.Layout(rows, counts, [], per_class=1)
    tiny = jpeg((90, 90, 90), size=8)
    for shard in layout:
        shards.write_shard(tmp_path / shard.name, [
            (it.key, tiny, {"class": it.cls.key, "label": it.cls.index, "image_index": it.image_index})
            for it in shard.items])
    dataset = readers.ShardDataset([tmp_path / s.name for s in layout], keys, lambda image: 0, seed=0)
    dataset.set_epoch(1)
    labels = [batch.numpy() for _, batch in DataLoader(dataset, batch_size=256, num_workers=2)]
    assert sum(map(len, labels)) == 20_000
    mix = readers.batch_mix([b for b in labels if len(b) == 256], np.full(1000, 20))   # each worker ends with a part
    assert mix["batch_distinct_classes_ratio"] >= 0.97 and mix["batch_label_iqr_ratio"] >= 0.95, mix


def test_corrupt_images_and_bad_records_are_skipped_and_counted(tmp_path):
    good = [(f"k{i}", jpeg(id_colour(i)), record(i % 3, i)) for i in range(5)]
    bad = [("broken", b"\xff\xd8 not really a jpeg", record(0, 10)),
           ("truncated", jpeg(id_colour(11))[:60], record(1, 11)),
           ("label-out-of-range", jpeg(id_colour(12)), record(0, 12) | {"label": 7}),
           ("wrong-class", jpeg(id_colour(13)), record(1, 13) | {"class": "n99999999"})]
    path = tmp_path / shards.SHARD_PATTERN.format(0)
    shards.write_shard(path, good[:3] + bad + good[3:])
    # A record that is not JSON, in the middle of the shard: skipped alone, the rest still read.
    raw = path.read_bytes()
    index = raw.index(b'{', raw.index(b"k1.json"))
    path.write_bytes(raw[:index] + b"#" + raw[index + 1:])
    assert [k for k, _, r in shards.iter_shard(path) if r is None] == ["k1"]
    dataset = readers.ShardDataset(shards.list_shards(tmp_path), KEYS, colour_id, seed=0)
    assert sorted(i for i, _ in dataset) == [0, 2, 3, 4]
    assert dataset.skipped.value == 5


def test_a_truncated_shard_is_read_up_to_the_cut_and_counted_once(tmp_path):
    write_numbered_shards(tmp_path, [6, 6])
    counts = readers.count_samples(shards.list_shards(tmp_path))     # as index.json has them
    victim = shards.list_shards(tmp_path)[1]
    raw = victim.read_bytes()
    victim.write_bytes(raw[:raw.index(b"\xff\xd8", raw.index(shards.sample_key(9 % 3, 9).encode()))])   # inside image 9
    dataset = readers.ShardDataset(shards.list_shards(tmp_path), KEYS, colour_id, seed=0, buffer_size=4, counts=counts)
    assert sorted(i for i, _ in dataset) == list(range(9))
    assert dataset.skipped.value == 1


def test_the_first_images_of_each_class_are_held_out_of_training(tmp_path):
    # sd-generate's layout: shard k holds images 2k and 2k+1 of every class.
    for k in range(3):
        shards.write_shard(tmp_path / shards.SHARD_PATTERN.format(k), [
            (shards.sample_key(c, i), jpeg(id_colour(3 * i + c)), record(c, i))
            for c in range(3) for i in (2 * k, 2 * k + 1)])
    train, holdout = readers.shard_splits(shards.list_shards(tmp_path), KEYS, 0, 2, colour_id, colour_id)
    train.set_epoch(1)
    trained, held = [i for i, _ in train], [i for i, _ in holdout]
    assert len(train) == len(trained) == 12 and len(holdout) == len(held) == 6
    assert sorted(held) == list(range(6))           # images 0 and 1 of each class
    assert sorted(trained) == list(range(6, 18))
    # Only the shard holding held-out images is read to score them.
    assert holdout.shard_paths == shards.list_shards(tmp_path)[:1]
    assert holdout.skipped.value == train.skipped.value == 0


def test_holding_out_every_image_of_a_class_is_refused(tmp_path):
    write_colour_shards(tmp_path, per_class=2)
    with pytest.raises(UserError, match=r"class 'n00000001' has only 2 synthetic images and "
                                        r"train.holdout_per_class = 2 keeps them all out of training"):
        readers.shard_splits(shards.list_shards(tmp_path), KEYS, 0, 2, colour_id, colour_id)


def test_shards_of_another_class_set_are_refused(tmp_path):
    index = {"classes": KEYS, "counts": dict.fromkeys(KEYS, 1), "shards": []}
    readers.check_index_classes(index, list(KEYS), tmp_path)
    with pytest.raises(UserError, match="do not match the prompt table"):
        readers.check_index_classes(index, ["n00000009", "n00000002", "n00000003"], tmp_path)


def test_counts_from_the_index_equal_the_counts_in_the_shards(tmp_path):
    """index.json alone says what each shard holds (training and held out), as the tar headers do."""
    from imagenet_sd.datasets import plan as planning
    rows = [prompts.ClassPrompt(wnid=k, index=i, c=k, h_c="", d_c="", prompt=k) for i, k in enumerate(KEYS)]
    counts = dict(zip(KEYS, (7, 3, 5)))
    layout = planning.Layout(rows, counts, [], per_class=2)
    for shard in layout:
        shards.write_shard(tmp_path / shard.name, [(it.key, jpeg(id_colour(0)), record(it.cls.index, it.image_index))
                                                   for it in shard.items])
    index = {"classes": list(KEYS), "counts": counts, "images_per_class_per_shard": 2,
             "shards": [{"file": s.name} for s in layout]}
    paths = [tmp_path / s.name for s in layout]
    for holdout in (0, 1, 3):
        assert readers.index_counts(index, tmp_path, holdout) == readers.count_samples(paths, holdout)


# --------------------------------------------------------------------------- real folder

def write_class_folders(root: Path, keys, per_class=3):
    for c, key in enumerate(keys):
        (root / key).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (24, 24), COLOURS[c % 3]).save(root / key / f"{key}_{i}.JPEG")


def test_real_folder_uses_only_the_class_set_in_logit_order(tmp_path):
    write_class_folders(tmp_path, ["n00000003", "n00000001", "n00000002", "n09999999"])
    dataset, holdout = readers.folder_splits(tmp_path, KEYS, "data.train", 0,
                                          MultiCrop(32, (0.5, 1.0), 1, 16, (0.1, 0.5)), None)
    assert len(dataset) == 9 and holdout is None
    assert sorted(label for _, label in dataset.samples) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(path.parent.name == KEYS[label] for path, label in dataset.samples)
    crops, label = dataset[4]
    assert label == 1 and [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)]


def test_real_folder_missing_a_class_names_it(tmp_path):
    write_class_folders(tmp_path, KEYS[:2])
    with pytest.raises(UserError, match="n00000003"):
        readers.folder_splits(tmp_path, KEYS, "data.train", 0, lambda image: image, None)


def test_real_folder_holds_out_the_first_files_of_each_class(tmp_path):
    write_class_folders(tmp_path, KEYS, per_class=3)
    train, holdout = readers.folder_splits(tmp_path, KEYS, "data.train", 1, None, None)
    assert [path.name for path, _ in holdout.samples] == [f"{k}_0.JPEG" for k in KEYS]
    assert len(train) == 6 and not set(train.samples) & set(holdout.samples)
    with pytest.raises(UserError, match=r"has 3 images and train.holdout_per_class = 3"):
        readers.folder_splits(tmp_path, KEYS, "data.train", 3, None, None)


# --------------------------------------------------------------------------- training

@pytest.mark.slow
def test_learns_a_small_colour_task(tmp_path):
    write_colour_shards(tmp_path, per_class=8, holdout=2)
    # Batch 8 makes noisy BatchNorm statistics: a peak lr of 0.0125 keeps the loss from spiking, and
    # residual branches that start at 0 (zero_init_residual; the default, false, as t-ReX, makes the
    # first epochs' held-out loss reach the thousands at this size).
    # Two crops an image: with one, 24 images make a training loss too noisy to compare epochs by.
    p = tiny_params(tmp_path, epochs=6, lr=0.4, local_crops=0, holdout_per_class=2, channels_last=True,
                    global_crops=2, global_crop_style="dino", zero_init_residual=True)
    dataset, holdout = training.open_training_set(p, KEYS, tmp_path)
    logged = []
    result = loop.train(dataset, len(KEYS), p.train, seed=0, device=torch.device("cpu"), holdout=holdout,
                            on_epoch=logged.append)
    first, last = result.history[0], result.history[-1]
    assert last.loss < first.loss
    assert last.train_top1 > 70  # chance is 33%
    assert last.holdout_top1 > 60 and last.holdout_loss < first.holdout_loss   # images it never trained on
    assert [s.epoch for s in logged] == list(range(1, 7)) and last.images == 24


@pytest.mark.slow
def test_the_loss_is_read_back_every_few_steps_not_every_step(tmp_path, monkeypatch):
    """Summed on the device; read (a host sync) every READ_EVERY_STEPS steps, before each checkpoint and
    at the end of the epoch, with the same sums as reading every step."""
    write_colour_shards(tmp_path, per_class=12)                     # 36 images, batch 8: 5 steps an epoch
    reads = []
    read = loop.read_sums
    monkeypatch.setattr(loop, "read_sums", lambda p, *args: reads.append(p.step) or read(p, *args))
    monkeypatch.setattr(loop, "READ_EVERY_STEPS", 2)
    p = tiny_params(tmp_path, epochs=1, local_crops=0, arch=TINY)
    dataset, _ = training.open_training_set(p, KEYS, tmp_path)
    sparse = loop.train(dataset, len(KEYS), p.train, seed=0, device=torch.device("cpu")).history[0]
    assert reads == [2, 4, 5]
    monkeypatch.setattr(loop, "READ_EVERY_STEPS", 1)
    dense = loop.train(dataset, len(KEYS), p.train, seed=0, device=torch.device("cpu")).history[0]
    assert sparse.loss == pytest.approx(dense.loss) and sparse.train_top1 == dense.train_top1


def test_a_diverged_loss_stops_training_with_one_line(tmp_path):
    write_colour_shards(tmp_path, per_class=12)
    p = tiny_params(tmp_path, epochs=1, local_crops=0)
    dataset, _ = training.open_training_set(p, KEYS, tmp_path)
    with pytest.raises(UserError, match=r"training loss became nan in epoch 1 \(by step 5\); lower train.lr"):
        loop.train(dataset, len(KEYS), replace(p.train, lr=1e30), seed=0, device=torch.device("cpu"))


@pytest.mark.slow
def test_multicrop_on_the_device_trains_on_the_same_images(tmp_path):
    """augment_device: cuda's path (JPEG bytes and draws from the loader, crops made where the
    model is), run on the CPU: every training image once an epoch, crops in the recipe's shapes."""
    write_colour_shards(tmp_path, per_class=8)
    p = tiny_params(tmp_path, epochs=1, local_crops=2, workers=2, arch=TINY)
    on_cpu_set, _ = training.open_training_set(p, KEYS, tmp_path)
    on_device_set, _ = training.open_training_set(p, KEYS, tmp_path, on_device=True)
    (jpegs, draws), labels = next(iter(loop.make_loader(on_device_set, p.train, 0, torch.device("cpu"),
                                                           loop.distributed.SINGLE, on_device=True)))
    assert len(jpegs) == len(labels) and draws.shape == (len(labels), 3, 17) and jpegs[0].dtype == torch.uint8
    results = [loop.train(dataset, len(KEYS), p.train, 0, torch.device("cpu"), on_device=on_device)
               for dataset, on_device in ((on_cpu_set, False), (on_device_set, True))]
    assert [r.history[0].images for r in results] == [24, 24]
    assert results[1].skipped_on_device == 0 and math.isfinite(results[1].history[0].loss)


@pytest.mark.slow
def test_a_step_budget_ends_training_mid_epoch_at_min_lr(tmp_path):
    write_colour_shards(tmp_path, per_class=12)                     # 36 images, batch 8: 5 steps an epoch
    p = tiny_params(tmp_path, epochs=10, warmup_epochs=1, max_steps=7, local_crops=0, min_lr=0.001, arch=TINY)
    dataset, _ = training.open_training_set(p, KEYS, tmp_path)
    result = loop.train(dataset, len(KEYS), p.train, 0, torch.device("cpu"))
    assert [(s.epoch, s.steps, s.images) for s in result.history] == [(1, 5, 36), (2, 7, 16)]
    assert result.history[-1].lr == pytest.approx(0.001)           # the schedule spans the budget


def test_lr_warms_up_linearly_then_decays_to_min_lr():
    tp = replace(tiny_params(Path("/nonexistent")).train, epochs=10, warmup_epochs=2, lr=0.1, batch_size=512,
                 min_lr=0.0)
    assert recipe.lr_at(0.1, tp) == pytest.approx(0.1)          # 1 epoch of 10: half of the peak 0.2
    assert recipe.lr_at(0.2, tp) == pytest.approx(0.2)          # peak = lr x 512 / 256
    assert recipe.lr_at(0.6, tp) == pytest.approx(0.1)          # half-way down the cosine
    assert recipe.lr_at(1.0, tp) == pytest.approx(0.0, abs=1e-12)
    floor = replace(tp, min_lr=0.002)
    assert recipe.lr_at(0.6, floor) == pytest.approx(0.101) and recipe.lr_at(1.0, floor) == pytest.approx(0.002)


def test_stage_writes_a_checkpoint_plain_torchvision_loads(tmp_path):
    write_colour_shards(tmp_path / "shards", per_class=4)
    p = tiny_params(tmp_path)
    out, metrics_path, log = tmp_path / "m" / "resnet50.pt", tmp_path / "train.json", tmp_path / "log"
    metrics = training.run(p, write_prompts(tmp_path / "prompts.tsv"), tmp_path / "shards", out, metrics_path, log)
    assert metrics["images"] == 12 and metrics["classes"] == 3 and metrics["source"] == "synthetic"
    assert metrics["train_images"] == 12 and metrics["holdout_images"] == 0 and metrics["steps"] == 2
    assert set(metrics) >= {"epochs", "images", "loss", "train_top1", "images_per_second", "seconds"}
    checkpoint = torch.load(out)
    assert checkpoint["classes"] == KEYS and checkpoint["wnids"] == KEYS and checkpoint["image_size"] == 32
    model = torchvision.models.resnet50(num_classes=len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["state_dict"])
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_stage_trains_on_the_real_folder(tmp_path):
    write_class_folders(tmp_path / "real", KEYS + ["n09999999"], per_class=2)
    p = tiny_params(tmp_path, holdout_per_class=1)
    p = replace(p, source="real")
    metrics = training.run(p, write_prompts(tmp_path / "prompts.tsv"), tmp_path / "no-shards",
                           tmp_path / "resnet50.pt", tmp_path / "train.json", tmp_path / "log")
    assert metrics["images"] == 3 and metrics["source"] == "real"
    assert 0 <= metrics["holdout_top1"] <= 100      # one held-out image a class


def outputs(tmp_path):
    return tmp_path / "resnet50.pt", tmp_path / "train.json", tmp_path / "log"


def test_the_checkpoint_also_loads_into_timm(tmp_path):
    timm = pytest.importorskip("timm")
    write_colour_shards(tmp_path / "shards", per_class=4)
    p = tiny_params(tmp_path)
    training.run(p, write_prompts(tmp_path / "prompts.tsv"), tmp_path / "shards", *outputs(tmp_path))
    checkpoint = torch.load(tmp_path / "resnet50.pt", weights_only=True)
    model = timm.create_model("resnet50", pretrained=False, num_classes=len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["state_dict"])
    reference = torchvision.models.resnet50(num_classes=3)
    reference.load_state_dict(checkpoint["state_dict"])
    image = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model.eval()(image), reference.eval()(image), atol=1e-5)


def test_fp16_on_cpu_is_refused_before_training(tmp_path):
    write_colour_shards(tmp_path / "shards", per_class=4)
    p = tiny_params(tmp_path, amp="fp16")
    with pytest.raises(UserError, match=r"profiles\.embedded\.train\.amp = 'fp16' needs a CUDA device"):
        training.run(p, write_prompts(tmp_path / "prompts.tsv"), tmp_path / "shards", *outputs(tmp_path))
    assert not any(path.exists() for path in outputs(tmp_path))


def test_bf16_autocast_trains_on_cpu(tmp_path):
    write_colour_shards(tmp_path, per_class=4)
    p = tiny_params(tmp_path, amp="bf16", local_crops=0)
    dataset, _ = training.open_training_set(p, KEYS, tmp_path)
    result = loop.train(dataset, len(KEYS), p.train, 0, torch.device("cpu"))
    assert math.isfinite(result.history[0].loss)
    assert all(v.dtype == torch.float32 for v in result.model.state_dict().values() if v.is_floating_point())


def test_state_folder_changes_with_what_decides_the_weights_only(tmp_path, monkeypatch):
    write_colour_shards(tmp_path, per_class=4)
    p = tiny_params(tmp_path)
    state = train_state.state_file(p, KEYS, tmp_path)
    assert train_state.state_file(replace(p, train=replace(p.train, workers=3, checkpoint_every_steps=5)),
                               KEYS, tmp_path) == state
    assert train_state.state_file(replace(p, seed=1), KEYS, tmp_path) != state
    assert train_state.state_file(replace(p, train=replace(p.train, lr=0.5)), KEYS, tmp_path) != state
    # An edited training code must not resume (or pass off) a state trained by the old one.
    monkeypatch.setattr(train_state, "code_identity", lambda head: "edited")
    assert train_state.state_file(p, KEYS, tmp_path) != state


def test_no_shards_says_which_stage_to_run(tmp_path):
    (tmp_path / "synthetic").mkdir()
    with pytest.raises(UserError, match=r"synthetic/index.json: missing or not valid JSON; run: dvc repro sd-generate"):
        training.run(tiny_params(tmp_path), write_prompts(tmp_path / "prompts.tsv"), tmp_path / "synthetic",
                     *outputs(tmp_path))
    assert not any(path.exists() for path in outputs(tmp_path))


def test_missing_real_folder_names_the_param(tmp_path):
    p = replace(tiny_params(tmp_path), source="real")
    with pytest.raises(UserError, match=r"profiles\.embedded\.data\.train"):
        training.run(p, write_prompts(tmp_path / "prompts.tsv"), tmp_path, *outputs(tmp_path))
    assert not any(path.exists() for path in outputs(tmp_path))


def test_missing_class_folder_stops_before_training(tmp_path):
    write_class_folders(tmp_path / "real", KEYS[:2])
    p = replace(tiny_params(tmp_path), source="real")
    with pytest.raises(UserError, match="no image folder for class 'n00000003'"):
        training.run(p, write_prompts(tmp_path / "prompts.tsv"), tmp_path, *outputs(tmp_path))
    assert not any(path.exists() for path in outputs(tmp_path))


def stage_command(tmp_path: Path, name: str, **train) -> list[str]:
    """The train-resnet50 stage on tmp_path/shards, writing into tmp_path/name."""
    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["profile"] = "embedded"
    raw["profiles"]["embedded"]["train"].update(
        # The stage's processes are under test here (torchrun's ranks, SIGKILL, resuming, the launcher), not
        # ResNet-50: TINY, whose training state is 3 MB instead of 190-440 MB.
        # zero_init_residual: at batch 4 and lr 0.4 a ResNet without it reaches a NaN loss in its first steps.
        dict(epochs=4, batch_size=4, lr=0.4, global_crop_size=32, local_crops=1, local_crop_size=16, workers=0,
             holdout_per_class=0, device="cpu", zero_init_residual=True, arch=TINY,
             work_dir=str(tmp_path / name / "work")), **train)
    (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / name / "params.yaml").write_text(yaml.safe_dump(raw))
    return [sys.executable, str(root / "stages" / "train_resnet50.py"), "--params", str(tmp_path / name / "params.yaml"),
            "--prompts", str(tmp_path / "prompts.tsv"), "--shards", str(tmp_path / "shards"),
            "--out", str(tmp_path / name / "resnet50.pt"), "--metrics", str(tmp_path / name / "train.json"),
            "--dvclive", str(tmp_path / name / "log")]


@pytest.mark.cluster       # torchrun's ranks: the second command (README)
def test_bad_input_met_in_a_torchrun_worker_is_one_line_and_exit_2(tmp_path):
    # The loss becomes inf only once training runs, which with processes: 2 is in the torchrun
    # workers alone, and in both of them at the same step (DDP keeps their weights equal).
    write_class_folders(tmp_path / "real", KEYS, per_class=4)
    write_prompts(tmp_path / "prompts.tsv")
    command = stage_command(tmp_path, "diverges", epochs=1, processes=2, lr=1e6, arch="resnet50")   # test_resnet's loss stays finite
    params_file = tmp_path / "diverges" / "params.yaml"
    raw = yaml.safe_load(params_file.read_text())
    raw["source"] = "real"
    raw["profiles"]["embedded"]["data"]["train"] = str(tmp_path / "real")
    params_file.write_text(yaml.safe_dump(raw))
    result = run_script(command, env=dict(os.environ, OMP_NUM_THREADS="1"))     # the launcher in this process
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: training loss became"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "diverges" / "resnet50.pt").exists()


@pytest.mark.slow
# Two DDP processes are run with t-ReX's head only: its resume restores all a linear head's does (the
# network, optimiser, loader positions of both ranks) plus its moving average and memory, and uneven
# shards add a rank that waits; the linear head's resume is test_resumes_mid_epoch_to_the_same_weights's.
@pytest.mark.parametrize("per_class, setting", [
    (4, {"workers": 2}),
    # 5 shards: one rank has 3 steps an epoch, the other 2, and keeps answering the memory's gathers. A tiny
    # ViT (no BatchNorm to start at 0): train.arch's timm path through DDP and a resume.
    # torchrun's ranks: the second command (README), with the scheduler's jobs.
    pytest.param(5, {"processes": 2, "workers": 1, "head": "trex", "trex_memory": 8, "batch_size": 6, "epochs": 1,
                     "arch": "timm:test_vit", "zero_init_residual": False}, marks=pytest.mark.cluster)],
    ids=["2 loader workers", "t-ReX head on a ViT, 2 DDP processes, uneven shards"])
def test_killed_mid_epoch_training_resumes_to_the_same_weights(tmp_path, per_class, setting):
    """SIGKILL of every process of the stage in the middle of an epoch, then the same command again."""
    import psutil
    write_colour_shards(tmp_path / "shards", per_class=per_class, per_shard=3)     # shards of 3
    write_prompts(tmp_path / "prompts.tsv")

    epochs = setting.get("epochs", 2)

    def command(name):
        return stage_command(tmp_path, name, **{"epochs": 2, "checkpoint_every_steps": 1, **setting})

    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The clean run and the resume start in this process (the stage's launcher; torchrun's ranks and
    # the loader workers are processes still): only the killed run needs a process tree of its own.
    clean = run_script(command("clean"), env=env)
    assert clean.returncode == 0, clean.stderr
    metrics = json.loads((tmp_path / "clean" / "train.json").read_text())
    # Every image once an epoch, whether split over workers or over DDP processes' shards.
    assert (metrics["images"], metrics["epochs"]) == (3 * per_class, epochs)
    assert f"on {setting.get('processes', 1)} x cpu" in clean.stdout

    killed = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "killed" / "work").glob("*/last.pt")):      # the first step's checkpoint
        assert killed.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    # The launcher, torchrun's workers (in sessions of their own) and the loader workers.
    tree = psutil.Process(killed.pid)
    for process in [tree, *tree.children(recursive=True)]:
        process.kill()
    killed.wait()
    state = torch.load(next((tmp_path / "killed" / "work").glob("*/last.pt")), weights_only=False)
    assert state["progress"] is not None or state["epoch"] < epochs   # killed inside an epoch, or between
    resumed = run_script(command("killed"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout

    a = torch.load(tmp_path / "clean" / "resnet50.pt")["state_dict"]
    b = torch.load(tmp_path / "killed" / "resnet50.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(logged(tmp_path / "clean", "loss")) == epochs
    assert [row[0] for row in logged(tmp_path / "killed", "loss")] == [str(e + 1) for e in range(epochs)]   # whole


@pytest.mark.slow
# ResNet-50 with the linear head; t-ReX's head on timm's tiny test_resnet (its resume is the head's state).
@pytest.mark.parametrize("head, arch", [("linear", "resnet50"), ("trex", TINY)])
def test_resumes_mid_epoch_to_the_same_weights(tmp_path, monkeypatch, head, arch):
    write_colour_shards(tmp_path, per_class=4, holdout=1)
    p = tiny_params(tmp_path, epochs=2, batch_size=4, checkpoint_every_steps=2, holdout_per_class=1, head=head,
                    trex_memory=8, arch=arch)
    dataset, holdout = training.open_training_set(p, KEYS, tmp_path)     # 12 images: 3 steps an epoch
    cpu = torch.device("cpu")
    clean = loop.train(dataset, len(KEYS), p.train, 0, cpu, holdout=holdout)

    state = tmp_path / "state" / "last.pt"
    resumed = killed_in_epoch_2_then_resumed(monkeypatch, dataset, p.train, state, holdout)

    a, b = clean.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(s.loss, s.train_top1, s.holdout_top1, s.images) for s in resumed.history] == \
        [(s.loss, s.train_top1, s.holdout_top1, s.images) for s in clean.history]


def killed_in_epoch_2_then_resumed(monkeypatch, dataset, tp, state: Path, holdout) -> loop.TrainResult:
    """Train until the first mid-epoch checkpoint of epoch 2, die there, and train again from the state."""
    class Killed(Exception):
        pass

    save_state = train_state.save_state

    def save_then_die(path, model, optimizer, scaler, history, progress=None, head_training=None):
        save_state(path, model, optimizer, scaler, history, progress, head_training)
        if len(history) == 1 and progress is not None:
            raise Killed        # right after the first checkpoint of epoch 2

    cpu = torch.device("cpu")
    monkeypatch.setattr(train_state, "save_state", save_then_die)
    with pytest.raises(Killed):
        loop.train(dataset, len(KEYS), tp, 0, cpu, state_path=state, holdout=holdout)
    monkeypatch.undo()
    assert torch.load(state, weights_only=False)["progress"]["step"] == tp.checkpoint_every_steps
    return loop.train(dataset, len(KEYS), tp, 0, cpu, state_path=state, holdout=holdout)


def logged(folder: Path, metric: str) -> list[list[str]]:
    """Rows (step, value) of one metric of the stage's DVCLive log."""
    return [line.split("\t") for line in (folder / "log" / "plots" / "metrics" / f"{metric}.tsv").read_text().splitlines()[1:]]


def test_zero_init_residual_is_a_param_off_by_default_as_in_t_rex():
    assert all(p.train.zero_init_residual is False
               for p in (params.parse({**yaml.safe_load(Path("params.yaml").read_text()), "profile": name})
                         for name in ("embedded", "paper", "rehearsal")))

    def last_norms(net):
        return [m.bn3.weight for m in net.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert all((w == 1).all() for w in last_norms(network.build("resnet50", Linear(), 3)))
    assert all(not w.any() for w in last_norms(network.build("resnet50", Linear(), 3, zero_init_residual=True)))



# --------------------------------------------------------------------------- t-ReX's head

def test_trex_memory_is_a_fifo_and_its_class_sums_are_the_prototypes():
    head = trex_head.TrexHead(num_classes=3, memory=4)
    first = torch.randn(3, trex_head.BOTTLENECK)
    head.push(first, torch.tensor([0, 1, 2]))
    second = torch.randn(3, trex_head.BOTTLENECK)
    head.push(second, torch.tensor([2, 2, 1]))             # wraps: entry 0 and 1 written again
    assert int(head.pointer) == 2 and head.memory_labels.tolist() == [2, 1, 2, 2]
    assert torch.equal(head.memory, torch.stack([second[1], second[2], first[2], second[0]]))
    prototypes = head.prototypes()
    assert torch.allclose(prototypes[2], F.normalize(second[1] + first[2] + second[0], dim=0), atol=1e-6)
    assert torch.allclose(prototypes[1], F.normalize(second[2], dim=0)) and not prototypes[0].any()
    head.push(torch.randn(9, trex_head.BOTTLENECK), torch.arange(9) % 3)     # more than it holds: the last 4
    assert head.memory_labels.tolist() == [0, 1, 2, 2] and int(head.pointer) == 3


@pytest.mark.slow
def test_trex_head_trains_with_its_moving_average_and_evaluates_from_its_checkpoint(tmp_path):
    """head: trex on the loader's and on the device's multi-crop: the memory fills with the moving
    average's entries of the first global crop (labels of the images), and the checkpoint loads
    for evaluation (the same logits) and for transfer (the pooled 2048-d feature)."""
    write_colour_shards(tmp_path / "shards", per_class=8)
    p = tiny_params(tmp_path, epochs=1, local_crops=2, head="trex", trex_memory=64)
    results = []
    for on_device in (False, True):
        dataset, _ = training.open_training_set(p, KEYS, tmp_path / "shards", on_device=on_device)
        results.append(loop.train(dataset, len(KEYS), p.train, 0, torch.device("cpu"), on_device=on_device))
    for result in results:
        head = result.model.fc
        assert isinstance(head, trex_head.TrexHead) and int(head.pointer) == 24 and math.isfinite(result.history[0].loss)
        assert sorted(head.memory_labels[:24].tolist()) == sorted([0, 1, 2] * 8)   # every image's first global crop
    out = tmp_path / "resnet50.pt"
    training.save_checkpoint(out, results[0].model, [prompts.ClassPrompt(wnid=k, index=i, c=k, h_c="", d_c="", prompt=k)
                                                     for i, k in enumerate(KEYS)], p.train, {})
    loaded = checkpoints.load_checkpoint(out)
    image = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded.model(image), results[0].model.eval()(image), atol=1e-5)
    assert transfer.encoder_of(loaded.model)(image).shape == (2, 2048)
    assert torch.load(out, weights_only=True)["head"] == "trex"


@pytest.mark.slow
@pytest.mark.parametrize("arch, width", [("timm:test_vit", 64), ("timm:test_resnet", 96)])
def test_a_timm_model_as_arch_trains_on_multicrop_and_evaluates_from_its_checkpoint(tmp_path, arch, width):
    """train.arch = timm:<name>: both crop sizes go through it (a ViT at any size), it learns the colours, and
    the checkpoint gives evaluation the same logits and eval-transfer the model's pooled features."""
    write_colour_shards(tmp_path / "shards", per_class=8, holdout=2)
    p = tiny_params(tmp_path, epochs=6, lr=0.4, arch=arch, zero_init_residual=False, holdout_per_class=2)
    dataset, holdout = training.open_training_set(p, KEYS, tmp_path / "shards")
    result = loop.train(dataset, len(KEYS), p.train, 0, torch.device("cpu"), holdout=holdout)
    assert result.history[-1].holdout_top1 > 60, result.history           # images it never trained on; chance 33 %
    out = tmp_path / "model.pt"
    training.save_checkpoint(out, result.model, [prompts.ClassPrompt(wnid=k, index=i, c=k, h_c="", d_c="", prompt=k)
                                                 for i, k in enumerate(KEYS)], p.train, {})
    assert torch.load(out, weights_only=True)["arch"] == arch
    loaded = checkpoints.load_checkpoint(out)
    image = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded.model(image), result.model.eval()(image), atol=1e-5)
    assert transfer.encoder_of(loaded.model)(image).shape == (2, width)


def test_resnet50_keeps_its_state_key_and_other_archs_get_their_own(tmp_path):
    # Training states made before train.arch existed stay resumable: a ResNet-50's recipe does not name it.
    write_colour_shards(tmp_path / "shards", per_class=2)
    folders = {}
    for arch in ("resnet50", "timm:test_vit"):
        path = train_state.state_file(tiny_params(tmp_path, arch=arch), KEYS, tmp_path / "shards")
        folders[arch] = path.parent
        recipe = json.loads((path.parent / "recipe.json").read_text())["recipe"]
        assert recipe.get("arch") == (None if arch == "resnet50" else arch)
    assert folders["resnet50"] != folders["timm:test_vit"]


def test_an_arch_that_cannot_be_built_is_one_line_before_training(tmp_path):
    for arch, message in (("vit_base_patch16_224", r"train.arch = 'vit_base_patch16_224' is not valid; allowed: "
                                                   r"'resnet50' \(torchvision's\) or 'timm:' and a timm model name"),
                          ("timm:no_such_net", r"train.arch = 'timm:no_such_net': timm [0-9.]+ has no model 'no_such_net'")):
        with pytest.raises(UserError, match=message):
            training.prepare(tiny_params(tmp_path, arch=arch), tmp_path / "missing.tsv", tmp_path / "shards")
    with pytest.raises(UserError, match="train.zero_init_residual: true, but timm's test_vit has no residual BatchNorm"):
        network.build("timm:test_vit", Linear(), 3, zero_init_residual=True)
    # A checkpoint naming such an arch: one line about the checkpoint, not about params.yaml.
    torch.save({"arch": "timm:no_such_net", "state_dict": {}, "classes": KEYS, "wnids": KEYS}, tmp_path / "m.pt")
    with pytest.raises(UserError, match=r"m.pt: checkpoint has arch 'timm:no_such_net', which this install cannot "
                                        r"build \(timm [0-9.]+ has no model 'no_such_net'") as error:
        checkpoints.load_checkpoint(tmp_path / "m.pt")
    assert "params.yaml" not in str(error.value) and "\n" not in str(error.value)


def test_bad_head_params_are_one_line(tmp_path):
    raw = embedded_raw()
    for key, value, allowed in (("head", 7, "a string"), ("trex_memory", 0, ">= 1")):
        bad = {**raw, "profiles": {**raw["profiles"], "embedded": {**raw["profiles"]["embedded"],
                                                                   "train": {**raw["profiles"]["embedded"]["train"], key: value}}}}
        with pytest.raises(UserError) as error:
            params.parse(bad)
        assert f"profiles.embedded.train.{key} = " in str(error.value) and allowed in str(error.value)
    # A name the head registry lacks stops the stage before it reads anything.
    with pytest.raises(UserError, match=r"profiles.embedded.train.head = 'mlp' is not valid; allowed: linear \| trex"):
        training.prepare(tiny_params(tmp_path, head="mlp"), tmp_path / "missing.tsv", tmp_path / "shards")
