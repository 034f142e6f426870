"""The commands the docs give exist, and take the arguments the docs give them (README.md, docs/*.md).

Every command line of a fenced block (bash, sh, console or unmarked; `\\` continuations joined, a `$ `
prompt dropped) and every inline code span that starts with one of COMMAND_WORDS is checked in one of
three ways, none of which trains, generates, downloads or needs a GPU:

- run, the cheap ones, for real: `python -m imagenet_sd.experiments queue ... --dry-run` (reads the
  experiments through `dvc exp show --json`, queues nothing), `bash scripts/gpu_check.sh ...` with
  `--dry-run` added (prints each part's command line, runs none), and `--help` of every stage script
  (stages/*.py) and of every script and module the docs run with python;
- parse, every other `python <script>`, `python -m <module>`, `dvc ...` and `hf ...` line: the command's
  own parser reads the line (argparse, stopped as soon as it has parsed; DVC's parser; hf's click with
  `--help`), so the script, the subcommand and every option must exist, and nothing runs;
- exists: `bash scripts/setup.sh`, `torchrun ... <script>` and `python -m <module>` name a file or module that
  exists; and the first word of every line of a ```bash block is installed (`huggingface-cli`, which
  huggingface_hub no longer ships, is not).

Other lines (pytest, mkdocs, which tests/test_docs.py builds, `python -c`, `source`) are left out. The CLIs run
in this process (each new interpreter would pay seconds of torch imports): about 3 s in all. Last, the
Quick start's sentence on CI (docs/setup.md) is checked against what .ci/run runs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE_LANGUAGES = {"", "bash", "sh", "shell", "console"}
PYTHON = {"python", "python3", ".venv/bin/python"}
COMMAND_WORDS = PYTHON | {"dvc", ".venv/bin/dvc", "hf", ".venv/bin/hf", "bash", "torchrun"}
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
OPTIONAL = re.compile(r" \[(-[^\]]*)\]")
# Lines the docs give that are known not to work, and whose page is someone else's to fix: each must still
# fail (a fixed one must leave this list). command -> why.
KNOWN_BROKEN: dict[str, str] = {}


@dataclass(frozen=True)
class Command:
    where: str                 # page:line
    argv: tuple[str, ...]
    inline: bool = False       # from a code span in prose, where `python -m x` alone may just name the command
    fence: str | None = None   # the fenced block's language

    def __str__(self) -> str:
        return " ".join(self.argv)


def page_lines(path: Path) -> list[tuple[int, str, bool, str | None]]:
    """(line number, text, inline, fence language) of the command-like lines of a page: fenced shell lines and
    inline code spans.
    An optional part written `[--device cuda]` is checked as given (brackets dropped)."""
    found, fence, pending = [], None, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = OPTIONAL.sub(r" \1", line)
        if line.lstrip().startswith("```"):
            fence = line.strip()[3:].strip() if fence is None else None
            continue
        if fence is None:
            found += [(number, span, True, None) for span in INLINE.findall(line)]
        elif fence in FENCE_LANGUAGES:
            text = line.strip()
            if pending is not None:
                (start, before), pending = pending, None
                number, text = start, f"{before} {text}"
            if text.endswith("\\"):
                pending = (number, text[:-1].rstrip())
                continue
            found.append((number, text.removeprefix("$ "), False, fence))
    return found


def commands(every: bool = False) -> list[Command]:
    """The lines that start with one of COMMAND_WORDS (every: all lines that split as a shell would)."""
    found = []
    for path in PAGES:
        for number, text, inline, fence in page_lines(path):
            for part in text.split("&&"):
                try:
                    argv = shlex.split(part, comments=True)
                except ValueError:          # prose with an apostrophe, not a command
                    continue
                while argv and ASSIGNMENT.match(argv[0]):
                    argv = argv[1:]         # HF_HUB_OFFLINE=1 PYTHONPATH=src python ...
                if argv and (every or len(argv) > 1 and argv[0] in COMMAND_WORDS and "..." not in argv):
                    found.append(Command(f"{path.relative_to(ROOT)}:{number}", tuple(argv), inline, fence))
    return found


def unique(found: list[Command]) -> dict[tuple[str, ...], Command]:
    """One check a distinct command line, the first place it is given."""
    out: dict[tuple[str, ...], Command] = {}
    for command in found:
        out.setdefault(command.argv, command)
    return out


def is_python(c: Command) -> bool:
    return c.argv[0] in PYTHON and c.argv[1] not in ("-c",) and c.argv[1:3] != ("-m", "pytest")


def target(c: Command) -> tuple[str, str, list[str]]:
    """("module" | "script", its name or path, its arguments) of a python command line."""
    if c.argv[1] == "-m":
        return "module", c.argv[2], list(c.argv[3:])
    return "script", c.argv[1], list(c.argv[2:])


# ---------------------------------------------------------------------------------------- running CLIs in-process

class Parsed(Exception):
    """Raised instead of returning from the outermost argparse parse: the command line parsed; nothing ran."""


@contextlib.contextmanager
def in_process(argv0: str, argv: list[str], stop_after_parsing: bool):
    """sys.argv, the working directory, the environment, sys.path and torch's threads as a command run from the
    repository root would have them, restored afterwards; argparse stopped once it has parsed when asked."""
    import torch
    saved = sys.argv, Path.cwd(), dict(os.environ), list(sys.path), torch.get_num_threads()
    originals = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    depth = [0]

    def stopping(original):
        def parse(self, args=None, namespace=None):
            depth[0] += 1
            try:
                result = original(self, args, namespace)
            finally:
                depth[0] -= 1
            if depth[0] == 0:     # the script's own call, not parse_args' call of parse_known_args or a subparser's
                raise Parsed(result)
            return result
        return parse

    sys.argv = [argv0, *argv]
    os.chdir(ROOT)
    # As after `source .venv/bin/activate` (the docs' commands call dvc), offline.
    os.environ.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", PYTHONPATH=str(ROOT / "src"),
                      PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if stop_after_parsing:
        argparse.ArgumentParser.parse_args = stopping(originals[0])
        argparse.ArgumentParser.parse_known_args = stopping(originals[1])
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = originals
        sys.argv, cwd, environ, sys.path[:], threads = saved
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)


def run_python(kind: str, name: str, argv: list[str], stop_after_parsing: bool) -> tuple[int, str]:
    """Exit status and output of `python <script> argv` / `python -m <module> argv` run here."""
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            with in_process(name, argv, stop_after_parsing):
                if kind == "module":
                    runpy.run_module(name, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(str(ROOT / name), run_name="__main__")
            if stop_after_parsing:
                code, _ = 1, out.write("it did not parse its arguments with argparse, so it ran: "
                                       "give it a `--help`-only check instead")
        except Parsed:
            code = 0
        except SystemExit as exc:            # sys.exit(main()), argparse's --help (0) and its errors (2)
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            if not isinstance(exc.code, (int, type(None))):
                out.write(str(exc.code))
        except Exception as exc:         # noqa: BLE001 - any failure is the finding
            code = 1
            out.write(f"{type(exc).__name__}: {exc}")
    return code, out.getvalue()


def parse_dvc(argv: list[str]) -> tuple[int, str]:
    """DVC's own parser reads the line; it logs what is wrong (logger dvc) and raises DvcParserError."""
    import logging

    from dvc.cli import parse_args
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logging.getLogger("dvc").addHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            parse_args(argv)
    except SystemExit as exc:
        return (exc.code or 0), out.getvalue()
    except Exception as exc:             # noqa: BLE001 - DvcParserError
        return 1, f"{out.getvalue()}{type(exc).__name__}: {exc}"
    finally:
        logging.getLogger("dvc").removeHandler(handler)
    return 0, out.getvalue()


def parse_hf(argv: list[str]) -> tuple[int, str]:
    """hf's own click command, with --help: it parses every option (an unknown one is an error) and then prints
    the help of the (sub)command instead of running it."""
    import click
    from huggingface_hub.cli.hf import app
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            app.main(args=[*argv, "--help"], prog_name="hf", standalone_mode=False)
        except click.ClickException as exc:
            return 2, f"{type(exc).__name__}: {exc.format_message()}"
        except SystemExit as exc:
            return (exc.code or 0), out.getvalue()
    return 0, out.getvalue()


# --------------------------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def documented() -> dict[tuple[str, ...], Command]:
    found = unique(commands())
    words = {c.argv[0] for c in found.values()}
    assert {"python", "dvc", "bash"} <= words, f"the scan found too little ({sorted(words)}): is it broken?"
    return found


def check(results: list[tuple[Command, int, str]]) -> None:
    bad, fixed = [], []
    for command, code, output in results:
        known = KNOWN_BROKEN.get(str(command))
        if code and command.inline and "the following arguments are required" in output:
            continue    # prose naming a command (`dvc plots`, `python -m x`), not a line to run; --help checks x
        if code and not known:
            bad.append(f"{command.where}: `{command}` exits {code}:\n    {output.strip()[-800:]}")
        elif known and not code:
            fixed.append(f"{command.where}: `{command}` works now: take it out of KNOWN_BROKEN")
    assert not bad and not fixed, "\n".join(bad + fixed)


def test_documented_python_commands_parse(documented):
    results = []
    for command in documented.values():
        if is_python(command) and not cheap_to_run(command):
            kind, name, argv = target(command)
            results.append((command, *run_python(kind, name, argv, stop_after_parsing=True)))
    assert len(results) >= 10, [str(c) for c, _, _ in results]
    check(results)


def test_documented_dvc_and_hf_commands_parse(documented):
    results = []
    for command in documented.values():
        if command.argv[0] in ("dvc", ".venv/bin/dvc"):
            results.append((command, *parse_dvc(list(command.argv[1:]))))
        elif command.argv[0] in ("hf", ".venv/bin/hf"):
            results.append((command, *parse_hf(list(command.argv[1:]))))
    assert sum(c.argv[0] == "hf" for c, _, _ in results) >= 2, "the docs' hf lines were not found"
    assert len(results) >= 20, [str(c) for c, _, _ in results]
    check(results)


SHELL_BUILTINS = {"source", ".", "cd", "export", "set", "echo"}
# Programs of other machines that the docs may show in a bash block (a Slurm cluster, a GPU node, a new Debian
# machine's administrator): not installed where the tests run, and not this repository's to install.
OTHER_MACHINES = {"sbatch", "srun", "squeue", "scancel", "sacct", "sinfo", "nvidia-smi", "sudo", "apt-get", "ssh",
                  "scp", "rsync"}


def test_every_command_of_a_bash_block_is_installed():
    """A ```bash block holds commands only: the first word of each line is a shell builtin, a file of the
    repository (.venv/bin/mkdocs) or a program on the PATH of the activated environment (.venv/bin first):
    `huggingface-cli`, gone from huggingface_hub (now `hf`), fails here."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    missing = [f"{c.where}: {c.argv[0]}" for c in commands(every=True) if c.fence == "bash"
               and c.argv[0] not in SHELL_BUILTINS | OTHER_MACHINES and not (ROOT / c.argv[0]).is_file()
               and not shutil.which(c.argv[0], path=path)]
    assert not missing, f"the docs' bash blocks run commands that are not installed: {missing}"


def test_files_the_docs_run_exist(documented):
    missing = []
    for command in documented.values():
        scripts = [a for a in command.argv[1:] if re.fullmatch(r"(scripts|stages)/[\w.-]+\.(py|sh)", a)]
        modules = [command.argv[2]] if is_python(command) and command.argv[1] == "-m" else []
        missing += [f"{command.where}: {s}" for s in scripts if not (ROOT / s).is_file()]
        missing += [f"{command.where}: module {m}" for m in modules if not module_exists(m)]
    assert not missing, f"the docs run scripts or modules that do not exist: {missing}"


def module_exists(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def cheap_to_run(command: Command) -> bool:
    """The allow-list of documented lines run for real (each well under a few seconds, no side effects)."""
    if is_python(command):
        kind, name, argv = target(command)
        return kind == "module" and name == "imagenet_sd.experiments" and argv[:1] == ["queue"] and "--dry-run" in argv
    return command.argv[:2] == ("bash", "scripts/gpu_check.sh")


def test_documented_dry_runs_run(documented):
    results = []
    for command in documented.values():
        if not cheap_to_run(command):
            continue
        if command.argv[0] == "bash":
            argv = [*command.argv, *([] if "--dry-run" in command.argv else ["--dry-run"])]
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
            results.append((command, done.returncode, done.stdout + done.stderr))
        else:
            _, name, argv = target(command)
            results.append((command, *run_python("module", name, argv, stop_after_parsing=False)))
    assert any(c.argv[0] == "bash" for c, _, _ in results) and any(c.argv[0] != "bash" for c, _, _ in results), \
        f"expected gpu_check.sh and a queue --dry-run among the docs' commands: {[str(c) for c, _, _ in results]}"
    check(results)


def test_help_of_every_stage_script_and_documented_cli(documented):
    targets = {("script", p.relative_to(ROOT).as_posix()) for p in (ROOT / "stages").glob("*.py")}
    targets |= {target(c)[:2] for c in documented.values() if is_python(c)}
    results = []
    for kind, name in sorted(targets):
        code, output = run_python(kind, name, ["--help"], stop_after_parsing=True)
        if code == 0 and "usage:" not in output:
            code, output = 1, f"--help printed no usage:\n{output[-500:]}"
        results.append((Command(name, ("python", *(["-m"] if kind == "module" else []), name, "--help")), code, output))
    check(results)


NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


def test_setup_page_says_which_quick_start_commands_ci_runs():
    """docs/setup.md: "CI (`.ci/run`, ...) runs the first three": the first n commands of its Quick start
    block, in that order, are exactly .ci/run's commands."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith(("#", "set ", "cd ", "export "))]   # settings, not commands
    page = (ROOT / "docs" / "setup.md").read_text()
    block = page[page.index("## Quick start"):].split("```")[1].splitlines()[1:]
    quick = [shlex.join(shlex.split(line, comments=True)) for line in block if line.strip()]
    said = re.search(r"CI \(`\.ci/run`[^)]*\) runs the first (\w+)", page)
    assert said, "docs/setup.md no longer says which Quick start commands CI runs (\"CI (`.ci/run`, ...) runs the first N\")"
    n = NUMBERS.get(said.group(1))
    assert n is not None and quick[:n] == [shlex.join(shlex.split(c)) for c in ci], (
        f"docs/setup.md says CI runs the first {said.group(1)} Quick start commands {quick[:n]}, "
        f".ci/run runs {ci}: make the page say what .ci/run does")
