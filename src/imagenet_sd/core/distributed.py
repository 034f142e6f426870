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
import selectors
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from imagenet_sd.core import lifetime
from imagenet_sd.core.cli import ERROR_FILE_ENV
from imagenet_sd.core.errors import UserError

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

    def broadcast(self, value):
        """The main rank's `value`, on every rank (the others pass anything)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

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

    A failing worker makes torchrun stop the others. Bad input a worker meets comes back
    as a UserError raised here, so the stage ends with the one line and exit status 2 of
    a single process: the worker leaves its message in a file (cli.ERROR_FILE_ENV) and
    exits quietly, and from then on the output (torchrun's report of a failed worker,
    the other ranks' complaints) is dropped. Other failures keep all of torchrun's output.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", sys.argv[0], *sys.argv[1:]]
    # Only named here: the file exists once a worker has written it, so a launcher killed
    # outright leaves nothing behind.
    error_file = Path(tempfile.gettempdir()) / f"imagenet-sd-error-{uuid.uuid4().hex}"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        with subprocess.Popen(command, env={**os.environ, ERROR_FILE_ENV: str(error_file)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=lifetime.die_with(os.getpid())) as process:
            mid_line = _forward(process, error_file)
        if error_file.is_file():
            if mid_line:        # a progress bar the worker left open: the message gets a line of its own
                sys.stderr.write("\n")
            raise UserError(error_file.read_text())
    finally:
        error_file.unlink(missing_ok=True)
    return process.returncode


def _forward(process: subprocess.Popen, error_file: Path) -> bool:
    """Copy the workers' stdout and stderr through until `error_file` appears; read, and drop, the rest.

    Chunks as they come, not lines: progress bars redraw their line with \\r. True if
    what went to stderr does not end with a newline.
    """
    targets = {process.stdout: sys.stdout.buffer, process.stderr: sys.stderr.buffer}
    mid_line = False
    with selectors.DefaultSelector() as selector:
        for pipe in targets:
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                elif not error_file.exists():
                    targets[key.fileobj].write(chunk)
                    targets[key.fileobj].flush()
                    if key.fileobj is process.stderr:
                        mid_line = not chunk.endswith(b"\n")
    return mid_line
