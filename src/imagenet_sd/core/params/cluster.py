"""Where the GPU stages run: the profile's `launcher` and its `slurm` block (core/slurm.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imagenet_sd.core.errors import param_error
from imagenet_sd.core.params.reader import Section, expanded, keys_of

LAUNCHERS = ("local", "slurm")


@dataclass(frozen=True)
class SlurmParams:
    """The profile's `slurm` block: the job sd-generate and train-resnet50 submit with `launcher: slurm`
    (core/slurm.py; docs/cluster.md). One task a GPU, `gpus_per_node` of them on each of `nodes`."""
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    mem: str                # per node, Slurm's syntax (480G); '' = the partition's default
    time_min: int           # the job's time limit; a job that reaches it is requeued and resumes
    partition: str
    account: str
    qos: str
    constraint: str
    extra: dict             # more sbatch options, {name: value} (e.g. {exclusive: true})
    log_dir: Path           # submitit's folder: each job's pickles, stdout and stderr
    wait: bool              # false: submit and return (the stage exits 1 saying so; run it again later)
    # false: the job asks for no GPU and its tasks run on CPUs (a CPU partition; the embedded profiles).
    request_gpus: bool = True

    @property
    def tasks(self) -> int:
        return self.nodes * self.gpus_per_node


# Slurm may signal a job up to a minute before its limit's signal delay (core/slurm.py): a 1-minute job is
# signalled as its tasks start.
MIN_TIME_MIN = 2


def _time_min(s: Section) -> int:
    value = s.number("time_min", int, low=1)
    if value < MIN_TIME_MIN:
        raise param_error(s.path("time_min"), value, f"an integer >= {MIN_TIME_MIN}: Slurm may signal a job up to a "
                          "minute early, so a 1-minute job is signalled as its tasks start and requeued without end")
    return value


def parse_slurm(s: Section) -> SlurmParams:
    s.no_unknown_keys(keys_of(SlurmParams))
    extra = s.get("extra")
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise param_error(s.path("extra"), extra, "a mapping of sbatch option names to values, e.g. {exclusive: true}")
    log_dir = s.text("log_dir")
    if not log_dir.strip():
        raise param_error(s.path("log_dir"), log_dir, "a folder on a file system the compute nodes share")
    return SlurmParams(
        nodes=s.number("nodes", int, low=1), gpus_per_node=s.number("gpus_per_node", int, low=1),
        cpus_per_task=s.number("cpus_per_task", int, low=1), mem=s.text("mem").strip(),
        time_min=_time_min(s), partition=s.text("partition").strip(),
        account=s.text("account").strip(), qos=s.text("qos").strip(), constraint=s.text("constraint").strip(),
        extra=dict(extra), log_dir=expanded(log_dir), wait=s.flag("wait"), request_gpus=s.flag("request_gpus"))
