"""Real-image guidance (He et al., ICLR 2023): images start from their class's real shots (img2img).

On the embedded tiny model (random weights) these tests check the mechanics: which real image
each synthetic image starts from, determinism, resume, the work-folder key, the errors.
"""
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import embedded_raw, generation_params, run_script
from imagenet_sd.core import params as params_module
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import fewshot, fixtures, shards
from imagenet_sd.datasets import plan as planning
from imagenet_sd.generate import estimates, generation
from imagenet_sd.models import rehearsal, sd_model
from imagenet_sd.prompts import backgrounds, prompts
from imagenet_sd.prompts.prompts import ClassPrompt
from test_matched_backgrounds import RECIPE_KEYS

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
KEY = "profiles.embedded.data.train"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model's calls are too small to gain from two threads, and on a busy 2-core
    # machine two make each call many times slower. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rows() -> list[ClassPrompt]:
    return [ClassPrompt(wnid=w, index=i, c=n, h_c="fish", d_c="", prompt=f"{n}, fish")
            for i, (w, n) in enumerate(NAMES.items())]


def fixture_train(root: Path, per_class: int = 3) -> Path:
    """Real-looking train folder: the fixture's deterministic 80 px JPEGs, per_class a class."""
    if not root.exists():
        for wnid in NAMES:
            fixtures._write_folder(root, wnid, wnid, per_class)
    return root


def shot_table(folder: Path, train: Path, k: int = 2, seed: int = 0) -> Path:
    path = folder / "shots.tsv"
    fewshot.write(path, fewshot.draw(rows(), train, k, seed, KEY))
    return path


def make_params(tmp_path: Path, model, shots: int = 2, strength: float = 0.5, generate: dict | None = None,
                **top) -> params_module.Params:
    """3 classes x 3 real images, 1 image a class a shard, 4 steps (2 of them with strength 0.5), on CPU."""
    values = dict(steps=4, guidance=7.5, scale=1.0, seed=0, shots=shots, init_strength=strength)
    return generation_params(tmp_path, model, fixture_train(tmp_path / "train"), generate, **{**values, **top})


def plan_for(p, folder: Path):
    shots = fewshot.load(shot_table(folder, p.data.train, p.shots), list(NAMES), p.shots) if p.init_strength else None
    return generation.make_plan(p, rows(), [], shots=shots)


def run(p, out: Path) -> dict:
    return generation.generate(p, plan_for(p, out.parent), out, out.parent / "metrics.json")


def samples(out: Path) -> list[tuple[str, bytes, dict]]:
    return [s for path in shards.list_shards(out) for s in shards.iter_shard(path)]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in shards.list_shards(out)}


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=int)


# --------------------------------------------------------------------------- which real image

def test_image_i_starts_from_shot_i_mod_k_and_nothing_else_moves():
    shots = {w: tuple(f"{w}/{j}.JPEG" for j in range(3)) for w in NAMES}
    counts = dict.fromkeys(NAMES, 8)
    plain = planning.Layout(rows(), counts, [], per_class=3, seed=2)
    guided = planning.Layout(rows(), counts, [], per_class=3, seed=2, shots=shots)
    for a, b in zip(plain, guided):
        assert a.keys == b.keys and a.file_name == b.file_name           # same images, order and shard names
        assert [it.prompt for it in a.items] == [it.prompt for it in b.items]
        assert all(it.init is None for it in a.items)
        assert all(it.init == shots[it.cls.key][it.image_index % 3] for it in b.items)
    used = [it.init for s in guided for it in s.items if it.cls.key == "n01440764"]
    assert sorted(used.count(path) for path in shots["n01440764"]) == [2, 3, 3]     # 8 images over 3 shots


# --------------------------------------------------------------------------- the work folder's key

def recipe(p, shots=None):
    return generation.recipe(p, rows(), [], torch.device("cpu"), torch.float32, 1, {"weights": "weights"}, shots=shots)


def test_without_real_guidance_the_recipe_is_as_before_even_with_shots(tmp_path):
    zero = make_params(tmp_path, "m", shots=0, strength=0)
    assert set(recipe(zero)) == RECIPE_KEYS
    assert recipe(make_params(tmp_path, "m", shots=4, strength=0)) == recipe(zero)      # shots alone: same key


def test_real_guidance_adds_one_key_with_the_strength_the_table_and_its_code(tmp_path):
    p = make_params(tmp_path, "m")
    table = fewshot.load(shot_table(tmp_path, p.data.train), list(NAMES), 2)
    guided = recipe(p, table)
    plain = recipe(dataclasses.replace(p, shots=0, init_strength=0))
    assert set(guided) == RECIPE_KEYS | {"real_guidance"}
    assert {k: v for k, v in guided.items() if k != "real_guidance"} == plain
    assert guided["real_guidance"] == {"shots": 2, "init_strength": 0.5, "shot_table": table.digest,
                                       "code": generation.code_identity(real_guidance=True)}
    keys = {generation.work_key(r) for r in (plain, guided, recipe(dataclasses.replace(p, init_strength=0.75), table),
                                             recipe(p, dataclasses.replace(table, digest="other")))}
    assert len(keys) == 4


def test_real_guidance_code_is_hashed_only_into_real_guided_keys(monkeypatch):
    plain, guided = generation.code_identity(), generation.code_identity(real_guidance=True)
    monkeypatch.setattr(sd_model, "draw_from", rehearsal.draw_from)        # "another" img2img call
    assert generation.code_identity() == plain
    assert generation.code_identity(real_guidance=True) != guided


def test_plan_needs_the_table_exactly_with_real_guidance_and_a_train_folder(tmp_path, tiny_model):
    p = make_params(tmp_path, tiny_model)
    with pytest.raises(ValueError):
        generation.make_plan(p, rows(), [])
    with pytest.raises(ValueError):
        generation.make_plan(dataclasses.replace(p, init_strength=0), rows(), [],
                             shots=fewshot.load(shot_table(tmp_path, p.data.train), list(NAMES), 2))
    table = fewshot.load(shot_table(tmp_path, p.data.train), list(NAMES), 2)
    with pytest.raises(UserError, match=f"but {KEY}, where they are, is ''") as info:
        generation.make_plan(dataclasses.replace(p, data=dataclasses.replace(p.data, train=None)), rows(), [],
                             shots=table)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- the starting images

def test_init_image_resizes_the_shorter_side_and_centre_crops(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    image.save(tmp_path / "wide.png")
    start = fewshot.init_image(tmp_path / "wide.png", 64)
    assert start.size == (64, 64) and start.mode == "RGB"
    expected = image.resize((96, 64), Image.Resampling.BICUBIC).crop((16, 0, 80, 64))
    assert (pixels(start) == pixels(expected)).all()
    Image.new("L", (40, 70), 128).save(tmp_path / "grey.jpg")          # small, tall, greyscale: upscaled
    assert fewshot.init_image(tmp_path / "grey.jpg", 64).size == (64, 64)
    (tmp_path / "broken.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="broken.JPEG: cannot read this real image") as info:
        fewshot.init_image(tmp_path / "broken.JPEG", 64)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return sd_model.load_pipeline(str(tiny_model), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def starts(tmp_path_factory) -> list[Image.Image]:
    train = fixture_train(tmp_path_factory.mktemp("real") / "train")
    return [fewshot.init_image(p, 64) for p in sorted(train.glob("*/*.JPEG"))[:3]]


@pytest.mark.slow
def test_img2img_shares_the_loaded_modules(pipe):
    guided = sd_model.img2img(pipe)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(guided, name) is getattr(pipe, name)


@pytest.mark.slow
def test_draw_from_is_deterministic_batch_independent_and_follows_its_start(pipe, starts):
    guided = sd_model.img2img(pipe)
    prompts_, seeds_ = ["tench", "goldfish", "great white shark"], [11, 12, 13]
    options = dict(strength=0.5, guidance=7.5, steps=4, resolution=64)
    batch, flags = sd_model.draw_from(guided, prompts_, seeds_, starts, **options)
    again, _ = sd_model.draw_from(guided, prompts_, seeds_, starts, **options)
    assert flags == [False] * 3 and all(im.size == (64, 64) for im in batch)
    assert all((pixels(a) == pixels(b)).all() for a, b in zip(batch, again))
    alone = [sd_model.draw_from(guided, [p], [s], [st], **options)[0][0] for p, s, st in zip(prompts_, seeds_, starts)]
    for a, b in zip(alone, batch):     # CPU kernels are not batch-invariant: a rare pixel moves one grey level
        diff = np.abs(pixels(a) - pixels(b))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # Another start, same seed and prompt: another image; a lower strength stays nearer its start.
    swapped = sd_model.draw_from(guided, prompts_[:1], seeds_[:1], starts[1:2], **options)[0][0]
    assert np.abs(pixels(swapped) - pixels(batch[0])).mean() > 1
    text_only = sd_model.draw(pipe, prompts_[:1], seeds_[:1], guidance=7.5, steps=4, resolution=64)[0][0]
    assert np.abs(pixels(text_only) - pixels(batch[0])).mean() > 1
    near = sd_model.draw_from(guided, prompts_[:1], seeds_[:1], starts[:1], strength=0.25, guidance=7.5, steps=4, resolution=64)[0][0]
    assert np.abs(pixels(near) - pixels(starts[0])).mean() < np.abs(pixels(batch[0]) - pixels(starts[0])).mean()


def test_rehearsal_blends_its_grid_into_the_start_by_strength(starts):
    seeds_ = [1, 2, 3]
    grids = rehearsal.draw(seeds_, 64)
    assert all((pixels(a) == pixels(b)).all() for a, b in zip(rehearsal.draw_from(seeds_, starts, 1.0, 64), grids))
    assert all((pixels(a) == pixels(b)).all() for a, b in zip(rehearsal.draw_from(seeds_, starts, 0.0, 64), starts))
    half = rehearsal.draw_from(seeds_, starts, 0.5, 64)[0]
    assert np.abs(pixels(half) - (pixels(starts[0]) + pixels(grids[0])) / 2).max() <= 1


# --------------------------------------------------------------------------- generation

@pytest.mark.slow
def test_generation_records_the_start_and_is_the_same_bytes_twice(tmp_path, tiny_model):
    p = make_params(tmp_path, tiny_model)
    metrics = run(p, tmp_path / "a" / "out")
    assert metrics["images"] == metrics["generated"] == 9
    table = fewshot.read(tmp_path / "a" / "shots.tsv")
    found = samples(tmp_path / "a" / "out")
    for _, jpeg, record in found:
        shot = record["image_index"] % 2
        assert record["init_image"] == str(table[record["class"]][shot])
        assert record["init_shot"] == shot and record["init_strength"] == 0.5
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.size == (64, 64)
    index = json.loads((tmp_path / "a" / "out" / "index.json").read_text())
    assert index["shots"] == 2 and index["init_strength"] == 0.5
    assert "Real guidance (He et al., ICLR 2023)" in (tmp_path / "a" / "out" / "README.md").read_text()
    # A second work folder: drawn again from nothing, byte for byte the same.
    other = dataclasses.replace(p, generate=dataclasses.replace(p.generate, work_dir=tmp_path / "work2"))
    assert run(other, tmp_path / "b" / "out")["generated"] == 9
    assert shard_bytes(tmp_path / "b" / "out") == shard_bytes(tmp_path / "a" / "out")
    plain = dataclasses.replace(p, shots=0, init_strength=0)
    assert plan_for(plain, tmp_path / "c").folder != plan_for(p, tmp_path / "c").folder


def test_rehearsal_runs_real_guidance_through_the_same_path(tmp_path):
    p = make_params(tmp_path, rehearsal.NAME, generate={"resolution": 32})
    run(p, tmp_path / "g" / "out")
    plain = dataclasses.replace(p, shots=0, init_strength=0)
    run(plain, tmp_path / "t" / "out")
    guided, text = samples(tmp_path / "g" / "out"), samples(tmp_path / "t" / "out")
    assert [k for k, _, _ in guided] == [k for k, _, _ in text]
    assert all("init_image" in r for _, _, r in guided) and not any("init_image" in r for _, _, r in text)
    assert all(a != b for (_, a, _), (_, b, _) in zip(guided, text))


@pytest.mark.slow
def test_estimate_counts_the_shorter_schedule_and_the_encoder(tiny_model):
    full = estimates.count_flops(str(tiny_model), 64, 50, 7.5)
    half = estimates.count_flops(str(tiny_model), 64, 50, 7.5, strength=0.5)
    assert full.vae_encode == 0 and half.vae_encode > 0
    assert half.unet_calls == full.unet_calls - 25 and half.unet_call == full.unet_call


# --------------------------------------------------------------------------- the stage

def environment() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def setup_run(folder: Path, tiny: Path, **top) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    train = fixture_train(folder / "train")
    prompts.write(folder / "prompts.tsv", rows())
    backgrounds.write(folder / "bg.tsv", backgrounds.build())
    raw = embedded_raw()
    raw.update({"profile": "embedded", "steps": 2, "seed": 0, "shots": 2, "init_strength": 0.5, **top})
    raw["profiles"]["embedded"]["generate"].update(model=str(tiny), resolution=64, batch_size=2, processes=1,
                                                   images_per_shard=3, device="cpu", work_dir=str(folder / "work"))
    raw["profiles"]["embedded"]["data"]["train"] = str(train)
    raw["profiles"]["embedded"]["train"]["holdout_per_class"] = 0
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    if raw["shots"]:
        shot_table(folder, train, raw["shots"])


def command(folder: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "stages" / "sd_generate.py"), "--params", str(folder / "params.yaml"),
            "--prompts", str(folder / "prompts.tsv"), "--backgrounds", str(folder / "bg.tsv"),
            "--shots", str(folder / "shots.tsv"), "--out", str(folder / "out"),
            "--metrics", str(folder / "metrics.json"), "--details", str(folder / "details.json"),
            "--grid", str(folder / "grid.png"), *extra]


def stage(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_script(command(folder, *extra), cwd=folder, env=environment())


@pytest.mark.slow
def test_an_interrupted_real_guided_run_resumes_to_the_same_bytes(tmp_path, tiny_model):
    """Each image's real start is its own (class, index, seed), not the run's order: a run that stopped
    after some shards draws the rest to the bytes of an uninterrupted run. (What a SIGKILL leaves,
    and that a killed run resumes from it, is test_generate_stage's killed-run test.)"""
    setup_run(tmp_path / "clean", tiny_model)
    result = stage(tmp_path / "clean")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "stopped"
    setup_run(folder, tiny_model)
    assert stage(folder).returncode == 0
    finished = sorted((folder / "work").glob("*/shard-*.tar"))
    for shard in finished[1:]:           # only the first shard was finished when the run stopped
        shards.manifest_path(shard).unlink()
        shard.unlink()
    kept_shard = {finished[0].name: finished[0].stat().st_mtime_ns}
    result = stage(folder)
    assert result.returncode == 0, result.stderr
    assert shard_bytes(folder / "out") == shard_bytes(tmp_path / "clean" / "out")
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "work").glob("*/shard-*.tar") if p.name in kept_shard} \
        == kept_shard
    metrics = json.loads((folder / "details.json").read_text())
    assert metrics["reused"] >= 3 and metrics["generated"] + metrics["reused"] == 9


def test_dry_run_names_real_guidance(tmp_path, tiny_model):
    setup_run(tmp_path, tiny_model)
    result = stage(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "real guidance: every image starts from one of its class's 2 real images, noised to strength 0.5" \
        in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("top, table, expected", [
    ({}, None, "shots.tsv: K-shot table not found; run: dvc repro few-shot"),
    ({"shots": 3}, 2, "has 2 shots of class n01440764, but shots = 3; run: dvc repro few-shot"),
    ({"shots": 0}, None, "init_strength = 0.5 is not valid; allowed: 0 while shots = 0"),
])
def test_bad_real_guidance_input_is_one_line_and_makes_nothing(tmp_path, tiny_model, top, table, expected):
    setup_run(tmp_path, tiny_model, **top)
    (tmp_path / "shots.tsv").unlink(missing_ok=True)
    if table:
        shot_table(tmp_path, tmp_path / "train", table)
    result = stage(tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error:") and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not list((tmp_path / "work").glob("*/shard-*"))
