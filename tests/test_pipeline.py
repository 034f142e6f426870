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

from imagenet_sd.datasets import digits, fixtures
from imagenet_sd.digits import generator
from imagenet_sd.models import embedded, tiny_clip, tiny_t5

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
EMBEDDED_ASSETS = STAGES["embedded-assets"]["outs"]
DIGITS_ASSETS = STAGES["digits-assets"]["outs"]
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
    # The plumbing on the embedded profile, set explicitly (the committed params run the digits profile).
    params.update(profile="embedded", classes="imagenet100")
    params["profiles"]["embedded"]["generate"]["work_dir"] = str(tmp_path_factory.mktemp("work"))
    params["profiles"]["embedded"]["train"]["work_dir"] = str(tmp_path_factory.mktemp("train-work"))
    params["profiles"]["embedded"]["evaluate"]["work_dir"] = str(tmp_path_factory.mktemp("evaluate-work"))
    params["profiles"]["embedded"]["transfer"]["work_dir"] = str(tmp_path_factory.mktemp("transfer-work"))
    # A smaller training than the default's (one epoch, 32 px global and one 16 px local crop instead of
    # two epochs of 64 px and two 32 px crops): the stages' plumbing is under test here; the training
    # loop, multi-crop and resuming across epochs are in tests/test_training.py and
    # tests/test_augmentation.py. None is a param of a Table 1 row, so the commit below is still row 2.
    params["profiles"]["embedded"]["train"].update(epochs=1, global_crop_size=32, local_crops=1, local_crop_size=16)
    params["profiles"]["embedded"]["transfer"]["c_points"] = 4      # the probe's C grid: tests/test_probes.py
    # Images of 32 px instead of 64 (a quarter of the latent): Table 1 row 2 below draws its 499 images in
    # about 15 s instead of 55 on one thread. The resolution is not a param of a row either.
    params["profiles"]["embedded"]["generate"]["resolution"] = 32
    # Scored at the training crop's size too (32 px, not 64): a quarter of ResNet-50's convolutions in each
    # eval-imagenet and eval-transfer run.
    params["profiles"]["embedded"]["evaluate"].update(resize=36, crop=32)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "clone"], repo)
    # What setup does (dvc repro embedded-assets): its outputs, built from code with fixed seeds, taken
    # from this work tree when current there and recorded in the clone's DVC cache.
    if all(component.is_current(ROOT / component.DEFAULT_DIR) for component in (embedded, tiny_clip, tiny_t5)) \
            and fixtures.is_current(ROOT / "data" / "fixtures"):
        for out in EMBEDDED_ASSETS:
            shutil.copytree(ROOT / out, repo / out)
        sh(["dvc", "commit", "-q", "-f", "embedded-assets"], repo)
    else:
        sh(["dvc", "repro", "-q", "embedded-assets"], repo)
    # The digits profile's data and generator (setup's too), which this profile does not read but
    # `dvc repro` would otherwise train again.
    if digits.is_current(ROOT / "data/digits") and generator.is_current(ROOT / generator.DEFAULT_DIR):
        for out in DIGITS_ASSETS:
            shutil.copytree(ROOT / out, repo / out)
        sh(["dvc", "commit", "-q", "-f", "digits-assets"], repo)
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
def test_repro_runs_every_stage_on_the_embedded_default(clone):
    log = sh(["dvc", "repro"], clone, timeout=900)
    assert "Stage 'embedded-assets' didn't change, skipping" in log, log    # setup's outputs are used
    assert "Stage 'digits-assets' didn't change, skipping" in log, log
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
    # A key no other stage tracks, on the up-to-date pipeline: check-params runs and refuses it in one line.
    committed = (clone / "params.yaml").read_text()
    raw = yaml.safe_load(committed)
    raw["profiles"]["paper"]["launcher"] = "kubernetes"
    (clone / "params.yaml").write_text(yaml.safe_dump(raw))
    try:
        refused = subprocess.run(["dvc", "repro"], cwd=clone, capture_output=True, text=True, timeout=300,
                                 env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"))
    finally:
        (clone / "params.yaml").write_text(committed)
    assert refused.returncode != 0, refused.stdout[-2000:]
    assert "error: params.yaml: profiles.paper.launcher = 'kubernetes' is not valid" in refused.stderr, refused.stderr
    assert "Running stage 'check-params'" in refused.stdout and "Running stage 'sd-generate'" not in refused.stdout


def experiments(repo: Path) -> dict[str, dict]:
    """`dvc exp show`'s experiments by name: their params and metrics."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    return {rev["name"]: rev["data"] for baseline in shown for exp in baseline.get("experiments") or []
            for rev in exp["revs"]}


@pytest.mark.slow
def test_paper_rows_are_queued_run_in_temporary_copies_and_reported(clone, tmp_path):
    # README's commands for the paper's tables, two rows of Table 1 on the embedded default. The
    # commit above is row 2 (prompt c, guidance 7.5): it is skipped, row 1 (real images) runs. Queued
    # runs happen in copies made by git, which lack what setup built (models/tiny-sd, data/fixtures)
    # until DVC checks them out as embedded-assets' outputs. (Row 1 draws no image: a generating row
    # would add a second Stable Diffusion run to the suite's slowest test, and `dvc repro` above and
    # the sd-generate tests cover generation.)
    queue = [sys.executable, "-m", "imagenet_sd.experiments", "queue", "table1", "--rows", "1,2"]
    log = sh(queue + ["--run"], clone, timeout=1500)
    assert "skip  table1-row02: computed in" in log, log
    assert "-S clip_tune=False" in log                       # Table 1's rows skip He et al.'s CLIP tuning
    runs = experiments(clone)
    assert "table1-row01-embedded" in runs, f"experiment table1-row01-embedded failed:\n{log[-3000:]}"
    metrics = {path: m["data"] for path, m in runs["table1-row01-embedded"]["metrics"].items()}
    assert {f"metrics/{m}" for m in METRICS} <= set(metrics), metrics
    assert metrics["metrics/clip.json"] == {"skipped": True}
    row1 = runs["table1-row01-embedded"]["params"]["params.yaml"]["data"]
    assert (row1["source"], row1["clip_tune"]) == ("real", False)
    assert "Running stage 'train-resnet50'" in log
    # Rows already computed are not queued again.
    again = sh(queue, clone)
    assert "queue " not in again and again.count("skip  ") == 2, again

    diff = sh(["dvc", "metrics", "diff", "HEAD", "table1-row01-embedded"], clone)
    for key in ("metrics/train.json", "loss", "train_images"):       # chance-level scores may not change
        assert key in diff, diff
    assert "source" in sh(["dvc", "params", "diff", "HEAD", "table1-row01-embedded"], clone)

    # Readable metrics: few keys, and README's `dvc exp show` fits a 100-column terminal.
    keys = sum(len(flatten(json.loads(path.read_text()))) for path in (clone / "metrics").glob("*.json"))
    assert keys <= 60, f"{keys} metric keys: move descriptions to reports/<stage>.json"
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("dvc exp show --drop"))
    table = sh(shlex.split(line) + ["--no-pager"], clone, extra_env={"COLUMNS": "100"})
    assert "…" not in table and max(map(len, table.splitlines())) <= 100, table
    assert "table1-row01" in table and "└──" in table, table   # the baseline and the experiments

    # The report: both tables with run | paper | difference, missing rows said so, the figures.
    out = tmp_path / "report"
    log = sh([sys.executable, "-m", "imagenet_sd.report", "--out", str(out)], clone)
    table1 = (out / "table1.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table1.splitlines() if line.startswith("| ")}
    for row in ("1", "2"):
        assert "missing" not in rows[row] and " / " in rows[row] and "(" in rows[row], rows[row]
    assert "missing / 46.9" in rows["3"]
    # He et al.'s table: the commit (prompt c, clip_tune on) is its setting B; the rest are missing.
    he2023 = {line.split("|")[1].strip(): line for line in (out / "he2023.md").read_text().splitlines()
              if line.startswith("| ")}
    assert "missing" not in he2023["he2023-b"] and "missing" in he2023["he2023-le"], he2023
    table2 = (out / "table2.md").read_text()
    assert "fixture-textures" in table2                     # the embedded transfer set, beside the ten
    assert "NOT CHECKED" in log and "Fig. 4" in log
    for figure in ("fig1_radar.png", "fig2_prompts.png", "fig4_scaling.png", "sweep_steps.png",
                   "sweep_guidance.png"):
        assert (out / figure).stat().st_size > 5000, figure

    # A queued run's details are its own: row 1 trained on real images.
    sh(["dvc", "exp", "apply", "table1-row01-embedded"], clone)
    assert json.loads((clone / "reports/train.json").read_text())["source"] == "real"
    sh(["git", "checkout", "--", "."], clone)

    # Back to params already computed: their stages come back from DVC's run-cache, nothing is trained.
    log = sh(["dvc", "exp", "run", "-S", "source=real", "-S", "clip_tune=False"], clone, timeout=900)
    for stage in ("train-resnet50", "eval-imagenet", "clip-tune"):
        assert f"Stage '{stage}' is cached - skipping run" in log, log
