#!/usr/bin/env python
"""Writes each DVC stage's code dependencies in dvc.yaml from its script's imports.

    python scripts/dvc_deps.py           # rewrite the src/ deps of every stage in dvc.yaml
    python scripts/dvc_deps.py --check   # exit 1 and name the stages whose deps are stale

A stage's code deps are its script and every module of src/imagenet_sd/ the script
imports, however indirectly (function-level imports too), read with `ast` without
importing anything. Modules, not folders: a folder dep would also hash __pycache__ and
re-run a stage for an unrelated module beside its own. Only the `- src/...` lines of
each stage are rewritten; its data deps, comments and everything else stay as written.
tests/test_dvc_deps.py runs the check. Docs: docs/layout.md#extending.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DVC_YAML = ROOT / "dvc.yaml"
STAGE = re.compile(r"^  ([\w-]+):\s*$")
SRC_DEP = re.compile(r"^      - src/\S+\.py\s*$")
SCRIPT_DEP = re.compile(r"^      - (stages/\w+\.py)\s*$")


def module_file(name: str) -> Path | None:
    """The file that defines module `name` (dotted) under src/, or None if it is not one of ours."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def loaded_by(name: str) -> set[Path]:
    """Files that `import name` runs: the module and every package above it."""
    parts = name.split(".")
    files = (module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1))
    return {f for f in files if f is not None}


def imports(path: Path) -> set[Path]:
    """Files of src/ that the code in `path` imports directly, anywhere in it."""
    found, package = set(), []
    if path.is_relative_to(SRC):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = [p for p in (parts if parts[-1] == "__init__" else parts[:-1]) if p != "__init__"]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found |= loaded_by(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:          # relative: only inside the package
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            found |= loaded_by(base)
            for alias in node.names:     # `from . import a`, `from imagenet_sd import a`: a may be a module
                found |= loaded_by(f"{base}.{alias.name}")
    return found


def closure(script: Path) -> set[Path]:
    """Every file of src/ that running `script` may import."""
    seen, todo = set(), [script]
    while todo:
        for path in imports(todo.pop()) - seen:
            seen.add(path)
            todo.append(path)
    return seen


def code_deps(script: str) -> list[str]:
    """The src/ deps of a stage that runs `script` (a path relative to the repository), sorted."""
    return sorted(str(f.relative_to(ROOT)) for f in closure(ROOT / script))


def rewritten(text: str) -> tuple[str, list[str]]:
    """dvc.yaml's text with every stage's src/ deps from its script's imports; and the stages that changed."""
    lines, out, changed = text.splitlines(keepends=True), [], []
    stage, i = None, 0
    while i < len(lines):
        line = lines[i]
        if m := STAGE.match(line):
            stage = m.group(1)
        out.append(line)
        i += 1
        if stage and (m := SCRIPT_DEP.match(line)):
            old = []
            while i < len(lines) and SRC_DEP.match(lines[i]):
                old.append(lines[i].strip()[2:])
                i += 1
            new = code_deps(m.group(1))
            out.extend(f"      - {dep}\n" for dep in new)
            if old != new:
                changed.append(stage)
    return "".join(out), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a stage's deps are stale")
    args = parser.parse_args(argv)
    text, changed = rewritten(DVC_YAML.read_text())
    if args.check:
        if changed:
            print(f"dvc.yaml: the code deps of {', '.join(changed)} differ from their scripts' imports; "
                  "run `python scripts/dvc_deps.py`", file=sys.stderr)
        return 1 if changed else 0
    if changed:
        DVC_YAML.write_text(text)
    print(f"dvc.yaml: {len(changed)} stage(s) rewritten{': ' + ', '.join(changed) if changed else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
