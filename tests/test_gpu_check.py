"""scripts/gpu_check.sh: its plumbing, checked on a CPU so that a GPU session does not lose its time to a typo.

Every part's command line, in both modes, is parsed by its benchmark's own argument parser
(in this process, with CUDA made to look present for the GPU lines); one part runs for real in
smoke mode through the script, its status line and the row formatter; the others are skipped
(`--parts`). The whole smoke run, every benchmark at tiny sizes (~40 s), is
`bash scripts/gpu_check.sh --smoke`.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TITLES = {"generate": "### sd-generate", "train": "### train-resnet50: training step",
          "loader": "### train-resnet50: data loader", "loop": "### train-resnet50: whole training loop",
          "probe": "### eval-transfer"}


def sections(text: str) -> dict[str, str]:
    parts = {}
    for name, title in TITLES.items():
        assert title in text, f"no section for {name}"
        start = text.index(title)
        end = text.find("\n### ", start + 1)
        parts[name] = text[start:end if end >= 0 else len(text)]
    return parts


def data_rows(section: str) -> list[list[str]]:
    """Cells of the markdown rows below each table's |---| line."""
    rows, in_table = [], False
    for line in section.splitlines():
        if line.startswith("|---"):
            in_table = True
        elif in_table and line.startswith("| "):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        else:
            in_table = False
    return rows


def dry_run(out: Path, *options: str) -> list[list[str]]:
    """Each selected part's [name, limit, script, args...] as `gpu_check.sh --dry-run` prints it."""
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", *options], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "GPU_CHECK_OUT": str(out)})
    assert result.returncode == 0, result.stderr
    return [line.split() for line in result.stdout.splitlines()]


def benchmark(script: str, monkeypatch):
    """scripts/<name>.py as a module (each has parse_args(argv)), registered for this test only."""
    spec = importlib.util.spec_from_file_location(f"gpu_check_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)      # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["gpu", "smoke"])
def test_every_parts_command_line_is_accepted_by_its_benchmark(mode, tmp_path, monkeypatch):
    parts = dry_run(tmp_path, *(["--smoke"] if mode == "smoke" else []))
    assert [p[0] for p in parts] == list(TITLES)
    if mode == "gpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, limit, script, *args in parts:
        assert int(limit) > 0 and args[-2:] == ["--json", str(tmp_path / f"{name}.json")]
        try:
            benchmark(script, monkeypatch).parse_args(args)
        except (SystemExit, Exception) as exc:     # argparse exits; some benchmarks raise a usage error
            pytest.fail(f"{name}: {script} rejects the {mode} command line of scripts/gpu_check.sh: {exc!r}")


def test_unknown_part_is_a_usage_error():
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--parts", "generate,nope"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no part 'nope'" in result.stderr


@pytest.mark.slow
def test_smoke_run_of_one_part_prints_its_rows_and_skips_the_rest(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", "--parts", "generate"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    parts = sections(result.stdout)
    assert "generate: finished" in parts["generate"]
    generate = data_rows(parts["generate"])
    assert not any("failed" in cell for row in generate for cell in row), parts["generate"]
    # The smoke walk: baseline, classic attention, channels_last, batch 2; each with its stage-loop figure.
    assert [row[1] for row in generate] == ["baseline", "vary attention", "vary channels_last", "vary batch"]
    assert all(float(row[10]) > 0 for row in generate)
    assert json.loads((tmp_path / "generate.json").read_text())
    for name in ("train", "loader", "loop", "probe"):
        assert f"{name}: skipped" in parts[name] and not data_rows(parts[name])
        assert not (tmp_path / f"{name}.json").exists()


def test_a_part_cut_short_keeps_its_rows_and_fails_the_check(tmp_path):
    row = {"role": "baseline", "batch": 1, "dtype": "fp16", "attention": "sdpa", "channels_last": False,
           "compile": False, "scheduler": "model", "images_per_s": 0.7, "spread": 0.02, "speedup": 1.0,
           "loop_images_per_s": 0.69, "encode_write_fraction": 0.01, "achieved_tflops": 59.0,
           "utilisation": 0.06, "peak_memory_gib": 3.1, "first_call_s": 4.0}
    (tmp_path / "generate.json").write_text(json.dumps({
        "model": "sd-v1-4-random", "resolution": 512, "steps": 50, "guidance": 7.5, "repeats": 3,
        "compile_mode": "reduce-overhead", "jpeg_quality": 95, "images_per_shard": 1000, "device": "GPU",
        "partial": True, "rows": [row]}))
    (tmp_path / "status.tsv").write_text("generate\t124\t220\t220\ntrain\t1\t3\t60\n")
    result = subprocess.run([sys.executable, "scripts/gpu_check_rows.py", str(tmp_path), "smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    parts = sections(result.stdout)
    assert "ran out of time" in parts["generate"] and "cut short" in parts["generate"]
    assert data_rows(parts["generate"])[0][:2] == ["1", "baseline"]
    assert "exit status 1" in parts["train"] and "no rows" in parts["train"]
    assert "not run" in parts["loader"] and not data_rows(parts["loader"])


def test_the_training_benchmarks_run_their_code_paths(tmp_path, monkeypatch):
    """The train and loop parts call the training code itself (the part the command-line test cannot reach):
    one tiny row of each, in this process, so a renamed function fails here and not in a GPU session."""
    train = benchmark("scripts/benchmark_train.py", monkeypatch)
    assert train.main(["--device", "cpu", "--batch", "2", "--global-size", "32", "--classes", "4", "--amp", "none",
                       "--warmup", "0", "--steps", "1", "--archs", "timm:test_vit",
                       "--json", str(tmp_path / "train.json")]) == 0
    rows = json.loads((tmp_path / "train.json").read_text())["rows"]
    assert [(r["arch"], r["layout"]) for r in rows] == [("timm:test_vit", "single crop")] and rows[0]["images_per_s"] > 0
    loop = benchmark("scripts/benchmark_loop.py", monkeypatch)
    args = ["--device", "cpu", "--images", "8", "--distinct", "2", "--resolution", "32", "--batch", "4",
            "--global-size", "32", "--local-crops", "0", "--classes", "2", "--workers", "0", "--warmup", "1",
            "--steps", "1", "--heads", "trex", "--json", str(tmp_path / "loop.json")]
    assert loop.main(args) == 0
