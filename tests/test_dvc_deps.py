"""Every DVC stage depends on each module of src/imagenet_sd/ its script imports, however indirectly.

A module missing from a stage's deps is a change DVC does not see: the stage's old
result (or its run-cache entry) would be reused after that module changed. The imports
are read with `ast`, without importing anything, function-level imports included.
"""
import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "imagenet_sd"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


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
    found = set()
    if path.is_relative_to(SRC):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts if parts[-1] == "__init__" else parts[:-1]
        package = [p for p in package if p != "__init__"]
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
    seen, todo = set(), [script]
    while todo:
        for path in imports(todo.pop()) - seen:
            seen.add(path)
            todo.append(path)
    return seen


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep.rstrip("/") or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_its_script_and_every_module_it_imports(stage):
    scripts = re.findall(r"stages/\w+\.py", STAGES[stage]["cmd"])
    assert len(scripts) == 1, f"dvc.yaml: the cmd of stage {stage} should run one stages/<name>.py script"
    script = ROOT / scripts[0]
    needed = [scripts[0]] + sorted(str(f.relative_to(ROOT)) for f in closure(script))
    assert any(PACKAGE in n for n in needed), f"found no import of {PACKAGE} in {scripts[0]}"
    deps = STAGES[stage]["deps"]
    missing = [n for n in needed if not covered(n, deps)]
    assert not missing, (f"dvc.yaml: stage {stage} runs code its deps lack, so a change to it would not "
                         f"re-run the stage; add to its deps: {', '.join(missing)}")
    folders = [d for d in deps if d.startswith("src/") and not d.endswith(".py")]
    assert not folders, (f"dvc.yaml: stage {stage} depends on a source folder, whose __pycache__ would re-run it; "
                         f"name its modules instead: {', '.join(folders)}")
    extra = [d for d in deps if d.startswith("src/") and d.endswith(".py") and d not in needed]
    assert not extra, (f"dvc.yaml: stage {stage} depends on code its script does not import, so a change to it "
                       f"re-runs the stage for nothing; remove from its deps: {', '.join(extra)}")
