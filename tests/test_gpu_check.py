"""scripts/gpu_check.sh: its CPU smoke mode runs every benchmark and prints markdown rows for each.

The GPU mode itself needs a GPU; this checks that the script, the benchmarks' command
lines and the row formatter work together, so a GPU session does not lose its time to
a typo.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_smoke_mode_prints_rows_of_every_benchmark(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for name, section in sections(result.stdout).items():
        assert f"{name}: finished" in section
        rows = data_rows(section)
        assert rows, f"{name}: no rows\n{section}"
        assert not any("failed" in cell for row in rows for cell in row), section
    generate = data_rows(sections(result.stdout)["generate"])
    # The smoke walk: baseline, classic attention, channels_last, batch 2; each with its stage-loop figure.
    assert [row[1] for row in generate] == ["baseline", "vary attention", "vary channels_last", "vary batch"]
    assert all(float(row[10]) > 0 for row in generate)
    for name in TITLES:
        assert json.loads((tmp_path / f"{name}.json").read_text())


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
