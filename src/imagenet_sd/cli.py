"""What every stage entry point shares: load params, turn `UserError` into one line.

A stage script is `run_stage(main)` where `main(params, args)` does the work.
Bad input exits with status 2 and a single line on stderr; nothing else is
printed, so the message is what the user sees at the bottom of `dvc repro`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from . import params as params_module
from .errors import UserError


def run_stage(main: Callable[[params_module.Params, argparse.Namespace], None],
              parser: argparse.ArgumentParser) -> None:
    args = parser.parse_args()
    try:
        params = params_module.load(args.params)
        main(params, args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    return parser
