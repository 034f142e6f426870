"""The whole DVC pipeline on the embedded default, in a temporary clone.

This is the main job a new user runs after setup. It takes a few minutes on
2 CPU cores; it is what proves the stages fit together.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["generate.json", "train.json", "imagenet.json", "transfer.json"]


def run(args, cwd, extra_env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", **(extra_env or {}))
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def sh(args, cwd, **kwargs) -> str:
    result = run(args, cwd, **kwargs)
    return result.stdout + result.stderr


def pipeline_outputs() -> list[str]:
    """Every out and metrics path of dvc.yaml: what a fresh clone does not have yet."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    entries = [e for s in stages.values() for field in ("outs", "metrics") for e in s.get(field, [])]
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A git repository holding what a clone of this work tree would hold, after setup."""
    repo = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    outputs = pipeline_outputs()
    for name in filter(None, files):
        if any(name == out or name.startswith(out + "/") for out in outputs):
            continue   # left over from a run in this work tree
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    # The generation work folder is shared by experiments; this test gets its own.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profiles"]["embedded"]["generate"]["work_dir"] = str(tmp_path_factory.mktemp("work"))
    params["profiles"]["embedded"]["train"]["work_dir"] = str(tmp_path_factory.mktemp("train-work"))
    params["profiles"]["embedded"]["evaluate"]["work_dir"] = str(tmp_path_factory.mktemp("evaluate-work"))
    params["profiles"]["embedded"]["transfer"]["work_dir"] = str(tmp_path_factory.mktemp("transfer-work"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "clone"], repo)
    sh(["dvc", "repro", "-q", "embedded-assets"], repo)      # what setup does
    return repo


def flatten(data: dict, prefix: str = "") -> dict:
    """{"a.b": value} of nested JSON objects: DVC's names of metric keys."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.slow
def test_repro_then_guidance_experiment(clone):
    log = sh(["dvc", "repro"], clone, timeout=900)
    assert "Stage 'embedded-assets' didn't change, skipping" in log, log    # setup's outputs are used
    for name in METRICS:
        data = json.loads((clone / "metrics" / name).read_text())
        assert data, f"metrics/{name} is empty"
    imagenet = json.loads((clone / "metrics/imagenet.json").read_text())
    assert set(imagenet) >= {"val", "v2", "sketch", "r", "a"}
    assert (clone / "reports/samples.png").stat().st_size > 0
    train = json.loads((clone / "metrics/train.json").read_text())
    epochs = yaml.safe_load((clone / "params.yaml").read_text())["profiles"]["embedded"]["train"]["epochs"]
    holdout_log = (clone / "reports/train/plots/metrics/holdout_top1.tsv").read_text().splitlines()
    assert len(holdout_log) == 1 + epochs
    assert abs(float(holdout_log[-1].split("\t")[1]) - train["holdout_top1"]) < 0.01
    # Exactly the real train folder's count of every class is trained on; the held-out images come on top.
    wnids = [line.split("\t")[0] for line in (clone / "data/prompts/prompts.tsv").read_text().splitlines()[1:]]
    real = sum(len(list((clone / "data/fixtures/imagenet/train" / w).iterdir())) for w in wnids)
    held = yaml.safe_load((clone / "params.yaml").read_text())["profiles"]["embedded"]["train"]["holdout_per_class"]
    details = json.loads((clone / "reports/train.json").read_text())      # what metrics/train.json leaves out
    assert train["train_images"] == details["train_images"] == real
    assert details["holdout_images"] == held * len(wnids) and details["source"] == "synthetic"
    plots = sh(["dvc", "plots", "show", "--json"], clone)
    assert "failed to load" not in plots, plots
    for title in ("Training loss by epoch", "Training top-1 by epoch", "reports/samples.png"):
        assert title in plots
    sh(["git", "add", "-A"], clone)
    sh(["git", "commit", "-qm", "baseline"], clone)

    log = sh(["dvc", "exp", "run", "-S", "guidance=2.0"], clone, timeout=900)
    for stage in ("sd-generate", "train-resnet50", "eval-imagenet", "eval-transfer"):
        assert f"Running stage '{stage}'" in log, log
    for stage in ("wordnet-prompts", "places-backgrounds"):
        assert f"Running stage '{stage}'" not in log, log

    diff = sh(["dvc", "metrics", "diff", "--all"], clone)
    for key in ("metrics/generate.json", "metrics/imagenet.json", "val.top1", "metrics/transfer.json"):
        assert key in diff, diff
    params_diff = sh(["dvc", "params", "diff"], clone)
    assert "guidance" in params_diff and "2.0" in params_diff

    # Readable metrics: few keys, and README's `dvc exp show` fits a 100-column terminal.
    keys = sum(len(flatten(json.loads(path.read_text()))) for path in (clone / "metrics").glob("*.json"))
    assert keys < 40, f"{keys} metric keys: move descriptions to reports/<stage>.json"
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("dvc exp show --drop"))
    table = sh(shlex.split(line) + ["--no-pager"], clone, extra_env={"COLUMNS": "100"})
    assert "…" not in table and max(map(len, table.splitlines())) <= 100, table
    assert "7.5" in table and "└──" in table, table          # the baseline and the experiment

    # Back to params already computed: every stage comes back from DVC's run-cache, no image is drawn.
    log = sh(["dvc", "exp", "run", "-S", "guidance=7.5"], clone, timeout=900)
    assert "Stage 'sd-generate' is cached - skipping run" in log, log
    assert "sd-generate:" not in log


def experiments(repo: Path) -> dict[str, dict]:
    """`dvc exp show`'s experiments by name: their params and metrics."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    return {rev["name"]: rev["data"] for baseline in shown for exp in baseline.get("experiments") or []
            for rev in exp["revs"]}


@pytest.mark.slow
def test_queued_experiments_run_in_temporary_copies(clone):
    # The copies are made by git, so they lack what setup built (models/tiny-sd, data/fixtures)
    # until DVC checks them out as embedded-assets' outputs. After the test above, the stages
    # before eval-transfer come from DVC's caches and only eval-transfer runs, on the fixture
    # data; run alone, this test runs the whole pipeline once.
    probes = ("sklearn", "torch")
    for probe in probes:
        sh(["dvc", "exp", "run", "--queue", "-n", f"probe-{probe}",
            "-S", f"profiles.embedded.transfer.probe={probe}"], clone)
    log = sh(["dvc", "exp", "run", "--run-all"], clone, timeout=900)
    runs = experiments(clone)
    for probe in probes:
        assert f"probe-{probe}" in runs, f"experiment probe-{probe} failed:\n{log[-3000:]}"
        exp = runs[f"probe-{probe}"]
        assert exp["params"]["params.yaml"]["data"]["profiles"]["embedded"]["transfer"]["probe"] == probe
        metrics = {name: m["data"] for name, m in exp["metrics"].items()}
        assert {f"metrics/{name}" for name in METRICS} <= set(metrics), metrics
        assert 0 <= metrics["metrics/transfer.json"]["fixture-textures"]["top1"] <= 100
        # The probe kind is a detail (reports/transfer.json): the experiment's own outputs say it.
        sh(["dvc", "exp", "apply", f"probe-{probe}"], clone)
        details = json.loads((clone / "reports/transfer.json").read_text())
        assert details["fixture-textures"]["probe"] == probe
