"""A stage as a Slurm job through submitit: submit, wait with progress, requeue at the time limit.

With `launcher: slurm`, sd-generate and train-resnet50 on a login node submit their own
command as a job of `nodes x gpus_per_node` tasks (one a GPU) and wait for it; clip-filter,
clip-tune and the evaluations, one process each, submit a one-GPU job when they have model
work and their device param is not `cpu`. Each task runs
the stage's script in-process with torch.distributed's environment taken from the job
(submitit's TorchDistributedEnvironment: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
LOCAL_RANK), so it takes the code path of a torchrun worker: generation splits the unfinished
shards under their locks, training runs DDP. Rank 0 publishes the outputs into the repository
(which must be on a file system the nodes share), and the waiting stage ends with the job,
so DVC records it as after a local run.

A task is a submitit `Checkpointable`: at the time limit or on preemption Slurm signals it
(`signal_delay_s` before the limit), submitit requeues the same call, and the stage resumes from
its finished shards or its last training state. The job's state is polled with squeue, which
every cluster answers (submitit's own polling calls sacct, which fails every poll on a cluster
without accounting storage). `request_gpus: false` submits a job that asks for no GPU (a CPU
partition). `IMAGENET_SD_SUBMITIT_CLUSTER=local` (tests only) runs the job with submitit's local
executor: the tasks are local processes, and no Slurm is needed.

Docs: docs/cluster.md
"""
from __future__ import annotations

import contextlib
import io
import os
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.params import Params

CLUSTER_ENV = "IMAGENET_SD_SUBMITIT_CLUSTER"    # "local": submitit's local executor (tests; no Slurm)
IN_JOB_ENV = "IMAGENET_SD_IN_JOB"               # set in the job's tasks: run the stage, do not submit it
POLL_SECONDS = 5.0
# Slurm signals a job this long before its time limit (submitit then requeues it): SIGNAL_DELAY_S, or a
# quarter of a shorter limit. Slurm may send it up to a minute early (its event resolution), so a limit
# is at least 2 minutes (params/cluster.py): a 1-minute job was signalled 12 s in, as its tasks started.
SIGNAL_DELAY_S = 120
MAX_TIMEOUTS = 10_000     # requeues at the time limit a job may have (submitit's default: 3)


def signal_delay_s(time_min: int) -> int:
    return min(SIGNAL_DELAY_S, time_min * 60 // 4)


def in_job() -> bool:
    return os.environ.get(IN_JOB_ENV) == "1"


def wanted(params: Params, device: str | None = None) -> bool:
    """Whether this process should submit the stage as a job instead of running it. `device`: a
    one-GPU stage's device param; one pinned to the CPU runs where DVC runs it."""
    return params.launcher == "slurm" and not in_job() and device != "cpu"


def cluster() -> str:
    """submitit's cluster: slurm, or local when the test switch says so; a one-line error without Slurm."""
    chosen = os.environ.get(CLUSTER_ENV, "slurm")
    if chosen == "slurm" and shutil.which("sbatch") is None:
        raise UserError("launcher = 'slurm', but sbatch is not on this machine's PATH; run the stage on the "
                        "cluster's login node, or set launcher: local in params.yaml")
    return chosen


def sbatch_fields(s) -> dict[str, str]:
    """The slurm block's sbatch settings that are set ('' leaves the cluster's default)."""
    fields = {"partition": s.partition, "account": s.account, "qos": s.qos, "constraint": s.constraint, "mem": s.mem}
    return {k: v for k, v in fields.items() if v}


def job_settings(params: Params, stage: str, one_gpu: bool = False) -> dict:
    """The job's parameters, in the names of the executor `cluster()` picks: submitit's SlurmExecutor
    (sbatch's options) or its local executor. `one_gpu`: a stage that runs one process (clip-filter,
    clip-tune, the evaluations)."""
    s = params.slurm
    nodes, tasks = (1, 1) if one_gpu else (s.nodes, s.gpus_per_node)
    if cluster() != "slurm":
        return dict(name=f"imagenet-sd-{stage}", nodes=nodes, tasks_per_node=tasks, cpus_per_task=s.cpus_per_task,
                    timeout_min=s.time_min)
    settings = dict(job_name=f"imagenet-sd-{stage}", nodes=nodes, ntasks_per_node=tasks,
                    cpus_per_task=s.cpus_per_task, time=s.time_min, signal_delay_s=signal_delay_s(s.time_min),
                    **sbatch_fields(s))
    if s.request_gpus:
        settings["gpus_per_node"] = tasks
    if s.extra:
        settings["additional_parameters"] = dict(s.extra)
    return settings


def describe(params: Params, stage: str, argv: list[str]) -> list[str]:
    """The dry run's lines: the job it would submit."""
    s = params.slurm
    where = ", ".join(f"{k} {v}" for k, v in sbatch_fields(s).items()) or "the defaults"
    extra = " ".join(f"--{k}" if v is True else f"--{k}={v}" for k, v in s.extra.items())
    per_node = f"{s.gpus_per_node} GPU(s)" if s.request_gpus else f"{s.gpus_per_node} CPU task(s), no GPU"
    problem = unwritable(s.log_dir)
    return [f"slurm job: imagenet-sd-{stage}, {s.nodes} node(s) x {per_node} = {s.tasks} task(s), "
            f"{s.cpus_per_task} CPUs a task, time limit {s.time_min} min (signalled {signal_delay_s(s.time_min)} s "
            f"before it and requeued), {where}" + (f", {extra}" if extra else ""),
            f"each task runs: {shlex.join([sys.executable, *argv])} (in {Path.cwd()})",
            f"logs: {s.log_dir / stage}" + (f" (cannot be written: {problem}; set slurm.log_dir)" if problem else "")]


def unwritable(folder: Path) -> str | None:
    """Why `folder` cannot be made or written (its nearest existing parent decides), or None."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def squeue_watcher(delay_s: float):
    """submitit's job-state watcher asking squeue, which every cluster answers, with or without
    accounting storage (submitit's own asks sacct); a finished job stays listed for the cluster's
    MinJobAge (300 s by default)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class Watcher(SlurmInfoWatcher):
        def _make_command(self):
            ids = sorted({x.split("_")[0] for x in self._registered - self._finished})
            if not ids:
                return None
            return ["squeue", "--noheader", "--states=all", f"--jobs={','.join(ids)}", "--format=%i|%T|%N"]

        def read_info(self, string):      # sacct's layout, which the parent parses: a header, then id|state|nodes
            text = string.decode() if isinstance(string, bytes) else string
            return super().read_info("JobID|State|NodeList\n" + text)

    return Watcher(delay_s=delay_s)


def executor(folder: Path, settings: dict):
    """The submitit executor of `cluster()`, its jobs polled with squeue on Slurm."""
    import submitit
    if cluster() != "slurm":
        chosen = submitit.AutoExecutor(folder=folder, cluster=cluster())
        chosen.update_parameters(**settings)
        return chosen

    class Job(submitit.SlurmJob):
        watcher = squeue_watcher(POLL_SECONDS)

    class Executor(submitit.SlurmExecutor):
        job_class = Job

    # A run longer than a few time limits is the rule here (100 epochs in 4-hour slices): requeue at
    # every limit, not submitit's default of 3.
    chosen = Executor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
    chosen.update_parameters(**settings)
    return chosen


class StageTask:
    """One task of the job: the stage's script, run in-process as a torch.distributed worker.

    Checkpointable (submitit calls `checkpoint` when the job is signalled at its time limit
    or preempted): the same call is requeued, and the stage resumes from its own state.
    """

    def __call__(self, argv: list[str], cwd: str, env: dict[str, str]) -> None:
        import submitit
        import torch
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=torch.cuda.is_available(),
                                                               overwrite=True)
        os.chdir(cwd)
        os.environ.update(env)
        os.environ[IN_JOB_ENV] = "1"
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and "OMP_NUM_THREADS" not in os.environ:
            # torchrun's default for several processes a node: one thread each. CPU kernels round
            # differently with other thread counts, and a job must give the weights torchrun gives.
            os.environ["OMP_NUM_THREADS"] = "1"
            torch.set_num_threads(1)
        sys.argv = list(argv)
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exc:
            # A stage's error exits 2 (its one line is in cli.ERROR_FILE_ENV's file), and submitit's
            # requeue exits from its signal handler: both must end the task as they are.
            if exc.code not in (0, None):
                raise

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submit(params: Params, stage: str, progress: Callable[[], tuple[int, int]] | None = None,
           unit: str = "img", one_gpu: bool = False) -> int:
    """Submit this stage's own command as a job; wait for it (`slurm.wait`) showing `progress`
    ((done, total), polled every POLL_SECONDS); the exit status for the stage: 0 when the job
    finished, 1 when submitted without waiting. A failed job is a UserError naming its log."""
    from imagenet_sd.core.cli import ERROR_FILE_ENV
    folder = params.slurm.log_dir / stage
    key = f"profiles.{params.profile}.slurm"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{key}.log_dir = {str(params.slurm.log_dir)!r}: cannot make {folder} ({exc.strerror}); set "
                        "it to a writable folder on a file system the compute nodes share") from None
    chosen = executor(folder, job_settings(params, stage, one_gpu))
    error_file = folder / f"error-{os.getpid()}-{time.time_ns()}"
    env = {ERROR_FILE_ENV: str(error_file), "PYTHONUNBUFFERED": "1"}
    before = set(folder.iterdir())
    from submitit.core.utils import FailedJobError
    try:
        # submitit prints sbatch's error itself before raising it: the stage says it once, below.
        with contextlib.redirect_stderr(io.StringIO()):
            job = chosen.submit(StageTask(), [sys.argv[0], *sys.argv[1:]], str(Path.cwd()), env)
    except (FailedJobError, subprocess.CalledProcessError, OSError) as exc:
        for leftover in set(folder.iterdir()) - before:      # the refused submission's pickle and script
            leftover.unlink(missing_ok=True)
        raise UserError(f"{stage}: sbatch refused the job ({sbatch_reason(exc)}); check {key} "
                        f"(partition, account, qos, constraint, mem, extra)") from None
    print(f"{stage}: submitted job {job.job_id} ({1 if one_gpu else params.slurm.tasks} task(s)); logs in {folder}",
          file=sys.stderr)
    if not params.slurm.wait:
        print(f"{stage}: slurm.wait is false: run the stage again (dvc repro) once job {job.job_id} has "
              "finished; it then finds the work done", file=sys.stderr)
        return 1
    wait(job, progress, unit, stage)
    try:
        job.results()           # every task's; the first failure raises
    except Exception as exc:  # noqa: BLE001  (submitit re-raises the task's failure as one of several kinds)
        if error_file.is_file():
            raise UserError(error_file.read_text()) from None
        raise UserError(f"{stage}: job {job.job_id} failed ({' '.join(str(exc).split())[-300:]}); its logs: "
                        f"{folder}") from None
    finally:
        error_file.unlink(missing_ok=True)
    return 0


def sbatch_reason(exc: Exception) -> str:
    """sbatch's own words from a failed submission, on one line."""
    text = getattr(exc, "stderr", None) or getattr(exc, "output", None) or str(exc)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return " ".join((errors or lines or [type(exc).__name__])[-2:])[:300]


def wait(job, progress: Callable[[], tuple[int, int]] | None, unit: str, stage: str) -> None:
    """Until the job is done: a bar of `progress` (rate and ETA from the work it finishes), else its state."""
    from tqdm import tqdm
    bar = None
    if progress is not None:
        done, total = progress()
        bar = tqdm(total=total, initial=done, unit=unit, desc=f"{stage} (job {job.job_id})", dynamic_ncols=True,
                   smoothing=0.05)
    state = None
    while not job.done():
        if bar is not None:
            bar.update(progress()[0] - bar.n)
        else:
            now = job.state
            if now != state:
                print(f"{stage}: job {job.job_id} {now}", file=sys.stderr)
                state = now
        time.sleep(POLL_SECONDS)
    if bar is not None:
        bar.update(progress()[0] - bar.n)
        bar.close()
