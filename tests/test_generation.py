"""sd-generate: counts, plan, seeds, backgrounds, model loading, shards and the sample grid."""
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from imagenet_sd import backgrounds, embedded, generation, params as params_module, reports, seeds, shards
from imagenet_sd.errors import UserError
from imagenet_sd.prompts import ClassPrompt

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n01484850"]
RECORD_FIELDS = {"wnid", "class", "label", "image_index", "prompt", "seed", "guidance", "steps", "model",
                 "flagged"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """models/tiny-sd when setup built it, else a fresh build for this module."""
    if embedded.is_current(ROOT / "models" / "tiny-sd"):
        return ROOT / "models" / "tiny-sd"
    out = tmp_path_factory.mktemp("model") / "tiny-sd"
    embedded.build(out)
    return out


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return generation.load_pipeline(str(tiny_model), torch.device("cpu"), torch.float32)


def rows(prompt: str = "{c}") -> list[ClassPrompt]:
    names = ["tench", "goldfish", "great white shark"]
    return [ClassPrompt(wnid=w, index=i, c=n, h_c="fish", d_c="", prompt=prompt.format(c=n, h_c="fish", b="{b}"))
            for i, (w, n) in enumerate(zip(WNIDS, names))]


def train_folder(root: Path, counts: dict[str, int]) -> Path:
    for wnid, n in counts.items():
        (root / wnid).mkdir(parents=True)
        for i in range(n):
            (root / wnid / f"{i}.JPEG").write_bytes(b"")     # counted by name, never opened
    return root


def make_params(tmp_path: Path, model: Path, **top) -> params_module.Params:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profile"] = "embedded"
    p = params_module.parse(raw)
    generate = dataclasses.replace(p.generate, model=str(model), batch_size=2, images_per_shard=4, resolution=64,
                                   device="cpu")
    data = dataclasses.replace(p.data, train=train_folder(tmp_path / "train", dict.fromkeys(WNIDS, 2)))
    return dataclasses.replace(p, generate=generate, data=data, steps=3, guidance=7.5, scale=1.0, seed=0, **top)


# --------------------------------------------------------------------------- counts and plan

def test_counts_from_train_folder_times_scale(tmp_path):
    root = train_folder(tmp_path, {WNIDS[0]: 3, WNIDS[1]: 5, WNIDS[2]: 1})
    real = generation.real_counts(rows(), root, "embedded")
    assert real == {WNIDS[0]: 3, WNIDS[1]: 5, WNIDS[2]: 1}
    assert generation.images_per_class(real, 0.5) == {WNIDS[0]: 2, WNIDS[1]: 3, WNIDS[2]: 1}   # halves round up
    assert generation.images_per_class(real, 2) == {WNIDS[0]: 6, WNIDS[1]: 10, WNIDS[2]: 2}
    assert generation.images_per_class(real, 0.01) == dict.fromkeys(WNIDS, 1)                  # at least 1


def test_missing_class_or_folder_is_a_user_error(tmp_path):
    root = train_folder(tmp_path / "train", {WNIDS[0]: 3, WNIDS[1]: 5})
    with pytest.raises(UserError, match=f"profiles.embedded.data.train.*{WNIDS[2]}"):
        generation.real_counts(rows(), root, "embedded")
    with pytest.raises(UserError, match="profiles.embedded.data.train"):
        generation.real_counts(rows(), tmp_path / "absent", "embedded")


def test_unconfigured_train_folder_falls_back_with_a_warning(capsys):
    real = generation.real_counts(rows(), None, "embedded")
    assert real == dict.fromkeys(WNIDS, generation.FALLBACK_REAL_COUNT)
    assert "warning" in capsys.readouterr().err


def test_plan_is_round_robin_with_derived_seeds():
    counts = {WNIDS[0]: 2, WNIDS[1]: 1, WNIDS[2]: 3}
    items = generation.plan(rows(), counts, seed=5, phrases=[])
    assert [(it.cls.key, it.image_index) for it in items] == [
        (WNIDS[0], 0), (WNIDS[1], 0), (WNIDS[2], 0), (WNIDS[0], 1), (WNIDS[2], 1), (WNIDS[2], 2)]
    assert all(it.seed == seeds.derive(5, "image", it.cls.key, it.image_index) for it in items)
    assert items[0].prompt == "tench"


def test_background_prompts_follow_the_scene_rule():
    phrases = [f"scene {i}" for i in range(backgrounds.NUM_SCENES)]
    items = generation.plan(rows("{c}, {h_c} inside {b}"), dict.fromkeys(WNIDS, 4), seed=0, phrases=phrases)
    for it in items:
        scene = phrases[backgrounds.scene_for(it.cls.key, it.image_index)]
        assert it.prompt == f"{it.cls.c}, fish inside {scene}"
    assert len({it.prompt for it in items if it.cls.key == WNIDS[0]}) == 4


# --------------------------------------------------------------------------- model

@pytest.mark.parametrize("model", ["/no/such/folder/tiny-sd", "nobody-here/no-such-model-xyz"])
def test_missing_model_fails_fast_offline(model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub.constants import HF_HUB_CACHE
    started = time.perf_counter()
    with pytest.raises(UserError) as error:
        generation.load_pipeline(model, torch.device("cpu"), torch.float32, key="profiles.x.generate.model")
    assert time.perf_counter() - started < 10
    message = str(error.value)
    assert "\n" not in message
    assert model in message and HF_HUB_CACHE in message and "profiles.x.generate.model" in message


def test_image_does_not_depend_on_the_batch(pipe):
    items = generation.plan(rows(), dict.fromkeys(WNIDS, 1), seed=0, phrases=[])
    options = dict(guidance=7.5, steps=3, resolution=64)
    alone = [np.asarray(image, dtype=int) for _, image, _ in generation.render(pipe, items, batch_size=1, **options)]
    batched = [np.asarray(image, dtype=int) for _, image, _ in generation.render(pipe, items, batch_size=3, **options)]
    for a, b in zip(alone, batched):
        # Same seed and prompt -> the same image. Batched CPU kernels may round the last
        # float bit differently, which moves a rare pixel by one grey level.
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    assert np.abs(alone[0] - alone[1]).mean() > 1     # other seed and prompt: another image


# --------------------------------------------------------------------------- end to end

def test_generate_writes_complete_shards_index_metrics_and_grid(tmp_path, tiny_model):
    p = make_params(tmp_path, tiny_model)
    out, metrics_path = tmp_path / "synthetic", tmp_path / "metrics" / "generate.json"
    out.mkdir()
    (out / "shard-000099.tar").write_bytes(b"stale")
    prepared = generation.prepare(p, rows(), [])
    metrics = generation.generate(p, prepared, out, metrics_path)

    paths = shards.list_shards(out)
    assert [x.name for x in paths] == ["shard-000000.tar", "shard-000001.tar"]   # 6 images, 4 a shard
    samples = [s for path in paths for s in shards.iter_shard(path)]
    assert len(samples) == 6
    for key, jpeg, record in samples:
        assert set(record) == RECORD_FIELDS
        assert key == shards.sample_key(record["class"], record["image_index"])
        assert WNIDS[record["label"]] == record["wnid"] == record["class"]
        assert record["seed"] == seeds.derive(0, "image", record["class"], record["image_index"])
        assert record["steps"] == 3 and record["model"] == str(tiny_model) and record["flagged"] is False
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.format == "JPEG" and image.size == (64, 64)
    assert len({s[0] for s in samples}) == 6
    # Classes are mixed within the first shard.
    assert {r["class"] for _, _, r in shards.iter_shard(paths[0])} == set(WNIDS)

    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == WNIDS and index["counts"] == dict.fromkeys(WNIDS, 2)
    assert index["images"] == 6 and index["bytes"] == sum(x.stat().st_size for x in paths)
    assert [s["file"] for s in index["shards"]] == [x.name for x in paths]
    assert metrics == json.loads(metrics_path.read_text())
    assert metrics["images"] == 6 and metrics["shards"] == 2 and metrics["classes"] == 3
    assert metrics["per_class_min"] == metrics["per_class_max"] == 2 and metrics["images_per_second"] > 0

    grid = reports.sample_grid(out, rows(), tmp_path / "reports" / "samples.png")
    with Image.open(grid) as image:
        assert image.format == "PNG"
        assert image.height >= 3 * 128 and image.width >= 2 * 128
    assert not list((tmp_path / "reports").glob(".*tmp"))


def test_stage_checks_the_model_before_touching_outputs(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profile"] = "embedded"
    raw["profiles"]["embedded"]["generate"]["model"] = str(tmp_path / "missing-model")
    raw["profiles"]["embedded"]["data"]["train"] = str(train_folder(tmp_path / "train", dict.fromkeys(WNIDS, 1)))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    prompt_file = tmp_path / "prompts.tsv"
    from imagenet_sd import prompts
    prompts.write(prompt_file, rows())
    backgrounds.write(tmp_path / "bg.tsv", backgrounds.build())
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"earlier run")
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "sd_generate.py"), "--params", str(tmp_path / "params.yaml"),
         "--prompts", str(prompt_file), "--backgrounds", str(tmp_path / "bg.tsv"), "--out", str(out),
         "--metrics", str(tmp_path / "m.json"), "--grid", str(tmp_path / "g.png")],
        cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "missing-model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (out / "shard-000000.tar").read_bytes() == b"earlier run"
    assert not (tmp_path / "m.json").exists()


def test_folder_that_is_not_a_pipeline_is_a_user_error(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="not a complete Stable Diffusion pipeline folder"):
        generation.load_pipeline(str(tmp_path / "half"), torch.device("cpu"), torch.float32)
