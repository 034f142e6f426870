"""Fixtures and helpers shared by the test modules."""
import contextlib
import copy
import dataclasses
import functools
import io
import json
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from imagenet_sd.core import params
from imagenet_sd.datasets import plan as planning
from imagenet_sd.datasets import shards
from imagenet_sd.models import embedded, tiny_clip, tiny_open_clip, tiny_t5
from imagenet_sd.prompts.prompts import ClassPrompt

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Under pytest-xdist (README: `pytest -n 2`) the workers share the cores: one thread each, in
    # this process and in the stages it starts, or two workers' torch threads spin-wait for each other.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# Test files by their cost, most expensive first (seconds on 2 cores under `-n 2`, measured with
# `pytest -n 2 --durations=0`; docs/benchmarks.md "The test suite"). Files not named run after these.
# test_slurm.py and test_rehearsal.py lead the second command (`-m cluster`), where they are the longest.
LONGEST_FIRST = ("test_pipeline.py", "test_slurm.py", "test_rehearsal.py", "test_training.py", "test_families.py",
                 "test_generate_stage.py", "test_digits.py", "test_evaluation.py", "test_scale.py",
                 "test_generation.py", "test_clip_classifier.py", "test_gpu_check.py", "test_real_guidance.py")


@pytest.hookimpl(tryfirst=True)        # before -m deselects: the quick marker must be on by then
def pytest_collection_modifyitems(items):
    # Under `-n 2 --dist loadfile` a file runs on one worker, in this order (--no-loadscope-reorder):
    # the longest files first, so that the two workers finish together instead of one of them
    # running a long file alone at the end (longest-processing-time-first scheduling).
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    # `pytest -m quick`, the inner loop (under a minute): every test not marked slow (an end-to-end run
    # of a stage, a few seconds or more) or cluster (a scheduler's jobs).
    for item in items:
        if not any(item.get_closest_marker(name) for name in ("slow", "cluster")):
            item.add_marker(pytest.mark.quick)


def run_script(args: list[str], cwd: Path | None = None, env: dict | None = None,
               **_subprocess_options) -> subprocess.CompletedProcess:
    """`[sys.executable, script, *argv]` run in this process, as subprocess.run(..., capture_output=True,
    text=True) would run it: the exit status (SystemExit's code; 1 and the traceback for any other
    exception), stdout and stderr. No interpreter starts and no torch is imported again (seconds a
    stage); what a stage does is the same. `env` is applied for the call (the variables it adds or
    changes), torch on one thread as in a stage process under OMP_NUM_THREADS=1. Tests of what only a
    process has (SIGKILL, torchrun's ranks, a scheduler's tasks) start one with subprocess instead."""
    assert args[0] == sys.executable, args
    script, argv = str(args[1]), [str(a) for a in args[2:]]
    changed = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}
    saved_env = {k: os.environ.get(k) for k in changed}
    saved_argv, saved_cwd, saved_threads = sys.argv, Path.cwd(), torch.get_num_threads()
    # Text streams over bytes, as sys.stdout and sys.stderr are: code that writes to .buffer (torchrun's
    # output forwarded by distributed.relaunch) is captured too.
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))
    code = 0
    try:
        os.environ.update(changed)
        sys.argv = [script, *argv]
        os.chdir(cwd or saved_cwd)
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
            except Exception:  # noqa: BLE001  (a stage's crash: status 1 and its traceback, as python's)
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(args, code, *(stream.buffer.getvalue().decode() for stream in (out, err)))


def embedded_raw() -> dict:
    """params.yaml as loaded, on the embedded profile and its ImageNet-100 class set, which the
    fixtures are laid out for (the committed params run the digits profile: docs/digits.md)."""
    raw = copy.deepcopy(_shipped_params())
    raw.update(profile="embedded", classes="imagenet100")
    return raw


@functools.cache
def _shipped_params() -> dict:
    """params.yaml parsed once a test process (about 150 tests start from it); callers get a copy."""
    return yaml.load((ROOT / "params.yaml").read_text(), Loader=yaml.CSafeLoader)


def set_param(raw: dict, dotted: str, value) -> None:
    """raw params (params.yaml as loaded) with the key `a.b.c` set to `value`."""
    *parents, last = dotted.split(".")
    for part in parents:
        raw = raw[part]
    raw[last] = value


def built(component, tmp_path_factory) -> Path:
    """An embedded component's folder: the one setup built when it is current, else a fresh build."""
    if component.is_current(ROOT / component.DEFAULT_DIR):
        return ROOT / component.DEFAULT_DIR
    out = tmp_path_factory.mktemp("model") / component.DEFAULT_DIR.name
    component.build(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The embedded tiny SD (models/tiny-sd)."""
    return built(embedded, tmp_path_factory)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """The embedded tiny CLIP (models/tiny-clip)."""
    return built(tiny_clip, tmp_path_factory)


@pytest.fixture(scope="session")
def open_clip_dir(tmp_path_factory) -> Path:
    """The embedded tiny OpenCLIP, a ResNet image tower (models/tiny-open-clip)."""
    return built(tiny_open_clip, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """The embedded tiny T5 (models/tiny-t5)."""
    return built(tiny_t5, tmp_path_factory)


REQUIRE_SLURM = "IMAGENET_SD_REQUIRE_SLURM"      # 1 (CI): a real Slurm that cannot start fails, not skips


@pytest.fixture(scope="session")
def real_slurm() -> dict:
    """A real single-host Slurm (scripts/local_slurm.sh: Debian's slurm-wlm and munge, installed if
    missing; two nodes, fake GPUs), started once for all workers; the environment its tools need.
    Skipped in one line where it cannot start (no root, no apt), unless IMAGENET_SD_REQUIRE_SLURM=1,
    as CI sets, which makes that a failure."""
    import fcntl
    root = Path(__file__).resolve().parents[1]
    with open("/tmp/imagenet-sd-slurm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # xdist's workers start it once
        script = ["bash", str(root / "scripts" / "local_slurm.sh")]
        result = subprocess.run(script + ["install"], capture_output=True, text=True, timeout=600)
        if result.returncode == 0:
            result = subprocess.run(script + ["start"], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no reason given"])[-1]
        if os.environ.get(REQUIRE_SLURM) == "1":
            pytest.fail(f"real Slurm did not start ({REQUIRE_SLURM}=1): {reason}")
        pytest.skip(f"no real Slurm here: {reason}")
    conf = result.stdout.strip().splitlines()[-1].split("=", 1)[1]
    return {"SLURM_CONF": conf}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A train-resnet50 checkpoint of 10 classes with seeded random weights, for the evaluation stages."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    path = tmp_path_factory.mktemp("model") / "resnet50.pt"
    keys = [f"class{i}" for i in range(10)]
    torch.save({"arch": "resnet50", "classes": keys, "wnids": [""] * 10, "state_dict": model.state_dict(),
                "image_size": 32, "params": {}}, path)
    return path


def generation_params(tmp_path: Path, model: Path, train: Path, generate: dict | None = None,
                      **top) -> params.Params:
    """The embedded profile set for a small CPU generation: `model`, batch 2, 64 px, 3 images a
    shard, the work folder in tmp_path, real counts from `train`, no held-out images (the tests
    count real x scale); `generate` overrides generate.*, `top` the top-level params (steps, ...)."""
    p = params.parse(embedded_raw())
    options = dict(model=str(model), batch_size=2, images_per_shard=3, resolution=64, device="cpu",
                   work_dir=tmp_path / "work")
    options.update(generate or {})
    return dataclasses.replace(p, generate=dataclasses.replace(p.generate, **options),
                               data=dataclasses.replace(p.data, train=train),
                               train=dataclasses.replace(p.train, holdout_per_class=0), **top)


def noise_jpeg(*seed: int) -> bytes:
    """A 32 px JPEG of seeded noise: distinct bytes for every seed."""
    pixels = np.random.default_rng(list(seed)).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def minimal_record(label: int, index: int, key: str) -> dict:
    """What a reader of the shards checks in an image's record."""
    return {"class": key, "label": label, "image_index": index}


def write_synthetic_shards(folder: Path, rows: list[ClassPrompt], per_class: int, holdout: int, per_shard: int,
                           image=noise_jpeg, record=minimal_record, targets: int | None = None) -> dict[bytes, tuple[int, int]]:
    """Shards and index.json in `folder`, laid out as sd-generate lays them out (plan.Layout):
    `per_class` + `holdout` images a class, `per_shard` a class a shard, image(label, index) the
    JPEG bytes and record(label, index, key) the JSON beside them, called in shard order.
    `targets`: over-generated for the CLIP filter, which keeps this many of the `per_class` a class.
    Returns each image's bytes -> (label, image index)."""
    keys = [r.key for r in sorted(rows, key=lambda r: r.index)]
    counts = dict.fromkeys(keys, per_class + holdout)
    layout = planning.Layout(rows, counts, [], per_class=per_shard)
    folder.mkdir(parents=True, exist_ok=True)
    listed, identities = [], {}
    for shard in layout:
        samples = []
        for it in shard.items:
            jpeg = image(it.cls.index, it.image_index)
            identities[jpeg] = (it.cls.index, it.image_index)
            samples.append((it.key, jpeg, record(it.cls.index, it.image_index, it.cls.key)))
        size, sha256 = shards.write_shard(folder / shard.name, samples)
        listed.append({"file": shard.name, "images": len(samples), "bytes": size, "sha256": sha256})
    index = {"classes": keys, "counts": counts, "holdout_per_class": holdout, "images_per_class_per_shard": per_shard,
             "images": layout.images, "shards": listed}
    if targets is not None:
        index.update(overgenerate=round(per_class / targets - 1, 4), train_targets=dict.fromkeys(keys, targets))
    (folder / shards.INDEX_FILE).write_text(json.dumps(index))
    return identities
