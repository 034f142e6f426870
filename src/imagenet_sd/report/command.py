"""The paper's tables and figures from this repository's DVC experiments, beside the paper's numbers.

    python -m imagenet_sd.report --profile paper              # -> reports/paper/
    python -m imagenet_sd.report --profile digits             # -> reports/digits/
    python -m imagenet_sd.report --profile embedded --out /tmp/r

The default folder is reports/<profile>/ (DEFAULT_OUT), so one profile's report never overwrites
another's (the embedded default's would otherwise replace the paper's).

Reads the experiments of the current commit through `dvc exp show --json` (module
experiments), finds each table row's runs by their params (whatever they were named;
several runs of a row, e.g. seeds, are averaged and counted), and writes:

- table1.md, table2.md: the paper's layout, every cell "this run / the paper (difference)"
  (module tables).
- claims.md: the paper's headline claims checked on these runs, PASS / FAIL / NOT CHECKED.
- per_class.md, per_class_gap.png: the classes whose synthetic model falls furthest behind the
  real one (module report.per_class).
- digits.md: the `digits` group, Table 1 at digit scale on the digits profile, with the ratio of each
  row to the real baseline beside the paper's, and every row's top-1 per class (module report.digits).
- he2023.md: He et al. (ICLR 2023)'s study on these runs (groups he2023, he2023-fewshot, he2023-fewshot-guidance):
  zero-shot CLIP, then CLIP's head tuned on synthetic images (+ LE, + CF, K-shot real
  guidance), top-1 on the ImageNet test sets and zero-shot transfer; our runs only.
- vit_b.md: the `vit-b` group (ViT-B/16, DeiT's recipe) beside Fan et al.'s and Deliberate Practice's
  numbers (data/paper/vit_b.tsv); the tables' `network` column names what each row's runs trained.
- fig1_radar.png (Fig. 1), fig2_prompts.png (Fig. 2), fig4_scaling.png (Fig. 4),
  sweep_steps.png and sweep_guidance.png (the supplementary's sweeps).

It is a command, not a DVC stage: its input is the set of experiments, which no stage's
deps can name. Its outputs are ignored by git (reports/.gitignore ignores every folder under
reports/; they contain figures); re-run it any time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from imagenet_sd.core.errors import UserError
from imagenet_sd.experiments import queue
from imagenet_sd.report import digits, figures, per_class
from imagenet_sd.report.runs import Runs
from imagenet_sd.report.tables import claims, he2023_table, table1, table2, vit_b_table

DEFAULT_OUT = "reports/{profile}"   # --out's default, under --repo


def default_out(repo: Path, profile: str) -> Path:
    """reports/<profile>/ of the repository; an error where that is one of the pipeline's outputs (reports/train/,
    DVCLive's log), which the report must not write into."""
    out = Path(DEFAULT_OUT.format(profile=profile))
    pipeline = repo / "dvc.yaml"
    stages = (yaml.safe_load(pipeline.read_text()) or {}).get("stages", {}) if pipeline.is_file() else {}
    outs = {Path(next(iter(o)) if isinstance(o, dict) else o) for s in stages.values()
            for field in ("outs", "metrics", "plots") for o in s.get(field, [])}
    if any(o == out or out in o.parents or o in out.parents for o in outs):
        raise UserError(f"profile {profile!r}: the report's default folder {out}/ is a pipeline output; "
                        "give it another with --out")
    return repo / out


def write(repo: Path, profile: str, out: Path, all_commits: bool = False) -> list[Path]:
    queue.check_profile(repo, profile)
    runs = Runs(queue.read_runs(repo, all_commits), profile, repo)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    gaps = per_class.comparisons(runs)
    for name, text in (("table1.md", table1(runs)), ("table2.md", table2(runs)), ("he2023.md", he2023_table(runs)),
                       ("vit_b.md", vit_b_table(runs)),
                       ("per_class.md", per_class.markdown(runs, gaps)), ("digits.md", digits.table(runs)),
                       ("claims.md", "# Headline claims\n\n" + "\n".join(f"- {c}" for c in claims(runs)) + "\n")):
        (out / name).write_text(text)
        written.append(out / name)
    written += figures.draw_all(runs, out)
    written.append(per_class.figure(runs, out / "per_class_gap.png", gaps))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagenet_sd.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded", help="the profile whose experiments to report")
    parser.add_argument("--out", type=Path, help="folder to write into (default: reports/<profile>/ of --repo)")
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--all-commits", action="store_true", help="also experiments of other commits")
    args = parser.parse_args(argv)
    try:
        queue.check_profile(args.repo, args.profile)   # an unknown profile is named as such, before its folder
        args.out = args.out or default_out(args.repo, args.profile)
        written = write(args.repo, args.profile, args.out, args.all_commits)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((args.out / "claims.md").read_text())
    for path in written:
        print(f"wrote {path}")
    return 0

