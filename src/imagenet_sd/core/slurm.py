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

A task is a submitit `Checkpointable`: at the time limit or on preemption Slurm signals it,
submitit requeues the same call, and the stage resumes from its finished shards or its last
training state. `IMAGENET_SD_SUBMITIT_CLUSTER=local` (tests only) runs the job with
submitit's local executor: the tasks are local processes, and no Slurm is needed.

Docs: docs/cluster.md
"""
from __future__ import annotations

import os
import runpy
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.params import Params

CLUSTER_ENV = "IMAGENET_SD_SUBMITIT_CLUSTER"    # "local": submitit's local executor (tests; no Slurm)
IN_JOB_ENV = "IMAGENET_SD_IN_JOB"               # set in the job's tasks: run the stage, do not submit it
POLL_SECONDS = 5.0


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
    """submitit's parameters of the job (the slurm_* ones are ignored by the local executor).
    `one_gpu`: a stage that runs one process (clip-filter, clip-tune, the evaluations)."""
    s = params.slurm
    nodes, gpus = (1, 1) if one_gpu else (s.nodes, s.gpus_per_node)
    settings = dict(name=f"imagenet-sd-{stage}", nodes=nodes, tasks_per_node=gpus,
                    cpus_per_task=s.cpus_per_task, timeout_min=s.time_min)
    if cluster() == "slurm":
        settings.update(gpus_per_node=gpus, slurm_signal_delay_s=120)
        settings.update({f"slurm_{key}": value for key, value in sbatch_fields(s).items()})
        if s.extra:
            settings["slurm_additional_parameters"] = dict(s.extra)
    return settings


def describe(params: Params, stage: str, argv: list[str]) -> list[str]:
    """The dry run's lines: the job it would submit."""
    s = params.slurm
    where = ", ".join(f"{k} {v}" for k, v in sbatch_fields(s).items()) or "the defaults"
    extra = " ".join(f"--{k}" if v is True else f"--{k}={v}" for k, v in s.extra.items())
    return [f"slurm job: imagenet-sd-{stage}, {s.nodes} node(s) x {s.gpus_per_node} GPU(s) = {s.tasks} task(s), "
            f"{s.cpus_per_task} CPUs a task, time limit {s.time_min} min (requeued at it), {where}"
            + (f", {extra}" if extra else ""),
            f"each task runs: {shlex.join([sys.executable, *argv])} (in {Path.cwd()})",
            f"logs: {s.log_dir / stage}"]


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
    import submitit

    from imagenet_sd.core.cli import ERROR_FILE_ENV
    folder = params.slurm.log_dir / stage
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster())
    executor.update_parameters(**job_settings(params, stage, one_gpu))
    error_file = folder / f"error-{os.getpid()}-{time.time_ns()}"
    env = {ERROR_FILE_ENV: str(error_file), "PYTHONUNBUFFERED": "1"}
    job = executor.submit(StageTask(), [sys.argv[0], *sys.argv[1:]], str(Path.cwd()), env)
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
