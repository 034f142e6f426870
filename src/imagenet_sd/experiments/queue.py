"""Runs as `dvc exp show` reports them, and the queue command that adds the missing ones.

    python -m imagenet_sd.experiments queue table1 --profile paper            # rows 1-12, 15-17
    python -m imagenet_sd.experiments queue table1 --rows 1,6 --run           # two rows, run now one by one
    python -m imagenet_sd.experiments queue all --profile paper --dry-run     # what would be queued

A setting (module catalog) already computed in this commit's experiments (or in the commit
itself) is skipped, as is one already queued. Docs: docs/experiments.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from imagenet_sd.core.errors import UserError
from imagenet_sd.experiments.catalog import METRICS_NEEDED, PROFILE_CLASSES, TABLE1, Setting, experiment_name, groups

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
        if not s.defined_for(profile):
            only = PROFILE_CLASSES.get(profile)
            skipped.append(f"{s.name}: profile {profile}'s generator knows the {only} classes only"
                           if only is not None and s.params.get("classes") != only else
                           f"{s.name}: no model of it for profile {profile} (defined for: {', '.join(s.per_profile)})")
            continue
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
        print(f"{'run' if run else 'queue'} {name}: {' '.join(s.overrides(profile))}{f' {s.target}' if s.target else ''}",
              flush=True)
        arguments = ["-n", name, *s.overrides(profile), *([s.target] if s.target else [])]
        if dry_run:
            continue
        if run:
            # One at a time in a temporary copy (--temp), not through DVC's queue worker: `dvc exp run
            # --run-all` can hang for good when its worker misreads a message of its file-system broker
            # (treeverse/dvc#10428). A failed run does not stop the others; each is checked below.
            subprocess.run(["dvc", "exp", "run", "--temp", *arguments], cwd=repo, check=False)
        else:
            dvc(["exp", "run", "--queue", *arguments], repo)
    if not todo or dry_run or not run:
        if todo and not dry_run:
            # What docs/experiments.md recommends: DVC's queue worker, not `dvc exp run --run-all` (see above).
            print("run them: dvc queue start (in the background; dvc queue status, dvc queue logs <name>); "
                  "if it stalls with an idle worker, dvc queue stop --kill and dvc queue start again")
        return 0
    runs = read_runs(repo, all_commits)
    failed = [experiment_name(s, profile) for s in todo
              if not any(r.done_for(s.needs) for r in runs_of(s, runs, profile))]
    for name in failed:
        print(f"failed {name}: its log is above", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagenet_sd.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue the experiments of tables and figures as named DVC experiments")
    q.add_argument("groups", nargs="+", help=f"all | {' | '.join(groups())}")
    q.add_argument("--profile", default="embedded", help="profile of params.yaml (default: embedded)")
    q.add_argument("--rows", help="with table1: only these rows, e.g. 1,6")
    q.add_argument("--run", action="store_true",
                   help="run them now instead of queueing, one at a time (dvc exp run --temp), and check each")
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
