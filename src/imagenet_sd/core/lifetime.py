"""Processes that end with the process that started them, however it dies (Linux's PR_SET_PDEATHSIG).

torchrun starts its workers in sessions of their own, so nothing else reaches them when their
launcher or torchrun's agent is SIGKILLed (a killed `dvc repro`, an OOM kill): without this they
would go on computing, holding GPUs and shard locks. Elsewhere than Linux these do nothing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def die_with_parent() -> None:
    """A torchrun worker ends when torchrun's agent, which started it, dies (cli.run_stage calls this first).

    torchrun starts each worker in a session of its own, so a SIGKILLed agent (an OOM kill, a
    `kill -9`) would otherwise leave its workers computing, holding GPUs and shard locks, with
    nobody to report to. SIGKILL: a worker has nothing to save (shards are written atomically,
    training states by rename). Linux's PR_SET_PDEATHSIG; elsewhere nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    die_with(os.getppid(), signal_number=9)()
    # Started by torchrun, but the agent may have died before the signal was armed: then the
    # parent is whoever adopted this process (init, a subreaper), and the worker ends now.
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return
    if b"torch" not in parent:          # torchrun, python -m torch.distributed.run (or .launch)
        os._exit(1)


def die_with(launcher: int, signal_number: int = 15):
    """For Popen's preexec_fn: the child gets `signal_number` (SIGTERM) when `launcher` dies, however it dies.

    torchrun's agent stops its workers on SIGTERM (they run in sessions of their own, so nothing
    else reaches them): without this, a SIGKILLed launcher (a killed `dvc repro`, an OOM kill)
    would leave every worker computing. Linux's PR_SET_PDEATHSIG; elsewhere nothing.
    """
    def arm() -> None:
        import ctypes
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal_number)       # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != launcher:           # the launcher died before the signal was armed
            os._exit(1)
    return arm if sys.platform.startswith("linux") else None
