"""Every DVC stage depends on each module of src/imagenet_sd/ its script imports, however indirectly,
and on no other: scripts/dvc_deps.py writes those lines from the imports, and this checks them.

A module missing from a stage's deps is a change DVC does not see: the stage's old
result (or its run-cache entry) would be reused after that module changed. A module
it does not import re-runs it for nothing.
"""
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import dvc_deps  # noqa: E402

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_are_its_script_and_every_module_it_imports(stage):
    scripts = re.findall(r"stages/\w+\.py", STAGES[stage]["cmd"])
    assert len(scripts) == 1, f"dvc.yaml: the cmd of stage {stage} should run one stages/<name>.py script"
    deps = STAGES[stage]["deps"]
    assert scripts[0] in deps, f"dvc.yaml: stage {stage} should depend on its script {scripts[0]}"
    needed = dvc_deps.code_deps(scripts[0])
    assert any("imagenet_sd" in n for n in needed), f"found no import of imagenet_sd in {scripts[0]}"
    listed = [d for d in deps if d.startswith("src/")]
    missing, extra = sorted(set(needed) - set(listed)), sorted(set(listed) - set(needed))
    fix = "; run `python scripts/dvc_deps.py`"
    assert not missing, f"dvc.yaml: stage {stage} runs code its deps lack: {', '.join(missing)}{fix}"
    assert not extra, f"dvc.yaml: stage {stage} depends on code its script does not import: {', '.join(extra)}{fix}"


def test_the_written_deps_are_current():
    _, changed = dvc_deps.rewritten((ROOT / "dvc.yaml").read_text())
    assert not changed, f"dvc.yaml: stale code deps in {', '.join(changed)}; run `python scripts/dvc_deps.py`"


def test_the_writer_follows_function_level_imports_and_keeps_other_lines(tmp_path, monkeypatch):
    src = tmp_path / "src" / "pkg"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "a.py").write_text("def f():\n    from pkg import b\n")
    (src / "b.py").write_text("")
    (src / "c.py").write_text("")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "s.py").write_text("from pkg import a\n")
    monkeypatch.setattr(dvc_deps, "ROOT", tmp_path)
    monkeypatch.setattr(dvc_deps, "SRC", tmp_path / "src")
    text = ("stages:\n  s:\n    cmd: python stages/s.py\n    deps:\n      - stages/s.py\n"
            "      - src/pkg/c.py\n      - data/x       # a comment\n")
    out, changed = dvc_deps.rewritten(text)
    assert changed == ["s"]
    assert out == ("stages:\n  s:\n    cmd: python stages/s.py\n    deps:\n      - stages/s.py\n"
                   "      - src/pkg/__init__.py\n      - src/pkg/a.py\n      - src/pkg/b.py\n"
                   "      - data/x       # a comment\n")
    assert dvc_deps.rewritten(out) == (out, [])
