"""The sd-generate stage as users run it: dry run, torchrun with 2 processes, SIGKILL and resume, errors."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import embedded_raw, run_script
from imagenet_sd.datasets import shards
from imagenet_sd.prompts import backgrounds, prompts
from imagenet_sd.prompts.prompts import ClassPrompt

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark", "n01491361": "tiger shark"}


def setup_run(folder: Path, tiny: Path, images_per_class: int = 3, **generate) -> Path:
    """A params.yaml, prompts, backgrounds and real train folder in `folder`; returns the params file."""
    folder.mkdir(parents=True, exist_ok=True)
    for wnid in NAMES:
        (folder / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            (folder / "train" / wnid / f"{i}.JPEG").write_bytes(b"")
    rows = [ClassPrompt(wnid=w, index=i, c=n, h_c="fish", d_c="", prompt=f"{n}, fish")
            for i, (w, n) in enumerate(NAMES.items())]
    prompts.write(folder / "prompts.tsv", rows)
    backgrounds.write(folder / "bg.tsv", backgrounds.build())
    raw = embedded_raw()
    raw.update(profile="embedded", steps=2, seed=0)
    options = dict(model=str(tiny), resolution=64, batch_size=2, processes=1, images_per_shard=4,
                   device="cpu", work_dir=str(folder / "work"))
    options.update(generate)
    raw["profiles"]["embedded"]["generate"].update(options)
    raw["profiles"]["embedded"]["data"]["train"] = str(folder / "train")
    raw["profiles"]["embedded"]["train"]["holdout_per_class"] = 0      # counts here are real x scale
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return folder / "params.yaml"


def command(folder: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "stages" / "sd_generate.py"), "--params", str(folder / "params.yaml"),
            "--prompts", str(folder / "prompts.tsv"), "--backgrounds", str(folder / "bg.tsv"),
            "--out", str(folder / "out"), "--metrics", str(folder / "metrics.json"),
            "--details", str(folder / "details.json"), "--grid", str(folder / "grid.png"), *extra]


def environment() -> dict:
    # One thread per process in every run: CPU kernels round differently with other
    # thread counts, and torchrun gives each worker one thread.
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def stage(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_script(command(folder, *extra), cwd=folder, env=environment())


def published(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in shards.list_shards(folder / "out")}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_model):
    """One uninterrupted single-process run: the reference bytes."""
    folder = tmp_path_factory.mktemp("clean")
    setup_run(folder, tiny_model)
    result = stage(folder)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.mark.slow
def test_dry_run_prints_the_estimates_and_makes_nothing(tmp_path, tiny_model):
    setup_run(tmp_path, tiny_model)
    result = stage(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stderr
    for expected in ("images: 12 of 4 classes", "shards: 3 of up to 4 images", "disk:", "TFLOP an image",
                     "GPU-hours left:"):
        assert expected in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics.json").exists()
    assert not list((tmp_path / "work").rglob("shard-*"))


@pytest.mark.cluster       # torchrun's ranks: the second command (README)
def test_two_processes_under_torchrun_make_the_same_bytes(tmp_path, tiny_model, clean_run):
    setup_run(tmp_path, tiny_model, processes=2)
    result = stage(tmp_path)
    assert result.returncode == 0, result.stderr
    assert published(tmp_path) == published(clean_run)
    # The index too, although the work folders lie elsewhere: the output does not depend on who made it.
    assert (tmp_path / "out" / "index.json").read_bytes() == (clean_run / "out" / "index.json").read_bytes()
    metrics = json.loads((tmp_path / "details.json").read_text())     # all of them; metrics.json the headline
    assert metrics["processes"] == 2 and metrics["generated"] == 12
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_bytes(tmp_path, tiny_model, clean_run):
    setup_run(tmp_path, tiny_model)
    work = tmp_path / "work"
    process = subprocess.Popen(command(tmp_path), cwd=tmp_path, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(work.glob("*/shard-*.json")):          # the first shard is finished
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in work.glob("*/shard-*.tar") if shards.read_manifest(p)}
    assert 1 <= len(finished) < 3

    result = stage(tmp_path)
    assert result.returncode == 0, result.stderr
    assert published(tmp_path) == published(clean_run)
    # Finished shards were not made again.
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("*/shard-*.tar") if p.name in finished} == finished
    metrics = json.loads((tmp_path / "details.json").read_text())
    assert metrics["reused"] >= 4 and metrics["generated"] + metrics["reused"] == 12
    assert not list(work.rglob(".*.tmp"))


def marked(marker: str) -> list[int]:
    """Live processes (not zombies) whose environment carries `marker`: a run's launcher and everything under it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes() and (entry / "stat").read_text().split()[2] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue        # gone, or not ours
    return found


@pytest.mark.cluster       # torchrun's ranks: the second command (README)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("victim", ["stage", "torchrun"])
def test_a_killed_launcher_leaves_no_worker_running(tmp_path, tiny_model, victim):
    """SIGKILL of the stage's own process, which re-launched itself under torchrun with 2 workers, or of
    torchrun's agent alone: the workers (sessions of their own) stop too, instead of computing on."""
    params_file = setup_run(tmp_path, tiny_model, images_per_class=40, processes=2)
    raw = yaml.safe_load(params_file.read_text())
    params_file.write_text(yaml.safe_dump({**raw, "steps": 50}))      # minutes of work: it cannot end by itself
    marker = f"IMAGENET_SD_TEST_RUN={tmp_path.name}"
    launcher = subprocess.Popen(command(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**environment(), "IMAGENET_SD_TEST_RUN": tmp_path.name})
    try:
        deadline = time.monotonic() + 120
        while len(marked(marker)) < 4:          # launcher, torchrun's agent, 2 workers
            assert launcher.poll() is None and time.monotonic() < deadline, "the workers never started"
            time.sleep(0.2)
        time.sleep(2)                           # loading the model, or drawing
        if victim == "stage":
            launcher.kill()
        else:
            agent = next(pid for pid in marked(marker)
                         if b"torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_bytes())
            os.kill(agent, signal.SIGKILL)
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 30
        while marked(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marked(marker) == []
    finally:
        for pid in marked(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("generate, expected", [
    ({"model": "/no/such/model"}, "generate.model = '/no/such/model': model not found"),
    ({"dtype": "fp16"}, "generate.dtype = 'fp16' is not supported on CPU"),
    ({"work_dir": "/proc/no-write/work"}, "generate.work_dir = '/proc/no-write/work': cannot write there"),
])
def test_bad_input_is_one_line_and_leaves_outputs_alone(tmp_path, tiny_model, generate, expected):
    setup_run(tmp_path, tiny_model, **generate)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard-000000.tar").write_bytes(b"earlier run")
    result = stage(tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert (tmp_path / "out" / "shard-000000.tar").read_bytes() == b"earlier run"
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_missing_class_in_the_train_folder_is_one_line(tmp_path, tiny_model):
    setup_run(tmp_path, tiny_model)
    shutil.rmtree(tmp_path / "train" / "n01491361")
    result = stage(tmp_path)
    assert result.returncode == 2 and "has no images of class n01491361" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
