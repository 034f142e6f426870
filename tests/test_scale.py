"""What must hold at 1.28M-64M images, checked on the rehearsal generator (fast, same code path):
sample keys of any class name, the work folder's key, trusted manifests and --verify, cached real
counts, two writers on one work folder, a full disk, publish errors, planning without a GPU."""
import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import embedded_raw
from imagenet_sd.core import params as params_module
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import plan as planning
from imagenet_sd.datasets import shards
from imagenet_sd.generate import generation, publish
from imagenet_sd.models import rehearsal
from imagenet_sd.prompts.prompts import ClassPrompt

ROOT = Path(__file__).resolve().parents[1]


def free_form(names: list[str]) -> list[ClassPrompt]:
    return [ClassPrompt(wnid="", index=i, c=name, h_c="", d_c="", prompt=name) for i, name in enumerate(names)]


def rehearsal_params(tmp_path: Path, images_per_shard: int = 100, **top) -> params_module.Params:
    raw = embedded_raw()
    raw["profile"] = "rehearsal"
    p = params_module.parse(raw)
    g = dataclasses.replace(p.generate, processes=1, images_per_shard=images_per_shard, batch_size=50,
                            work_dir=tmp_path / "work")
    values = dict(scale=1.0, seed=0)
    values.update(top)
    return dataclasses.replace(p, generate=g, train=dataclasses.replace(p.train, holdout_per_class=0), **values)


def contents(out: Path) -> dict[str, tuple[bytes, dict]]:
    return {key: (jpeg, rec) for path in shards.list_shards(out) for key, jpeg, rec in shards.iter_shard(path)}


def run(p, rows, out: Path, **kwargs) -> dict:
    plan = generation.make_plan(p, rows, [])
    return generation.generate(p, plan, out, out.parent / f"{out.name}-metrics.json", **kwargs)


# --------------------------------------------------------------------------- keys and names

def test_class_names_that_sanitise_alike_or_are_long_keep_their_own_images(tmp_path, capsys):
    names = ["hot dog", "hot-dog", "猫", "狗", "a" * 150 + " very long free-form class name"]
    p = rehearsal_params(tmp_path, images_per_shard=50)
    p = dataclasses.replace(p, data=dataclasses.replace(p.data, train=None))   # 1300 a class ...
    p = dataclasses.replace(p, scale=0.1)                                      # ... x 0.1 = 130
    metrics = run(p, free_form(names), tmp_path / "out")
    stored = contents(tmp_path / "out")
    assert metrics["images"] == len(stored) == 5 * 130
    by_label = {}
    for key, (_, rec) in stored.items():
        assert shards.parse_key(key) == (rec["label"], rec["image_index"]) and len(key) < 20
        by_label.setdefault(rec["label"], set()).add((rec["class"], rec["image_index"]))
    assert {label: len(v) for label, v in by_label.items()} == dict.fromkeys(range(5), 130)
    assert {label: {c for c, _ in v} for label, v in by_label.items()} == {i: {n} for i, n in enumerate(names)}
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["classes"] == names and set(index["counts"].values()) == {130}


# --------------------------------------------------------------------------- the work folder's key

def test_work_key_covers_library_versions_and_the_code_that_draws(tmp_path, monkeypatch):
    p, rows = rehearsal_params(tmp_path), free_form(["a", "b"])
    key = generation.make_plan(p, rows, []).folder
    versions = generation.library_versions()
    monkeypatch.setattr(generation, "library_versions", lambda params=None: {**versions, "pillow": "0.0.1"})
    assert generation.make_plan(p, rows, []).folder != key
    monkeypatch.undo()
    monkeypatch.setattr(generation, "code_identity", lambda: "edited encode")
    assert generation.make_plan(p, rows, []).folder != key
    assert set(versions) == {"torch", "diffusers", "transformers", "pillow", "numpy"}
    assert all(v != "absent" for v in versions.values())


# --------------------------------------------------------------------------- resume and verify

def test_finished_shards_are_trusted_by_size_and_mtime_and_verify_rehashes(tmp_path):
    p, rows = rehearsal_params(tmp_path), free_form(["a", "b", "c"])
    p = dataclasses.replace(p, data=dataclasses.replace(p.data, train=None), scale=0.1)
    run(p, rows, tmp_path / "clean")
    clean = contents(tmp_path / "clean")
    work = generation.make_plan(p, rows, []).folder
    victim = sorted(work.glob("shard-*.tar"))[1]
    stat = victim.stat()
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF                                   # bit rot: same size, mtime put back
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run(p, rows, tmp_path / "trusted")["generated"] == 0     # no shard is re-read by default
    metrics = run(p, rows, tmp_path / "verified", verify=True)
    assert metrics["generated"] == len(list(shards.iter_shard(victim)))
    assert contents(tmp_path / "verified") == clean
    # A shard rewritten since its manifest (new mtime) is redone without --verify.
    other = sorted(work.glob("shard-*.tar"))[0]
    other.write_bytes(other.read_bytes())
    assert run(p, rows, tmp_path / "again")["generated"] > 0
    assert contents(tmp_path / "again") == clean


def test_real_counts_are_listed_once_and_relisted_when_the_folder_changes(tmp_path, monkeypatch):
    root = tmp_path / "train"
    for wnid, n in (("n01440764", 3), ("n01443537", 5)):
        (root / wnid).mkdir(parents=True)
        for i in range(n):
            (root / wnid / f"{i}.JPEG").write_bytes(b"")
    rows = [ClassPrompt(wnid=w, index=i, c=w, h_c="", d_c="", prompt=w) for i, w in enumerate(sorted(os.listdir(root)))]
    assert planning.real_counts(rows, root, "x", tmp_path / "cache") == {"n01440764": 3, "n01443537": 5}
    listed = []
    count = planning._count_files
    monkeypatch.setattr(planning, "_count_files", lambda folder: listed.append(folder) or count(folder))
    assert planning.real_counts(rows, root, "x", tmp_path / "cache") == {"n01440764": 3, "n01443537": 5}
    assert listed == []                                           # from the cache
    (root / "n01443537" / "new.JPEG").write_bytes(b"")
    assert planning.real_counts(rows, root, "x", tmp_path / "cache")["n01443537"] == 6
    assert len(listed) == 2


# --------------------------------------------------------------------------- several writers

RACE = """
import dataclasses, sys, yaml
from pathlib import Path
from imagenet_sd.core import params as params_module
from imagenet_sd.generate import generation
from imagenet_sd.prompts.prompts import ClassPrompt
raw = yaml.safe_load(Path(sys.argv[1]).read_text())
raw["profile"] = "rehearsal"
p = params_module.parse(raw)
work, out = Path(sys.argv[2]), Path(sys.argv[3])
p = dataclasses.replace(p, scale=0.2, generate=dataclasses.replace(p.generate, processes=1, images_per_shard=20,
                        batch_size=5, work_dir=work))
rows = [ClassPrompt(wnid="", index=i, c=f"class {i}", h_c="", d_c="", prompt=f"class {i}") for i in range(4)]
plan = generation.make_plan(p, rows, [])
generation.generate(p, plan, out, out.parent / (out.name + ".json"))
"""


@pytest.mark.slow
def test_two_runs_on_one_work_folder_never_write_the_same_shard(tmp_path):
    """Two processes (two queued experiments, two nodes) race over 52 shards of one work key."""
    script = tmp_path / "race.py"
    script.write_text(RACE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen([sys.executable, str(script), str(ROOT / "params.yaml"), str(tmp_path / "work"),
                              str(tmp_path / f"out{i}")], env=env, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    for r in runs:
        assert r.wait(timeout=300) == 0, r.stderr.read()
    metrics = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    # 4 classes x 1300 x 0.2 = 1040 images: each made exactly once between the two runs.
    assert metrics[0]["images"] == metrics[1]["images"] == 1040
    assert metrics[0]["generated"] + metrics[1]["generated"] == 1040
    assert contents(tmp_path / "out0") == contents(tmp_path / "out1")
    index = json.loads((tmp_path / "out0" / "index.json").read_text())
    for entry in index["shards"]:
        assert shards.sha256(tmp_path / "out1" / entry["file"]) == entry["sha256"]
    assert not list((tmp_path / "work").glob("*/.*.tmp"))


# --------------------------------------------------------------------------- errors

def test_a_full_disk_is_one_error_keeps_finished_shards_and_the_rerun_finishes(tmp_path, monkeypatch):
    p, rows = rehearsal_params(tmp_path), free_form(["a", "b", "c"])
    p = dataclasses.replace(p, data=dataclasses.replace(p.data, train=None), scale=0.1)
    run(p, rows, tmp_path / "clean")
    clean = contents(tmp_path / "clean")
    p = dataclasses.replace(p, generate=dataclasses.replace(p.generate, work_dir=tmp_path / "full"))
    fsync, synced = os.fsync, []

    def fills_up(fd):
        # The third shard's bytes do not fit. (Patched here, not write_shard: the functions that
        # write a shard are part of the work folder's key.)
        if len(synced) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        synced.append(fd)
        return fsync(fd)
    monkeypatch.setattr(shards.os, "fsync", fills_up)
    with pytest.raises(UserError, match=r"generate.work_dir: no space left in .*; 2 shards still to make need "
                                        r"about .*B; free that much and run the same command again"):
        run(p, rows, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    work = generation.make_plan(p, rows, []).folder
    assert len(shards.finished_in(work)) == 2
    monkeypatch.setattr(shards.os, "fsync", fsync)
    metrics = run(p, rows, tmp_path / "out")
    assert metrics["generated"] == 3 * 130 - 2 * 3 * 33 and contents(tmp_path / "out") == clean   # b = 33
    assert not list(work.glob(".*.tmp"))


def test_publish_without_a_finished_shard_is_a_clear_error(tmp_path):
    p, rows = rehearsal_params(tmp_path), free_form(["a", "b"])
    plan = generation.make_plan(p, rows, [])
    plan.folder.mkdir(parents=True)
    with pytest.raises(UserError, match=r"shard-000000\.full\.tar: not finished .* run the same command again"):
        publish.publish(plan, p, tmp_path / "out")


def test_the_rehearsal_generator_is_deterministic_per_seed():
    a, b = rehearsal.draw([1, 2], 32), rehearsal.draw([1, 3], 32)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() != b[1].tobytes()
    assert a[0].size == (32, 32) and a[0].mode == "RGB"


# --------------------------------------------------------------------------- planning on a login node

@pytest.mark.slow
def test_dry_run_of_the_paper_profile_needs_no_gpu_and_no_weights(tmp_path):
    """SD v1.4's FLOPs come from the configs in data/sd-v1-4 when the weights are nowhere."""
    raw = embedded_raw()
    raw.update(profile="paper", classes="imagenet1k", prompt="c_dc")
    raw["profiles"]["paper"]["data"]["train"] = ""
    raw["profiles"]["paper"]["generate"]["work_dir"] = str(tmp_path / "work")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    rows = [ClassPrompt(wnid=f"n{i:08d}", index=i, c=f"c{i}", h_c="", d_c="", prompt=f"c{i}") for i in range(1000)]
    from imagenet_sd.prompts import backgrounds, prompts
    prompts.write(tmp_path / "prompts.tsv", rows)
    backgrounds.write(tmp_path / "bg.tsv", backgrounds.build())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "sd_generate.py"), "--params",
                             str(tmp_path / "params.yaml"), "--prompts", str(tmp_path / "prompts.tsv"),
                             "--backgrounds", str(tmp_path / "bg.tsv"), "--dry-run"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    # 1300 a class (no train folder configured) + the paper profile's 5 held-out images a class.
    assert "images: 1,305,000 of 1000 classes (1305 to 1305 a class = real x scale 1 + 5 held out)" in result.stderr
    assert "shards: 1,305 of up to 1,000 images" in result.stderr
    assert "the estimate cannot see which shards are finished" in result.stderr
    assert "TFLOP an image (51 denoiser calls" in result.stderr and "GPU-hours left:" in result.stderr
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())
