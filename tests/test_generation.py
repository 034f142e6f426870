"""sd-generate: counts, plan, seeds, backgrounds, model loading, shards and the sample grid."""
import dataclasses
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import embedded_raw, generation_params
from imagenet_sd.core import params as params_module
from imagenet_sd.core import seeds
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import plan as planning
from imagenet_sd.datasets import shards
from imagenet_sd.generate import estimates, generation, worker
from imagenet_sd.generate.samples import sample_grid
from imagenet_sd.models import families, sd_model
from imagenet_sd.prompts import backgrounds
from imagenet_sd.prompts.prompts import ClassPrompt

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n01484850"]
RECORD_FIELDS = {"wnid", "class", "label", "image_index", "split", "prompt", "seed", "attempt", "guidance", "steps",
                 "scheduler", "model", "resolution", "flagged",
                 # what pins the generator (issue 23): its weights, pipeline and sampler with its config
                 "weights", "pipeline", "scheduler_class", "scheduler_config"}


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return sd_model.load_pipeline(str(tiny_model), torch.device("cpu"), torch.float32)


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


def make_params(tmp_path: Path, model: Path, per_class: int = 2, generate: dict | None = None,
                **top) -> params_module.Params:
    """3 classes x `per_class` real images, 1 image a class per shard, 3 steps, on CPU."""
    train = tmp_path / "train"
    if not train.exists():
        train_folder(train, dict.fromkeys(WNIDS, per_class))
    return generation_params(tmp_path, model, train, generate, **{**dict(steps=3, guidance=7.5, scale=1.0, seed=0), **top})


def run_generate(p, out: Path, rows_=None) -> dict:
    plan = generation.make_plan(p, rows_ or rows(), [])
    return generation.generate(p, plan, out, out.parent / "metrics.json")


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in shards.list_shards(folder)}


# --------------------------------------------------------------------------- counts and plan

def test_counts_from_train_folder_times_scale(tmp_path):
    root = train_folder(tmp_path, {WNIDS[0]: 3, WNIDS[1]: 5, WNIDS[2]: 1})
    real = planning.real_counts(rows(), root, "embedded")
    assert real == {WNIDS[0]: 3, WNIDS[1]: 5, WNIDS[2]: 1}
    assert planning.images_per_class(real, 0.5) == {WNIDS[0]: 2, WNIDS[1]: 3, WNIDS[2]: 1}   # halves round up
    assert planning.images_per_class(real, 2) == {WNIDS[0]: 6, WNIDS[1]: 10, WNIDS[2]: 2}
    assert planning.images_per_class(real, 0.01) == dict.fromkeys(WNIDS, 1)                  # at least 1
    # Held-out images come on top, so that training sees exactly real x scale.
    assert planning.images_per_class(real, 2, holdout=5) == {WNIDS[0]: 11, WNIDS[1]: 15, WNIDS[2]: 7}


def test_missing_class_or_folder_is_a_user_error(tmp_path):
    root = train_folder(tmp_path / "train", {WNIDS[0]: 3, WNIDS[1]: 5})
    with pytest.raises(UserError, match=f"profiles.embedded.data.train.*{WNIDS[2]}"):
        planning.real_counts(rows(), root, "embedded")
    with pytest.raises(UserError, match="profiles.embedded.data.train"):
        planning.real_counts(rows(), tmp_path / "absent", "embedded")


def test_unconfigured_train_folder_falls_back_with_a_warning(capsys):
    real = planning.real_counts(rows(), None, "embedded")
    assert real == dict.fromkeys(WNIDS, planning.FALLBACK_REAL_COUNT)
    assert "warning" in capsys.readouterr().err


def test_layout_is_blocks_of_image_indices_in_a_seeded_order_with_derived_seeds():
    counts = {WNIDS[0]: 2, WNIDS[1]: 1, WNIDS[2]: 3}
    layout = planning.Layout(rows(), counts, phrases=[], per_class=2)
    assert [sorted((it.cls.key, it.image_index) for it in s.items) for s in layout] == [
        sorted([(WNIDS[0], 0), (WNIDS[1], 0), (WNIDS[2], 0), (WNIDS[0], 1), (WNIDS[2], 1)]),
        [(WNIDS[2], 2)]]
    assert [len(s) for s in layout] == [5, 1] and layout.images == 6
    # The order inside a shard is a shuffle seeded by (seed, shard): fixed for a seed, other for another.
    again = planning.Layout(rows(), counts, phrases=[], per_class=2)
    assert [s.keys for s in layout] == [s.keys for s in again]
    big = dict.fromkeys(WNIDS, 40)
    orders = {tuple(planning.Layout(rows(), big, [], per_class=40, seed=seed)[0].keys) for seed in range(4)}
    assert len(orders) > 1
    items = [it for s in layout for it in s.items]
    assert all(it.seed(5) == seeds.derive(5, "image", it.cls.key, it.image_index) for it in items)
    assert len({it.seed(5, attempt) for it in items for attempt in range(3)}) == 3 * len(items)
    assert {it.prompt for it in items if it.cls.key == WNIDS[0]} == {"tench"}


def test_full_shards_are_the_same_at_every_scale():
    small = planning.Layout(rows(), {WNIDS[0]: 3, WNIDS[1]: 5, WNIDS[2]: 2}, [], per_class=2)
    large = planning.Layout(rows(), {WNIDS[0]: 30, WNIDS[1]: 50, WNIDS[2]: 20}, [], per_class=2)
    assert small[0].keys == large[0].keys and small[0].file_name == large[0].file_name   # every class has 2
    assert small[0].tag == planning.FULL
    assert small[1].file_name != large[1].file_name                               # grew: a new version
    assert set(small[1].keys) < set(large[1].keys)


def test_background_prompts_follow_the_scene_rule():
    phrases = [f"scene {i}" for i in range(backgrounds.NUM_SCENES)]
    layout = planning.Layout(rows("{c}, {h_c} inside {b}"), dict.fromkeys(WNIDS, 4), phrases=phrases, per_class=4)
    items = [it for s in layout for it in s.items]
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
        sd_model.load_pipeline(model, torch.device("cpu"), torch.float32, key="profiles.x.generate.model")
    assert time.perf_counter() - started < 10
    message = str(error.value)
    assert "\n" not in message
    assert model in message and "profiles.x.generate.model" in message
    # A path is never looked up on the Hub, so its message names no cache; a Hub id's names where it looked.
    assert (HF_HUB_CACHE in message) == (not model.startswith("/"))


def test_the_dry_run_on_the_paper_profile_needs_neither_the_data_nor_the_network(tmp_path, monkeypatch, capsys):
    """The login node's command: no ImageNet mounted, no internet, HF_HUB_OFFLINE unset. It says what it
    could not check and estimates anyway, without asking any host (the Hub's client retried for 85 s)."""
    import os
    import socket

    def no_network(*args, **kwargs):
        pytest.fail(f"the dry run asked the network: {args}")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    raw = embedded_raw()
    raw["profile"] = "paper"
    paper = raw["profiles"]["paper"]
    paper["data"]["train"] = str(tmp_path / "not-mounted")
    assert paper["generate"]["model"] == "CompVis/stable-diffusion-v1-4"     # a Hub id, not in this cache
    paper["generate"]["work_dir"] = str(tmp_path / "work")
    plan = generation.make_plan(params_module.parse(raw), rows(), backgrounds.build(), estimate=True)
    said = capsys.readouterr().err
    assert plan.folder is None and sum(plan.counts.values()) == 3 * (1300 + 5)      # ImageNet's maximum + held out
    assert f"could not check profiles.paper.data.train = '{tmp_path / 'not-mounted'}' (no such folder here)" in said
    assert "could not check the weights here" in said and "a dry run reads local folders and the cache only" in said
    assert "HF_HUB_OFFLINE" not in os.environ                        # the dry run's cache-only mode ends with it


def test_folder_that_is_not_a_pipeline_is_a_user_error(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="not a complete diffusers pipeline folder"):
        sd_model.load_pipeline(str(tmp_path / "half"), torch.device("cpu"), torch.float32)


def test_fp16_on_cpu_is_a_user_error():
    with pytest.raises(UserError, match="profiles.x.generate.dtype = 'fp16' is not supported on CPU"):
        sd_model.resolve_dtype("fp16", torch.device("cpu"), "profiles.x.generate.dtype")
    assert sd_model.resolve_dtype("auto", torch.device("cpu"), "k") == torch.float32


@pytest.mark.parametrize("name, cls", [("ddim", "DDIMScheduler"), ("dpm-solver++", "DPMSolverMultistepScheduler"),
                                       ("unipc", "UniPCMultistepScheduler"), ("euler", "EulerDiscreteScheduler"),
                                       ("lcm", "LCMScheduler"), ("model", "PNDMScheduler")])
def test_scheduler_is_selectable(tiny_model, name, cls):
    pipe = sd_model.load_pipeline(str(tiny_model), torch.device("cpu"), torch.float32, scheduler=name)
    assert type(pipe.scheduler).__name__ == cls
    images, flags = sd_model.draw(pipe, ["tench"], [1], guidance=7.5, steps=3, resolution=64)
    assert images[0].size == (64, 64) and flags == [False]


def test_image_does_not_depend_on_the_batch(pipe):
    prompts, seeds_ = ["tench", "goldfish", "great white shark"], [11, 12, 13]
    options = dict(guidance=7.5, steps=3, resolution=64)
    alone = [np.asarray(sd_model.draw(pipe, [p], [s], **options)[0][0], dtype=int) for p, s in zip(prompts, seeds_)]
    batched = [np.asarray(image, dtype=int) for image in sd_model.draw(pipe, prompts, seeds_, **options)[0]]
    for a, b in zip(alone, batched):
        # Same seed and prompt -> the same image. Batched CPU kernels round the last float
        # bit differently (they are not batch-invariant), which moves a rare pixel one grey level.
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    assert np.abs(alone[0] - alone[1]).mean() > 1     # other seed and prompt: another image


def test_work_key_ignores_what_does_not_change_images(tmp_path, tiny_model):
    base = make_params(tmp_path, tiny_model)
    key = generation.make_plan(base, rows(), []).folder
    for generate in ({"batch_size": 7}, {"processes": 4}):
        assert generation.make_plan(make_params(tmp_path, tiny_model, generate=generate), rows(), []).folder == key
    assert generation.make_plan(make_params(tmp_path, tiny_model, scale=3.0), rows(), []).folder == key
    for changed in ({"guidance": 2.0}, {"seed": 1}, {"scheduler": "ddim"}, {"safety_checker": "keep"}):
        assert generation.make_plan(make_params(tmp_path, tiny_model, **changed), rows(), []).folder != key
    assert generation.make_plan(make_params(tmp_path, tiny_model, generate={"jpeg_quality": 80}),
                                rows(), []).folder != key


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_generate_writes_complete_shards_index_metrics_and_grid(tmp_path, tiny_model):
    p = make_params(tmp_path, tiny_model)
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "shard-000099.tar").write_bytes(b"stale")
    metrics = run_generate(p, out)

    paths = shards.list_shards(out)
    assert [x.name for x in paths] == ["shard-000000.tar", "shard-000001.tar"]   # 1 image a class a shard
    samples = [s for path in paths for s in shards.iter_shard(path)]
    assert len(samples) == 6
    for key, jpeg, record in samples:
        assert set(record) == RECORD_FIELDS
        assert key == shards.sample_key(record["label"], record["image_index"])
        assert WNIDS[record["label"]] == record["wnid"] == record["class"]
        assert record["seed"] == seeds.derive(0, "image", record["class"], record["image_index"])
        assert record["steps"] == 3 and record["model"] == str(tiny_model) and record["flagged"] is False
        assert record["attempt"] == 0 and record["scheduler"] == "model" and record["resolution"] == 64
        assert record["weights"] == sd_model.fingerprint(str(tiny_model), "model")
        assert record["pipeline"] == "StableDiffusionPipeline" and record["scheduler_class"] == "PNDMScheduler"
        assert record["scheduler_config"] == families.config_digest(sd_model.scheduler_config(str(tiny_model)))
        assert record["split"] == "train"
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.format == "JPEG" and image.size == (64, 64)
    assert len({s[0] for s in samples}) == 6
    for path in paths:      # classes are mixed within every shard
        assert {r["class"] for _, _, r in shards.iter_shard(path)} == set(WNIDS)

    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == WNIDS and index["counts"] == dict.fromkeys(WNIDS, 2)
    assert index["images"] == 6 and index["bytes"] == sum(x.stat().st_size for x in paths)
    assert [s["file"] for s in index["shards"]] == [x.name for x in paths]
    assert [s["sha256"] for s in index["shards"]] == [shards.sha256(x) for x in paths]
    assert index["flagged"] == 0 and index["guidance"] == 7.5
    card = (out / "README.md").read_text()      # the dataset card
    assert card.startswith("# Synthetic ImageNet clone: 3 classes, 6 images")
    for fact in ("guidance 7.5, 3 steps", "checker did not run", "random-weight model", "LAION-2B",
                 f"`{tiny_model}`, 64 px"):
        assert fact in card, fact
    metrics_file = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics_file == {k: metrics[k] for k in generation.HEADLINE}       # the rest goes to the details
    assert metrics["images"] == metrics["generated"] == 6 and metrics["reused"] == 0
    assert metrics["shards"] == 2 and metrics["classes"] == 3 and metrics["flagged"] == 0
    assert metrics["per_class_min"] == metrics["per_class_max"] == 2
    assert metrics["images_per_second"] > 0 and metrics["gpu_seconds"] > 0
    # The price of an image: counted for this model, sampler, steps, guidance and resolution.
    assert metrics["tflop_per_image"] == round(estimates.count_flops(str(tiny_model), 64, 3, 7.5).per_image / 1e12, 4)
    assert metrics["tflop_per_image"] > 0

    grid = sample_grid(out, rows(), tmp_path / "reports" / "samples.png")
    with Image.open(grid) as image:
        assert image.format == "PNG"
        assert image.height >= 3 * 128 and image.width >= 2 * 128
    assert not list((tmp_path / "reports").glob(".*tmp"))

    # Run again (DVC deleted the output): nothing is drawn, the same bytes come back.
    before = shard_bytes(out)
    shutil.rmtree(out)
    again = run_generate(p, out)
    assert again["generated"] == 0 and again["reused"] == 6 and again["images_per_second"] is None
    assert shard_bytes(out) == before


@pytest.mark.slow
def test_stored_size_resizes_the_jpeg(tmp_path, tiny_model):
    p = make_params(tmp_path, tiny_model, per_class=1, generate={"stored_size": 32, "jpeg_quality": 75})
    run_generate(p, tmp_path / "out")
    for _, jpeg, _ in shards.iter_shard(shards.list_shards(tmp_path / "out")[0]):
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.size == (32, 32)


@pytest.mark.slow
def test_scale_up_keeps_the_images_and_makes_only_new_ones(tmp_path, tiny_model):
    one = make_params(tmp_path, tiny_model, per_class=2)
    run_generate(one, tmp_path / "x1")
    work = generation.make_plan(one, rows(), []).folder
    finished = {p.name: p.stat().st_ino for p in work.glob("shard-*.tar")}

    two = dataclasses.replace(one, scale=2.0)
    metrics = run_generate(two, tmp_path / "x2")
    assert metrics["images"] == 12 and metrics["generated"] == 6 and metrics["reused"] == 6
    # The 1x shards are untouched files; the 2x run added shards 2 and 3.
    assert {p.name: p.stat().st_ino for p in work.glob("shard-*.tar") if p.name in finished} == finished
    assert shard_bytes(tmp_path / "x2")["shard-000000.tar"] == shard_bytes(tmp_path / "x1")["shard-000000.tar"]
    assert len(shards.list_shards(tmp_path / "x2")) == 4


@pytest.mark.slow
def test_overgeneration_for_the_clip_filter_is_a_scale_up_with_the_targets_in_the_index(tmp_path, tiny_model):
    """filter: clip with overgenerate makes ceil(real x scale x it) more a class, as image indices
    beyond real x scale: the images a larger scale makes, so the finished shards are reused; the
    index says how many of each class the filter keeps. Other filters make none."""
    plain = make_params(tmp_path, tiny_model, per_class=2)
    run_generate(plain, tmp_path / "plain")
    over = dataclasses.replace(plain, filter="clip",
                               filtering=dataclasses.replace(plain.filtering, overgenerate=0.5))
    assert planning.counts_for(dataclasses.replace(over, filter="none"), rows()) == dict.fromkeys(WNIDS, 2)
    assert planning.counts_for(over, rows()) == dict.fromkeys(WNIDS, 3)        # 2 + ceil(2 x 0.5)
    metrics = run_generate(over, tmp_path / "over")
    assert metrics["images"] == 9 and metrics["generated"] == 3 and metrics["reused"] == 6
    index = json.loads((tmp_path / "over" / shards.INDEX_FILE).read_text())
    assert index["counts"] == dict.fromkeys(WNIDS, 3) and index["train_targets"] == dict.fromkeys(WNIDS, 2)
    assert index["overgenerate"] == 0.5
    assert "train_targets" not in json.loads((tmp_path / "plain" / shards.INDEX_FILE).read_text())
    assert {k: v for k, v in shard_bytes(tmp_path / "over").items() if k in shard_bytes(tmp_path / "plain")} == \
        shard_bytes(tmp_path / "plain")
    assert "for the CLIP filter to choose among" in (tmp_path / "over" / "README.md").read_text()
    assert planning.overgenerated(30, 0.1) == 3 and planning.overgenerated(4, 0.25) == 1   # no float ceil surprises


@pytest.mark.slow
def test_the_price_of_sd_v1_4_is_counted_from_its_configs_for_each_sampler(tmp_path, monkeypatch):
    """metrics/generate.json's tflop_per_image for the paper's setting (512 px, 50 steps, guided, PNDM:
    84.5 TFLOP in docs/benchmarks.md), from data/sd-v1-4 when the weights are nowhere; a 20-step
    sampler costs its 20 UNet calls."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    raw = embedded_raw()
    p = params_module.parse({**raw, "profile": "paper", "guidance": 7.5, "steps": 50, "scheduler": "model"})
    assert generation.price(p) == pytest.approx(84.5, abs=2)
    fewer = dataclasses.replace(p, scheduler="unipc", steps=20)
    flops = estimates.count_model_flops(fewer)
    assert flops.unet_calls == 20 and generation.price(fewer) == round(flops.per_image / 1e12, 4) < 40


@pytest.mark.slow
def test_a_shard_is_drawn_again_byte_for_byte_from_its_records(tmp_path, tiny_model, capsys):
    """python -m imagenet_sd.generate.regenerate: the records (and index.json) alone give the same
    JPEG bytes and the same shard, at the batch size the run used (docs/generating.md)."""
    from imagenet_sd.generate import regenerate
    p = make_params(tmp_path, tiny_model, per_class=2)
    run_generate(p, tmp_path / "synthetic")
    shard = tmp_path / "synthetic" / "shard-000000.tar"
    summary = regenerate.regenerate(shard, p, batch_size=p.generate.batch_size, out=tmp_path / "again")
    assert summary["images"] == summary["identical"] == 3 and summary["same_sha256"] is True
    assert (tmp_path / "again" / shard.name).read_bytes() == shard.read_bytes()
    one = regenerate.regenerate(shard, p, batch_size=1, key=shards.sample_key(1, 0))
    assert one["images"] == 1 and one["largest_pixel_difference"] <= 1     # other batches: float rounding at most
    assert regenerate.main([str(tmp_path / "nothing.tar")]) == 2
    assert "no such shard" in capsys.readouterr().err
    with pytest.raises(UserError, match="no image '9_9' in it; keys are"):
        regenerate.regenerate(shard, p, batch_size=1, key="9_9")
    # A shard as index.json lists it whose image is not what its record draws: the real comparison says so.
    key, jpeg, _ = next(iter(shards.iter_shard(shard)))
    other = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).rotate(90).save(other, "JPEG", quality=p.generate.jpeg_quality)
    republish(shard, [(k, other.getvalue() if k == key else j, r) for k, j, r in shards.iter_shard(shard)])
    capsys.readouterr()
    assert regenerate.main([str(shard), "--params", str(ROOT / "params.yaml"), "--batch-size", "2"]) == 1
    assert capsys.readouterr().out.startswith(f"2 of 3 images identical to {shard}: drawn differently: 1 differ, by up to ")


def republish(shard: Path, samples: list[tuple[str, bytes, dict]]) -> None:
    """Write `shard` with `samples`, and list its new size and sha256 in index.json, as if published so."""
    size, sha = shards.write_shard(shard, samples)
    index_path = shard.parent / shards.INDEX_FILE
    index = json.loads(index_path.read_text())
    entry = next(e for e in index["shards"] if e["file"] == shard.name)
    entry.update(bytes=size, sha256=sha, images=len(samples))
    index_path.write_text(json.dumps(index))


def test_regenerate_refuses_a_damaged_or_edited_shard_in_one_line(tmp_path, capsys):
    """A cut copy, a record whose seed or prompt was edited: one line and exit 3 before any model loads, from
    the shard and index.json alone (only that shard is hashed), not "images differ" (exit 1) or a traceback."""
    from imagenet_sd.generate import regenerate
    run_generate(make_params(tmp_path, "rehearsal", per_class=2), tmp_path / "synthetic")   # stand-in pixels
    capsys.readouterr()
    shard = tmp_path / "synthetic" / "shard-000000.tar"
    published = shard.read_bytes()
    samples = list(shards.iter_shard(shard))
    key, _, record = samples[1]
    first_image = published.index(samples[0][1])              # where the first JPEG's bytes start in the tar
    with tarfile.open(shard) as tar:                          # where the first sample (JPEG and JSON) ends
        member = tar.getmembers()[1]
        first_sample = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE

    def verdict(data: bytes | None = None, edit=None) -> tuple[int, str]:
        if edit is not None:
            shards.write_shard(shard, [(k, j, edit(k, r)) for k, j, r in samples])
        else:
            shard.write_bytes(data)
        code = regenerate.main([str(shard), "--params", str(ROOT / "params.yaml")])
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and "\n" not in err, err
        return code, err

    index = shard.parent / shards.INDEX_FILE
    code, err = verdict(published[:5000])
    assert code == 3 and err.startswith(f"error: {shard} is damaged: ")
    assert verdict(published[:first_sample]) == (3, f"error: {shard} is damaged: {index} lists 3 images, it holds 1 "
                                                    f"({first_sample:,} bytes of the {len(published):,} it lists; a "
                                                    f"cut copy?); {regenerate.REFETCH}")
    code, err = verdict(published[:first_image + 100])          # cut inside an image
    assert code == 3 and err.startswith(f"error: {shard} is damaged: not a readable tar (unexpected end of data; ")
    code, err = verdict(edit=lambda k, r: r | {"seed": r["seed"] + 1} if k == key else r)
    assert code == 3 and err == (f"error: {shard} was edited: image {key}'s record says seed {record['seed'] + 1}, "
                                 f"but index.json's seed 0 gives image {record['image_index']} of class "
                                 f"{record['class']} (attempt 0) seed {record['seed']}, so it no longer says how the "
                                 f"image was drawn; {regenerate.REFETCH}")
    code, err = verdict(edit=lambda k, r: r | {"prompt": r["prompt"][::-1]} if k == key else r)   # same length
    assert code == 3 and err.startswith(f"error: {shard} was edited: it reads whole (3 images, as listed), but its "
                                        f"sha256 is not the one {index} lists (")
    with pytest.raises(regenerate.NotAsPublished):
        regenerate.regenerate(shard, make_params(tmp_path, "rehearsal"), batch_size=1)


@pytest.mark.slow
def test_uneven_classes_rebuild_partial_shards_from_their_images(tmp_path, tiny_model):
    (tmp_path / "train").mkdir()
    train_folder(tmp_path / "train" / "t", {WNIDS[0]: 1, WNIDS[1]: 2, WNIDS[2]: 2})
    p = make_params(tmp_path, tiny_model)
    p = dataclasses.replace(p, data=dataclasses.replace(p.data, train=tmp_path / "train" / "t"))
    run_generate(p, tmp_path / "x1")        # shard 1 lacks class 0's image 1
    old = {k: (j, r) for path in shards.list_shards(tmp_path / "x1") for k, j, r in shards.iter_shard(path)}
    metrics = run_generate(dataclasses.replace(p, scale=2.0), tmp_path / "x2")
    assert metrics["generated"] == 10 - 5 and metrics["reused"] == 5
    new = {k: (j, r) for path in shards.list_shards(tmp_path / "x2") for k, j, r in shards.iter_shard(path)}
    assert all(new[k] == v for k, v in old.items())       # the 1x images, byte for byte


@pytest.mark.slow
def test_corrupt_or_unfinished_shards_are_made_again(tmp_path, tiny_model):
    p = make_params(tmp_path, tiny_model)
    run_generate(p, tmp_path / "clean")
    clean = shard_bytes(tmp_path / "clean")
    work = generation.make_plan(p, rows(), []).folder
    first, second = sorted(work.glob("shard-*.tar"))
    first.write_bytes(first.read_bytes()[:1000])                  # truncated
    shards.manifest_path(second).unlink()                         # killed before its manifest
    (work / f".{first.stem}.999999999.tmp").write_bytes(b"x")     # left by a dead process
    metrics = run_generate(p, tmp_path / "again")
    assert metrics["generated"] == 6
    assert shard_bytes(tmp_path / "again") == clean
    assert not list(work.glob(".*.tmp"))


def with_threshold(monkeypatch, threshold):
    """Load pipelines whose safety checker flags images scoring above `threshold` (tiny: 1 = never)."""
    load = sd_model.load_pipeline

    def patched(*args, **kwargs):
        pipe = load(*args, **kwargs)
        if pipe.safety_checker is not None:
            pipe.safety_checker.concept_embeds_weights.data[:] = threshold
        return pipe
    monkeypatch.setattr(sd_model, "load_pipeline", patched)


@pytest.mark.slow
def test_safety_keep_counts_flagged_black_images(tmp_path, tiny_model, monkeypatch):
    with_threshold(monkeypatch, -1.0)          # every image scores above -1: all flagged
    metrics = run_generate(make_params(tmp_path, tiny_model, per_class=1, safety_checker="keep"), tmp_path / "out")
    assert metrics["flagged"] == 3 and metrics["safety_regenerated"] == 0
    for _, jpeg, record in shards.iter_shard(shards.list_shards(tmp_path / "out")[0]):
        assert record["flagged"] is True and record["attempt"] == 0
        with Image.open(io.BytesIO(jpeg)) as image:
            assert max(hi for _, hi in image.getextrema()) <= 8      # black, up to JPEG noise


def safety_scores(pipe, images) -> list[float]:
    """The tiny checker's score of each image: cosine to its (all-ones) concept embedding."""
    checker = pipe.safety_checker
    pixels = pipe.feature_extractor(images, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        return torch.nn.functional.cosine_similarity(embeds, checker.concept_embeds[:1]).tolist()


@pytest.mark.slow
def test_safety_regenerate_draws_flagged_images_again_with_new_seeds(tmp_path, tiny_model, monkeypatch):
    p = make_params(tmp_path, tiny_model, per_class=1, safety_checker="regenerate")
    plan = generation.make_plan(p, rows(), [])
    items = plan.shards[0].items
    pipe = sd_model.load_pipeline(str(tiny_model), torch.device("cpu"), torch.float32, safety_checker=True)
    images, _ = sd_model.draw(pipe, [it.prompt for it in items], [it.seed(0) for it in items],
                              guidance=7.5, steps=3, resolution=64)
    scores = safety_scores(pipe, images)
    worst = int(np.argmax(scores))
    # Flag the highest-scoring first attempt only (scores are rounded to 3 decimals by the checker).
    with_threshold(monkeypatch, sorted(scores)[-1] - 0.0015)
    metrics = run_generate(p, tmp_path / "out")
    records = {r["class"]: r for _, _, r in shards.iter_shard(shards.list_shards(tmp_path / "out")[0])}
    redrawn = records[items[worst].cls.key]
    assert redrawn["attempt"] >= 1 and redrawn["seed"] == items[worst].seed(0, redrawn["attempt"])
    assert sum(r["attempt"] > 0 for r in records.values()) == metrics["safety_regenerated"] >= 1
    assert metrics["flagged"] == sum(r["flagged"] for r in records.values())


@pytest.mark.slow
def test_safety_regenerate_gives_up_after_max_attempts(tmp_path, tiny_model, monkeypatch):
    with_threshold(monkeypatch, -1.0)
    metrics = run_generate(make_params(tmp_path, tiny_model, per_class=1, safety_checker="regenerate"),
                           tmp_path / "out")
    assert metrics["flagged"] == 3 and metrics["safety_regenerated"] == 3
    for _, _, record in shards.iter_shard(shards.list_shards(tmp_path / "out")[0]):
        assert record["attempt"] == worker.MAX_ATTEMPTS - 1 and record["flagged"] is True


def test_other_weights_at_the_same_path_get_another_work_folder(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = generation.make_plan(make_params(tmp_path, model), rows(), []).folder
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1                      # "retrained": same name, same size, other bytes
    weights.write_bytes(bytes(data))
    assert generation.make_plan(make_params(tmp_path, model), rows(), []).folder != before
