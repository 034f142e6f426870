"""The rehearsal of real scale (scripts/rehearse_scale.py) at 10,000 images (10 shards): the whole storage path
through DVC with 2 torchrun processes, a SIGKILL half way and the resume, a re-run, dvc push and pull,
and the training loader's batches. (Its 1x -> 2x scale-up is left out to keep the suite short:
tests/test_generation.py covers scale-ups.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.cluster       # a process tree of torchrun's ranks under DVC: the second command (README)
def test_a_small_rehearsal_runs_the_whole_path_and_resumes_after_a_kill(tmp_path):
    out = tmp_path / "rehearsal.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "rehearse_scale.py"), "--images", "10000",
                             "--processes", "2", "--work", str(tmp_path / "work"), "--batches", "20",
                             "--skip-scale-up", "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["images"] == figures["plan_images"] == 10000 and figures["shards"] == 10
    assert 0 < figures["killed_after_shards"] < 10           # killed half way, then resumed to the end
    assert 0 < figures["resume_seconds"] < figures["seconds"]
    assert figures["batch_distinct_classes_ratio"] >= 0.97 and figures["batch_label_iqr_ratio"] >= 0.95
    for key in ("bookkeeping_ms_per_image", "rerun_seconds", "dvc_status_seconds", "dvc_push_seconds",
                "dvc_pull_seconds", "peak_rss_mb", "plan_seconds", "plan_memory_mb"):
        assert figures[key] > 0, key
    # The pulled clone holds the published dataset, byte for byte.
    clone = tmp_path / "work" / "clone"
    pulled = json.loads((clone / "data" / "synthetic" / "index.json").read_text())
    assert pulled["images"] == 10000 and len(pulled["shards"]) == 10
    assert (clone / "data" / "synthetic" / "shard-000007.tar").stat().st_size == pulled["shards"][7]["bytes"]
