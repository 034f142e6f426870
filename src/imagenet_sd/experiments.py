"""The paper's experiments as named DVC experiments: which params make each table row and figure point.

One source for "row 5 of Table 1 is prompt c_hc_b at guidance 7.5": the queue command
below turns these settings into `dvc exp run --queue -n <name> -S ...`, and the report
(module report) finds each row's runs by the same params, whatever they were named.

    python -m imagenet_sd.experiments queue table1 --profile paper            # rows 1-12, 15-17
    python -m imagenet_sd.experiments queue table1 --rows 1,6 --run           # two rows, queued and run
    python -m imagenet_sd.experiments queue all --profile paper --dry-run     # what would be queued

Groups: `table1` (rows 1-12 and 15-17; rows 13-14 are reference models every eval-imagenet
run scores), `table2` (its rows trained here are Table 1's rows 1, 12, 15, 16, 17; rows 1, 4
and 5 are eval-transfer's baselines), `scaling` (Fig. 4: 1/10x to 50x, prompt c_dc,
guidance 2.0), `steps` and `guidance` (the supplementary's sweeps; its exact grids are not
in the text we have, so these are our choice), `beyond` (class-matched backgrounds, the
paper's Sec. 4.3 future work), `he2023` and `he2023-fewshot` (He et al., ICLR 2023: CLIP
tuned on synthetic images with and without language enhancement and CLIP filtering, and
K-shot real guidance; these run the pipeline up to the clip-tune stage only). A setting
already computed in this commit's experiments (or in the commit itself) is skipped, as is
one already queued.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

# Every param that decides a row. A setting names all of them (source: real needs only two),
# so a row is the same experiment whatever the workspace's params.yaml holds.
SYNTHETIC = {"classes": "imagenet100", "prompt": "c", "guidance": 7.5, "scale": 1, "steps": 50,
             "scheduler": "model", "source": "synthetic", "filter": "none", "init_strength": 0}
REAL = {"classes": "imagenet100", "source": "real"}
METRICS_NEEDED = ("metrics/imagenet.json", "metrics/transfer.json")   # a run without them is not done
# Sariyildiz et al.'s rows do not need He et al.'s CLIP tuning: it changes none of their numbers,
# only their cost (a CLIP pass over every synthetic image), so their queued runs switch it off.
NO_CLIP_TUNE = {"clip_tune": False}


@dataclass(frozen=True)
class Setting:
    name: str          # the experiment's name, before the profile: table1-row05
    params: dict       # the params that define it
    label: str         # what a reader calls it
    switches: dict = field(default_factory=lambda: dict(NO_CLIP_TUNE))  # set when queued; decide no number of it
    target: str | None = None      # the stage `dvc exp run` stops at (None: the whole pipeline)
    needs: tuple = METRICS_NEEDED  # metrics files a finished run of it has

    def matches(self, run_params: dict) -> bool:
        return all(_same(run_params.get(key), value) for key, value in self.params.items())

    def overrides(self, profile: str) -> list[str]:
        """`-S key=value` arguments of `dvc exp run`."""
        pairs = {"profile": profile, **self.params, **self.switches}
        return [arg for key, value in pairs.items() for arg in ("-S", f"{key}={value}")]


def _same(a, b) -> bool:
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        try:
            return abs(float(a) - float(b)) < 1e-9
        except (TypeError, ValueError):
            return False
    return a == b


def synthetic(name: str, label: str, **changes) -> Setting:
    return Setting(name, {**SYNTHETIC, **changes}, label)


PROMPT_LABELS = {"c": "c", "c_hc": "c, h_c", "c_dc": "c, d_c", "c_hc_b": "c, h_c inside b",
                 "c_hc_bm": "c, h_c inside b (class-matched b)"}


def _table1() -> dict[int, Setting]:
    rows = {1: Setting("table1-row01", dict(REAL), "ImageNet-100 (real)")}
    for first, guidance in ((2, 7.5), (6, 2.0)):
        for offset, prompt in enumerate(("c", "c_hc", "c_dc", "c_hc_b")):
            row = first + offset
            rows[row] = synthetic(f"table1-row{row:02d}", f"IN-100-SD, {PROMPT_LABELS[prompt]}, {guidance}",
                                  prompt=prompt, guidance=guidance)
    for row, scale in ((10, 10), (11, 20), (12, 50)):
        rows[row] = synthetic(f"table1-row{row:02d}", f"IN-100-SD {scale}x, c, d_c, 2.0",
                              prompt="c_dc", guidance=2.0, scale=scale)
    for row, prompt, guidance in ((15, "c_dc", 7.5), (16, "c_hc_b", 7.5), (17, "c_dc", 2.0)):
        rows[row] = synthetic(f"table1-row{row:02d}", f"IN-1K-SD, {PROMPT_LABELS[prompt]}, {guidance}",
                              classes="imagenet1k", prompt=prompt, guidance=guidance)
    return rows


TABLE1 = _table1()
# Table 2's trained rows are Table 1's: its row -> Table 1's row (1, 4, 5: baselines of eval-transfer).
TABLE2_FROM_TABLE1 = {2: 1, 3: 12, 6: 15, 7: 16, 8: 17}
SCALES = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)        # Fig. 4's range, 1/10x to 50x
STEPS = (10, 20, 25, 50, 100)
GUIDANCES = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5)
MATCHED_K = 10


# He et al. (ICLR 2023): the clip-tune stage's study. Zero-shot: the class name alone ("B", prompt c),
# + language enhancement (LE), + CLIP filter (CF); few-shot: K real shots a class, each synthetic
# image started from one of them (real guidance) at the strength their code uses for that K.
CLIP_TUNE = {"clip_tune": True, "shots": 0}
HE2023_ZERO_SHOT = (("b", "c", "none", "B (class name)"), ("le", "le", "none", "B + LE"),
                    ("cf", "c", "clip", "B + CF"), ("le-cf", "le", "clip", "B + LE + CF"))
HE2023_SHOTS = (1, 2, 4, 8, 16)
# CVMI-Lab/SyntheticData's few-shot GLIDE script: refer_img_iters 50, 40, 35, 20, 15 of its 100
# steps for K = 1, 2, 4, 8, 16, i.e. img2img strengths 0.5 ... 0.15 (README "Real-image guidance").
HE2023_INIT_STRENGTH = {1: 0.5, 2: 0.4, 4: 0.35, 8: 0.2, 16: 0.15}
CLIP_METRICS = ("metrics/clip.json",)


def he2023(name: str, label: str, **changes) -> Setting:
    """A setting of He et al.'s study: run to clip-tune, not train-resnet50, which it does not read."""
    return Setting(name, {**SYNTHETIC, **CLIP_TUNE, **changes}, label, switches={}, target="clip-tune",
                   needs=CLIP_METRICS)


def _he2023() -> dict[str, list[Setting]]:
    zero = [he2023(f"he2023-{short}", label, prompt=prompt, filter=filter_)
            for short, prompt, filter_, label in HE2023_ZERO_SHOT]
    few = [he2023(f"he2023-{k}shot", f"{k}-shot, real guidance {HE2023_INIT_STRENGTH[k]}", shots=k,
                  init_strength=HE2023_INIT_STRENGTH[k]) for k in HE2023_SHOTS]
    return {"he2023": zero, "he2023-fewshot": few}


def _scale_name(scale: float) -> str:
    return f"scale-{scale:g}x".replace(".", "p")


def groups() -> dict[str, list[Setting]]:
    """Every group's settings, in order; a setting shared by groups has its first group's name."""
    fig4 = synthetic("", "", prompt="c_dc", guidance=2.0)
    made = {
        "table1": [TABLE1[row] for row in sorted(TABLE1)],
        "table2": [TABLE1[row] for row in TABLE2_FROM_TABLE1.values()],
        "scaling": [synthetic(_scale_name(s), f"IN-100-SD {s:g}x, c, d_c, 2.0", **{**fig4.params, "scale": s})
                    for s in SCALES],
        "steps": [synthetic(f"steps-{n}", f"IN-100-SD, c, d_c, 2.0, {n} steps", **{**fig4.params, "steps": n})
                  for n in STEPS],
        "guidance": [synthetic(f"guidance-{g:g}".replace(".", "p"), f"IN-100-SD, c, d_c, guidance {g:g}",
                               prompt="c_dc", guidance=g) for g in GUIDANCES],
        "beyond": [synthetic(f"beyond-matched-{g:g}".replace(".", "p"),
                             f"IN-100-SD, {PROMPT_LABELS['c_hc_bm']}, {g}, k={MATCHED_K}",
                             prompt="c_hc_bm", guidance=g, background_top_k=MATCHED_K) for g in (7.5, 2.0)],
        **_he2023(),
    }
    named: list[Setting] = [s for group in made.values() for s in group]
    canonical = {}
    for s in named:                      # the first name of a set of params is its name everywhere
        canonical.setdefault(_key(s.params), s)
    return {g: [canonical[_key(s.params)] for s in group] for g, group in made.items()}


def _key(params: dict) -> str:
    return json.dumps({k: float(v) if isinstance(v, (int, float)) else v for k, v in params.items()},
                      sort_keys=True)


def experiment_name(setting: Setting, profile: str) -> str:
    return f"{setting.name}-{profile}"


# --------------------------------------------------------------------------- runs, as DVC shows them

@dataclass
class Run:
    name: str          # experiment name, or the commit's short rev
    rev: str
    kind: str          # "baseline" (a commit) | "experiment"
    state: str         # "success" | "queued" | "running" | "failed"
    params: dict       # params.yaml
    metrics: dict = field(default_factory=dict)   # path -> data

    @property
    def done(self) -> bool:
        return self.done_for(METRICS_NEEDED)

    def done_for(self, needs: tuple) -> bool:
        """Finished, with every metrics file in `needs` written (clip-tune's "skipped" is not a result)."""
        return self.state == "success" and all(self.metrics.get(p) and not self.metrics[p].get("skipped")
                                               for p in needs)

    @property
    def profile(self) -> str:
        return self.params.get("profile", "")


def dvc(args: list[str], repo: Path) -> str:
    result = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"`dvc {' '.join(args)}` failed in {repo}: "
                        f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    return result.stdout


def read_runs(repo: Path, all_commits: bool = False) -> list[Run]:
    """The commit(s) and their experiments, from `dvc exp show --json` (the workspace left out:
    its metrics may be older than its params)."""
    shown = json.loads(dvc(["exp", "show", "--json"] + (["--all-commits"] if all_commits else []), repo))
    return parse_exp_show(shown)


def parse_exp_show(shown: list[dict]) -> list[Run]:
    runs = []
    for baseline in shown:
        if baseline.get("rev") == "workspace":
            continue
        runs.append(_run(baseline, "baseline", None))
        for exp in baseline.get("experiments") or []:
            # A queued, running or failed experiment's executor says so; a finished one has none.
            state = ((exp.get("executor") or {}).get("state")) or "success"
            runs += [_run(rev, "experiment", state) for rev in exp.get("revs") or []]
    return runs


def _run(entry: dict, kind: str, state: str | None) -> Run:
    data = entry.get("data") or {}
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    metrics = {path: m["data"] for path, m in (data.get("metrics") or {}).items() if m.get("data")}
    if entry.get("error"):
        state = "failed"
    return Run(name=entry.get("name") or entry["rev"][:7], rev=entry["rev"], kind=kind, state=state or "success",
               params=params, metrics=metrics)


def runs_of(setting: Setting, runs: list[Run], profile: str) -> list[Run]:
    return [r for r in runs if r.profile == profile and setting.matches(r.params)]


# --------------------------------------------------------------------------- the queue command

def plan_queue(settings: list[Setting], runs: list[Run], profile: str) -> tuple[list[Setting], list[str]]:
    """(settings to queue, one line per setting skipped and why)."""
    todo, skipped, seen = [], [], set()
    for s in settings:
        if s.name in seen:
            continue
        seen.add(s.name)
        found = runs_of(s, runs, profile)
        done = [r for r in found if r.done_for(s.needs)]
        pending = [r for r in found if r.state in ("queued", "running")]
        if done:
            skipped.append(f"{s.name}: computed in {done[0].name} ({s.label})")
        elif pending:
            skipped.append(f"{s.name}: already {pending[0].state} as {pending[0].name}")
        else:
            todo.append(s)
    return todo, skipped


def select(group_names: list[str], rows: list[int] | None) -> list[Setting]:
    available = groups()
    unknown = [g for g in group_names if g != "all" and g not in available]
    if unknown:
        raise UserError(f"unknown group {unknown[0]!r}; choose from: all, {', '.join(available)}")
    names = list(available) if "all" in group_names else group_names
    chosen = [s for g in names for s in available[g]]
    if rows:
        if names != ["table1"]:
            raise UserError("--rows picks rows of Table 1: use it with the group table1 alone")
        missing = [r for r in rows if r not in TABLE1]
        if missing:
            raise UserError(f"--rows: Table 1 has no trained row {missing[0]}; rows: "
                            f"{', '.join(map(str, sorted(TABLE1)))} (13-14 are reference models)")
        chosen = [TABLE1[r] for r in rows]
    return chosen


def check_profile(repo: Path, profile: str) -> None:
    import yaml
    profiles = (yaml.safe_load((repo / "params.yaml").read_text()) or {}).get("profiles") or {}
    if profile not in profiles:
        raise UserError(f"--profile {profile!r}: params.yaml has no such profile; choose from: {', '.join(profiles)}")


def queue(repo: Path, group_names: list[str], profile: str, rows: list[int] | None = None,
          run: bool = False, dry_run: bool = False, all_commits: bool = False) -> int:
    settings = select(group_names, rows)
    check_profile(repo, profile)
    todo, skipped = plan_queue(settings, read_runs(repo, all_commits), profile)
    for line in skipped:
        print(f"skip  {line}")
    for s in todo:
        name = experiment_name(s, profile)
        print(f"queue {name}: {' '.join(s.overrides(profile))}{f' {s.target}' if s.target else ''}")
        if not dry_run:
            dvc(["exp", "run", "--queue", "-n", name, *s.overrides(profile), *([s.target] if s.target else [])], repo)
    if not todo or dry_run or not run:
        if todo and not dry_run:
            print("run them: dvc queue start (background) or dvc exp run --run-all")
        return 0
    # --run-all exits 0 even when an experiment fails: check each one's metrics ourselves.
    subprocess.run(["dvc", "exp", "run", "--run-all"], cwd=repo, check=False)
    runs = read_runs(repo, all_commits)
    failed = [experiment_name(s, profile) for s in todo
              if not any(r.done_for(s.needs) for r in runs_of(s, runs, profile))]
    for name in failed:
        print(f"failed {name}: see `dvc queue logs {name}`", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagenet_sd.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue the experiments of tables and figures as named DVC experiments")
    q.add_argument("groups", nargs="+", help=f"all | {' | '.join(groups())}")
    q.add_argument("--profile", default="embedded", help="profile of params.yaml (default: embedded)")
    q.add_argument("--rows", help="with table1: only these rows, e.g. 1,6")
    q.add_argument("--run", action="store_true", help="run the queue now (dvc exp run --run-all) and check each")
    q.add_argument("--dry-run", action="store_true", help="print what would be queued")
    q.add_argument("--all-commits", action="store_true", help="count experiments of every commit as computed")
    q.add_argument("--repo", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")] if args.rows else None
    except ValueError:
        parser.error(f"--rows {args.rows!r}: expected row numbers separated by commas, e.g. 1,6")
    try:
        return queue(args.repo, args.groups, args.profile, rows, args.run, args.dry_run, args.all_commits)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
