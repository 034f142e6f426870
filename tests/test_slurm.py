"""`launcher: slurm` (core/slurm.py) without a cluster: the stages submit themselves through submitit's
local executor (IMAGENET_SD_SUBMITIT_CLUSTER=local: the job's tasks are local processes with Slurm's
environment emulated), and must give the outputs of a local run, after a preemption and requeue too.

The jobs (marked `cluster`) run in the second test command (`pytest -n 2 -m cluster`, README), beside the
other scheduler tests: each starts a controller and task processes that import torch, minutes in all."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import embedded_raw
from imagenet_sd.core import params, slurm
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import shards
from test_generate_stage import command, environment, published, setup_run
from test_training import stage_command, write_colour_shards, write_prompts

LOCAL = {slurm.CLUSTER_ENV: "local"}
RUN = dict(images_per_class=6)          # 24 images in 6 shards of 4


def on_slurm(params_file: Path, log_dir: Path, tasks: int = 2, **block) -> None:
    raw = yaml.safe_load(params_file.read_text())
    profile = raw["profiles"]["embedded"]
    profile["launcher"] = "slurm"
    profile["slurm"].update(gpus_per_node=tasks, log_dir=str(log_dir), **block)
    params_file.write_text(yaml.safe_dump(raw))


def task_pids(marker: str, rank: int) -> list[int]:
    """Live processes of the job's task `rank` whose environment carries `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in env and f"SUBMITIT_LOCAL_GLOBALID={rank}".encode() in env:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("local")
    setup_run(folder, tiny_model, **RUN)
    result = subprocess.run(command(folder), cwd=folder, capture_output=True, text=True, env=environment(),
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.mark.cluster
def test_generation_as_a_two_task_job_makes_the_bytes_of_a_local_run(tmp_path, tiny_model, local_run):
    on_slurm(setup_run(tmp_path, tiny_model, **RUN), tmp_path / "slurm")
    result = subprocess.run(command(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                            env={**environment(), **LOCAL}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "submitted job" in result.stderr and "(2 task(s))" in result.stderr
    assert published(tmp_path) == published(local_run)
    assert (tmp_path / "out" / "index.json").read_bytes() == (local_run / "out" / "index.json").read_bytes()
    details = json.loads((tmp_path / "details.json").read_text())
    assert details["processes"] == 2 and details["generated"] == 24


@pytest.mark.cluster
def test_a_preempted_generation_job_is_requeued_and_resumes_to_the_same_bytes(tmp_path, tiny_model, local_run):
    on_slurm(setup_run(tmp_path, tiny_model, **RUN), tmp_path / "slurm")
    marker = f"IMAGENET_SD_TEST_RUN={tmp_path.name}"
    launcher = subprocess.Popen(command(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**environment(), **LOCAL, "IMAGENET_SD_TEST_RUN": tmp_path.name})
    deadline = time.monotonic() + 300
    while not list((tmp_path / "work").glob("*/shard-*.json")):      # a first shard is finished
        assert launcher.poll() is None and time.monotonic() < deadline, "the job ended before it could be preempted"
        time.sleep(0.05)
    for pid in task_pids(marker, 0):        # what Slurm sends at the time limit or on preemption
        os.kill(pid, signal.SIGUSR2)
    _, stderr = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, stderr.decode()[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "slurm" / "sd-generate").glob("*_log.*"))
    assert "Requeued job" in logs
    assert published(tmp_path) == published(local_run)


@pytest.fixture(scope="module")
def torchrun_weights(tmp_path_factory):
    """train-resnet50 as 2 torchrun processes (gloo, CPU), a checkpoint every step: the reference weights."""
    folder = tmp_path_factory.mktemp("torchrun")
    write_colour_shards(folder / "shards", per_class=4, per_shard=3)
    write_prompts(folder / "prompts.tsv")
    result = subprocess.run(stage_command(folder, "torchrun", **TRAIN, processes=2), capture_output=True, text=True,
                            env=without_thread_count(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, torch.load(folder / "torchrun" / "resnet50.pt")["state_dict"]


TRAIN = dict(epochs=2, workers=0, checkpoint_every_steps=1)


def without_thread_count() -> dict:
    """The environment as a user's shell has it: no OMP_NUM_THREADS. torchrun gives each of several
    workers one thread, and a job's tasks must too, or their float rounding (and weights) differ."""
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


@pytest.mark.cluster
@pytest.mark.parametrize("preempted", [False, True], ids=["uninterrupted", "preempted and requeued"])
def test_training_as_a_two_task_job_gives_the_weights_of_two_torchrun_processes(torchrun_weights, preempted):
    folder, reference = torchrun_weights
    name = f"job-{preempted}"
    job_command = stage_command(folder, name, **TRAIN, processes=1)
    on_slurm(folder / name / "params.yaml", folder / name / "slurm")
    job = subprocess.Popen(job_command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=dict(without_thread_count(), IMAGENET_SD_TEST_RUN=name, **LOCAL))
    if preempted:
        deadline = time.monotonic() + 300
        while not list((folder / name / "work").glob("*/last.pt")):      # the first step's checkpoint
            assert job.poll() is None and time.monotonic() < deadline, "training ended before it could be preempted"
            time.sleep(0.02)
        for pid in task_pids(f"IMAGENET_SD_TEST_RUN={name}", 0):
            os.kill(pid, signal.SIGUSR2)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr.decode()[-3000:]
    if preempted:
        logs = "".join(p.read_text() for p in (folder / name / "slurm" / "train-resnet50").glob("*_log.*"))
        assert "Requeued job" in logs and "resuming after epoch" in logs
    weights = torch.load(folder / name / "resnet50.pt")["state_dict"]
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)


@pytest.mark.cluster
def test_without_waiting_the_stage_says_so_and_a_later_run_finds_the_work_done(tmp_path, tiny_model, local_run):
    on_slurm(setup_run(tmp_path, tiny_model, **RUN), tmp_path / "slurm", wait=False)
    first = subprocess.run(command(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                           env={**environment(), **LOCAL}, timeout=600)
    assert first.returncode == 1 and "run the stage again (dvc repro) once job" in first.stderr
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "work").glob("*/shard-*.json"))) < 3:      # the job goes on without the stage
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.2)
    again = subprocess.run(command(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                           env={**environment(), **LOCAL}, timeout=600)
    assert again.returncode == 0 and "submitted job" not in again.stderr
    assert published(tmp_path) == published(local_run)


@pytest.mark.slow
def test_the_dry_run_prints_the_job_and_submits_nothing(tmp_path, tiny_model):
    on_slurm(setup_run(tmp_path, tiny_model), tmp_path / "slurm", tasks=8, nodes=4, partition="gpu",
             extra={"exclusive": True}, request_gpus=True)
    result = subprocess.run(command(tmp_path, "--dry-run"), cwd=tmp_path, capture_output=True, text=True,
                            env=environment(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "slurm job: imagenet-sd-sd-generate, 4 node(s) x 8 GPU(s) = 32 task(s)" in result.stderr
    assert "partition gpu" in result.stderr and "--exclusive" in result.stderr
    assert "GPU-hours left" in result.stderr and not (tmp_path / "slurm").exists()


def test_without_sbatch_slurm_is_one_line(monkeypatch):
    monkeypatch.delenv(slurm.CLUSTER_ENV, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="sbatch is not on this machine's PATH"):
        slurm.cluster()


def test_the_slurm_block_is_checked_at_the_edge():
    raw = embedded_raw()
    raw["profiles"]["embedded"]["slurm"]["extra"] = ["--exclusive"]
    with pytest.raises(UserError, match="slurm.extra = .* a mapping of sbatch option names"):
        params.parse(raw)
    raw["profiles"]["embedded"]["slurm"]["extra"] = {}
    raw["profiles"]["embedded"]["launcher"] = "pbs"
    with pytest.raises(UserError, match="launcher = 'pbs' is not valid; allowed: local | slurm"):
        params.parse(raw)
    assert sys.platform       # (the module's other tests need Linux's /proc for the task lookup)


def test_a_training_jobs_state_is_keyed_by_its_tasks_not_by_train_processes(tmp_path, monkeypatch):
    """A finished 1-process state must not pass for a 2-task job's (per-process BatchNorm: other weights),
    while a 2-task job and 2 torchrun processes share one."""
    import dataclasses

    from imagenet_sd.train import state
    write_colour_shards(tmp_path / "shards", per_class=2, per_shard=3)
    raw = embedded_raw()
    raw["profile"] = "embedded"
    raw["profiles"]["embedded"]["train"]["work_dir"] = str(tmp_path / "work")
    local = params.parse(raw)
    keys = ["a", "b", "c"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = state.state_file(local, keys, tmp_path / "shards")
    job = state.state_file(dataclasses.replace(local, launcher="slurm"), keys, tmp_path / "shards")
    two = state.state_file(dataclasses.replace(local, train=dataclasses.replace(local.train, processes=2)),
                           keys, tmp_path / "shards")
    assert local.slurm.tasks == 2 and job != one and job == two


@pytest.mark.parametrize("script, stage, device_key, switch", [
    ("clip_filter.py", "clip-filter", ("filter", "device"), {"filter": "clip"}),
    ("clip_tune.py", "clip-tune", ("clip_classifier", "device"), {"clip_tune": True}),
    ("eval_imagenet.py", "eval-imagenet", ("evaluate", "device"), {}),
    ("eval_transfer.py", "eval-transfer", ("transfer", "device"), {}),
])
def test_one_process_stages_submit_a_one_gpu_job_unless_pinned_to_the_cpu(monkeypatch, script, stage, device_key,
                                                                           switch):
    import runpy
    root = Path(__file__).resolve().parents[1]
    main = runpy.run_path(str(root / "stages" / script), run_name="a stage under test")["main"]
    submitted = []

    class Submitted(Exception):
        pass

    def fake_submit(params_, name, progress=None, unit="img", one_gpu=False):
        submitted.append((name, one_gpu))
        raise Submitted

    monkeypatch.setattr(slurm, "submit", fake_submit)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw.update(profile="embedded", **switch)
    raw["profiles"]["embedded"]["launcher"] = "slurm"
    with pytest.raises(Submitted):
        main(params.parse(raw), None)
    assert submitted == [(stage, True)]
    section, key = device_key
    raw["profiles"]["embedded"][section][key] = "cpu"        # pinned to the CPU: it runs here, not as a job
    with pytest.raises(Exception) as info:                   # (and fails on the missing args, past the check)
        main(params.parse(raw), None)
    assert not isinstance(info.value, Submitted) and len(submitted) == 1


# --------------------------------------------------------------------------- a real Slurm
# scripts/local_slurm.sh's cluster (fixture real_slurm): slurmctld and two slurmd nodes on this host, jobs
# polled with squeue (no accounting storage, as on many clusters), requeued with scontrol as Slurm does.

def real(real_slurm: dict, **extra) -> dict:
    env = {**environment(), **real_slurm, **extra}
    env.pop(slurm.CLUSTER_ENV, None)
    return env


def submitted_job(log_dir: Path, deadline_s: float = 120) -> str:
    """The id of the job a stage submitted into `log_dir` (submitit names its files after it)."""
    deadline = time.monotonic() + deadline_s
    while not (found := list(log_dir.glob("*_submitted.pkl"))):
        assert time.monotonic() < deadline, f"no job was submitted into {log_dir}"
        time.sleep(0.2)
    return found[0].name.split("_")[0]


def generation_job(folder: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """sd-generate started in `folder` (its params on Slurm), once its job is RUNNING: (the stage, the job id)."""
    stage_run = subprocess.Popen(command(folder), cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 env=env)
    job = submitted_job(folder / "slurm" / "sd-generate")
    deadline = time.monotonic() + 300
    while job_field(job, "JobState", env) != "RUNNING":
        assert stage_run.poll() is None and time.monotonic() < deadline, f"job {job} ended before it ran"
        time.sleep(0.1)
    return stage_run, job


def job_field(job: str, name: str, env: dict) -> str:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job], capture_output=True, text=True, env=env).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith(f"{name}=")), "")


def final_state(job: str, env: dict, deadline_s: float = 60) -> str:
    """The job's state once Slurm has seen its tasks exit. A stage ends when the tasks have written their
    results (submitit's done()), which can be a moment before slurmd reports the job COMPLETED."""
    deadline = time.monotonic() + deadline_s
    while (state := job_field(job, "JobState", env)) in ("RUNNING", "COMPLETING") and time.monotonic() < deadline:
        time.sleep(0.2)
    return state


@pytest.mark.cluster
def test_real_slurm_generation_requeued_while_running_publishes_the_bytes_of_a_local_run(tmp_path, tiny_model, local_run,
                                                                                  real_slurm):
    on_slurm(setup_run(tmp_path, tiny_model, **RUN), tmp_path / "slurm", cpus_per_task=1)
    env = real(real_slurm)
    # Requeued as soon as it runs (its tasks starting up): 24 images take the tasks a few seconds, so
    # waiting for a first finished shard would race the job's end. Resuming from finished shards after a
    # requeue: the time-limit test below, and the preemption test above.
    stage_run, job = generation_job(tmp_path, env)
    subprocess.run(["scontrol", "requeue", job], check=True, env=env)
    _, stderr = stage_run.communicate(timeout=600)
    assert stage_run.returncode == 0, stderr.decode()[-3000:]
    assert job_field(job, "Restarts", env) == "1" and final_state(job, env) == "COMPLETED"
    assert "(2 task(s))" in stderr.decode() and "sacct" not in stderr.decode()     # polled without accounting
    assert published(tmp_path) == published(local_run)


@pytest.mark.cluster
@pytest.mark.parametrize("requeued", [False, True], ids=["uninterrupted", "requeued while running"])
def test_real_slurm_training_on_two_nodes_gives_the_weights_of_two_torchrun_processes(torchrun_weights, real_slurm,
                                                                                     requeued):
    """A real multi-node rendezvous: one task on each of the nodes n1 and n2."""
    folder, reference = torchrun_weights
    name = f"real-{requeued}"
    job_command = stage_command(folder, name, **TRAIN, processes=1)
    on_slurm(folder / name / "params.yaml", folder / name / "slurm", nodes=2, tasks=1, cpus_per_task=1)
    env = real(real_slurm)
    env.pop("OMP_NUM_THREADS")          # as without_thread_count(): the job's tasks set one thread each
    stage_run = subprocess.Popen(job_command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    job = submitted_job(folder / name / "slurm" / "train-resnet50")
    if requeued:          # as it runs: its few steps would race a requeue after a first checkpoint
        deadline = time.monotonic() + 300
        while job_field(job, "JobState", env) != "RUNNING":
            assert stage_run.poll() is None and time.monotonic() < deadline, "training ended before the requeue"
            time.sleep(0.1)
        subprocess.run(["scontrol", "requeue", job], check=True, env=env)
    _, stderr = stage_run.communicate(timeout=600)
    assert stage_run.returncode == 0, stderr.decode()[-3000:]
    assert job_field(job, "NodeList", env) == "n[1-2]" and job_field(job, "Restarts", env) == str(int(requeued))
    weights = torch.load(folder / name / "resnet50.pt")["state_dict"]
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)


@pytest.mark.cluster
def test_real_slurm_scancel_ends_the_stage_in_one_line_with_nothing_published(tmp_path, tiny_model, real_slurm):
    on_slurm(setup_run(tmp_path, tiny_model, images_per_class=60), tmp_path / "slurm", cpus_per_task=1)
    env = real(real_slurm)
    stage_run, job = generation_job(tmp_path, env)
    subprocess.run(["scancel", job], check=True, env=env)
    _, stderr = stage_run.communicate(timeout=300)
    last = stderr.decode().strip().splitlines()[-1]
    assert stage_run.returncode == 2 and "Traceback" not in stderr.decode(), stderr.decode()[-3000:]
    assert last.startswith("error: sd-generate: job ") and "CANCELLED" in last, last
    assert not (tmp_path / "out").exists() or not published(tmp_path)


@pytest.mark.cluster
def test_real_slurm_without_waiting_a_later_run_finds_the_work_done(tmp_path, tiny_model, local_run, real_slurm):
    on_slurm(setup_run(tmp_path, tiny_model, **RUN), tmp_path / "slurm", wait=False, cpus_per_task=1)
    env = real(real_slurm)
    first = subprocess.run(command(tmp_path), cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 1 and "run the stage again (dvc repro) once job" in first.stderr
    job = submitted_job(tmp_path / "slurm" / "sd-generate")
    deadline = time.monotonic() + 300
    while job_field(job, "JobState", env) != "COMPLETED":      # the job goes on without the stage
        assert time.monotonic() < deadline, f"job {job} did not complete: {job_field(job, 'JobState', env)}"
        time.sleep(0.5)
    again = subprocess.run(command(tmp_path), cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "submitted job" not in again.stderr, again.stderr[-2000:]
    assert published(tmp_path) == published(local_run)


@pytest.mark.cluster
def test_real_slurm_refusing_the_job_is_one_line_naming_the_setting_and_leaves_no_pickle(tmp_path, tiny_model,
                                                                                         real_slurm):
    on_slurm(setup_run(tmp_path, tiny_model), tmp_path / "slurm", partition="gpu")     # the docs' example
    result = subprocess.run(command(tmp_path), cwd=tmp_path, capture_output=True, text=True, env=real(real_slurm),
                            timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1].startswith("error: sd-generate: sbatch refused the job (sbatch: error: invalid partition"), lines
    assert "profiles.embedded.slurm" in lines[-1]
    assert not list((tmp_path / "slurm" / "sd-generate").iterdir())


@pytest.mark.cluster
def test_real_slurm_the_time_limit_signal_requeues_the_job_and_it_resumes_to_a_local_runs_bytes(tmp_path, tiny_model,
                                                                                                real_slurm):
    """USR2 to the tasks, what Slurm sends signal_delay_s before the limit (submitit's own _interrupt sends it
    the same way): submitit checkpoints and requeues, and the job resumes from its finished shards. Waiting
    out a real limit would cost minutes: a limit is at least 2 (Slurm signals up to a minute early)."""
    bigger = dict(images_per_class=30)          # 120 images, 30 shards: still running after its first shard
    reference = tmp_path / "local"
    setup_run(reference, tiny_model, **bigger)
    assert subprocess.run(command(reference), cwd=reference, capture_output=True, env=environment(),
                          timeout=600).returncode == 0
    job_folder = tmp_path / "job"
    on_slurm(setup_run(job_folder, tiny_model, **bigger), job_folder / "slurm", cpus_per_task=1, time_min=30)
    env = real(real_slurm)
    stage_run, job = generation_job(job_folder, env)
    deadline = time.monotonic() + 300
    while not list((job_folder / "work").glob("*/shard-*.json")):      # past the tasks' start: handlers are set
        assert stage_run.poll() is None and time.monotonic() < deadline, "the job ended before it was signalled"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, env=env)
    _, stderr = stage_run.communicate(timeout=600)
    assert stage_run.returncode == 0, stderr.decode()[-3000:]
    logs = "".join(p.read_text() for p in (job_folder / "slurm" / "sd-generate").glob("*_log.*"))
    assert "Requeued job" in logs and job_field(job, "Restarts", env) == "1"
    assert published(job_folder) == published(reference)


def test_the_job_asks_for_gpus_and_a_signal_delay_its_limit_allows(monkeypatch):
    monkeypatch.delenv(slurm.CLUSTER_ENV, raising=False)
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    raw = embedded_raw()
    block = raw["profiles"]["embedded"]["slurm"]
    block.update(request_gpus=True, time_min=600, gpus_per_node=4)
    on_gpus = slurm.job_settings(params.parse(raw), "train-resnet50")
    assert (on_gpus["gpus_per_node"], on_gpus["ntasks_per_node"], on_gpus["signal_delay_s"]) == (4, 4, 120)
    block.update(request_gpus=False, time_min=2)
    on_cpus = slurm.job_settings(params.parse(raw), "train-resnet50")
    assert "gpus_per_node" not in on_cpus and on_cpus["ntasks_per_node"] == 4 and on_cpus["signal_delay_s"] == 30
    block["time_min"] = 1
    with pytest.raises(UserError, match=r"slurm.time_min = 1 is not valid; allowed: an integer >= 2: Slurm may signal"):
        params.parse(raw)


def test_a_log_dir_that_cannot_be_made_is_one_line_before_anything_is_submitted(tmp_path, monkeypatch):
    monkeypatch.setenv(slurm.CLUSTER_ENV, "local")
    (tmp_path / "a-file").write_text("")
    raw = embedded_raw()
    raw["profiles"]["embedded"]["slurm"]["log_dir"] = str(tmp_path / "a-file" / "slurm")
    p = params.parse(raw)
    with pytest.raises(UserError, match=r"^profiles.embedded.slurm.log_dir = '.*a-file/slurm': cannot make .* "
                                        r"\(Not a directory\); set it to a writable folder"):
        slurm.submit(p, "sd-generate")
    assert "cannot be written" in slurm.describe(p, "sd-generate", ["x.py"])[-1]


@pytest.mark.cluster
def test_real_slurm_a_job_at_its_time_limit_is_signalled_requeued_and_draws_what_an_uninterrupted_run_draws(
        tmp_path, tiny_model, real_slurm):
    """A real 2-minute limit (the shortest time_min): Slurm signals the task signal_delay_s (30 s) before it,
    up to a minute early; submitit requeues the job and it resumes from its finished shards. The work
    (2,400 images on one task, ~2 min at 21 img/s) outlasts the signal. Instead of a second, uninterrupted run, shards
    from before and after the requeue are drawn again from their records (regenerate): byte for byte."""
    on_slurm(setup_run(tmp_path, tiny_model, images_per_class=600), tmp_path / "slurm", tasks=1, cpus_per_task=1,
             time_min=2)
    env = real(real_slurm)
    result = subprocess.run(command(tmp_path), cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    job = submitted_job(tmp_path / "slurm" / "sd-generate")
    logs = "".join(p.read_text() for p in (tmp_path / "slurm" / "sd-generate").glob("*_log.*"))
    assert "timed-out" in logs.lower() or "timed out" in logs.lower(), logs[-3000:]
    assert "Requeued job" in logs and int(job_field(job, "Restarts", env)) >= 1
    published_shards = shards.list_shards(tmp_path / "out")
    assert len(published_shards) == 600
    for shard in (published_shards[0], published_shards[-1]):        # drawn before and after the requeue
        again = subprocess.run([sys.executable, "-m", "imagenet_sd.generate.regenerate", str(shard)], cwd=tmp_path,
                               capture_output=True, text=True, env=environment(), timeout=300)
        assert again.returncode == 0 and "identical" in again.stdout, again.stdout + again.stderr[-2000:]
