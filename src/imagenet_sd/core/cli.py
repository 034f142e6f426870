"""What every stage entry point shares: load params, turn `UserError` into one line.

A stage script is `run_stage(main)` where `main(params, args)` does the work.
Bad input exits with status 2 and a single line on stderr; nothing else is
printed, so the message is what the user sees at the bottom of `dvc repro`.
That holds under `distributed.relaunch` too: a worker hands its message to the
launcher, which prints it once (see `ERROR_FILE_ENV`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from imagenet_sd.core import lifetime
from imagenet_sd.core import params as params_module
from imagenet_sd.core.errors import UserError

# Set by distributed.relaunch for its torchrun workers: the file where a worker leaves
# its UserError's message for the launcher, instead of printing it (one line per rank,
# followed by torchrun's traceback of the failed worker).
ERROR_FILE_ENV = "IMAGENET_SD_ERROR_FILE"


def run_stage(main: Callable[[params_module.Params, argparse.Namespace], None],
              parser: argparse.ArgumentParser) -> None:
    if "TORCHELASTIC_RUN_ID" in os.environ:      # a torchrun worker: it ends with torchrun's agent
        lifetime.die_with_parent()
    args = parser.parse_args()
    try:
        params = params_module.load(args.params)
        main(params, args)
    except UserError as exc:
        if not _hand_to_launcher(str(exc)):
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _hand_to_launcher(message: str) -> bool:
    """Leave `message` for relaunch's launcher if this is one of its workers; the first rank's wins."""
    target = os.environ.get(ERROR_FILE_ENV)
    if not target:
        return False
    # Written beside it, then linked into place: the launcher never reads half a message,
    # and a link fails where another rank's message is already there.
    draft = Path(f"{target}.{os.getpid()}")
    draft.write_text(message)
    try:
        os.link(draft, target)
    except FileExistsError:
        pass
    finally:
        draft.unlink()
    return True


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    return parser
