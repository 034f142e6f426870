"""One process per GPU under torchrun, or a single process; the same code runs in both.

`processes > 1` in params makes the stage re-launch itself under torchrun
(`python -m torch.distributed.run --standalone`); a user who starts torchrun
themselves (several nodes, a cluster scheduler) is detected by torchrun's
environment variables and not re-launched. The ranks talk over gloo, which runs
on CPUs and GPUs alike and only carries a few small lists here; the images never
travel between processes, each rank writes its own shards.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

# A rank waits at the final barrier while the others finish their last shard, which at
# ImageNet scale can take far longer than gloo's default 30 minutes.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's GPU when there are several on the node."""
        if device.type == "cuda" and self.world > 1:
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return device

    def all_gather(self, value):
        """Every rank's `value`, in rank order."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


SINGLE = Context(rank=0, world=1, local_rank=0)     # no torchrun: one process


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def start(backend: str = "gloo") -> Context:
    """Join the process group when launched by torchrun; a one-process context otherwise.

    gloo for coordination and CPU training; training on GPUs asks for nccl.
    """
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    return Context(rank=dist.get_rank(), world=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def relaunch(processes: int) -> int:
    """Run this same command again under torchrun with `processes` workers; their exit status.

    The workers print their own errors; a failing worker makes torchrun stop the others.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", sys.argv[0], *sys.argv[1:]]
    return subprocess.run(command).returncode
