"""digits.md: the `digits` queue group, Table 1 at digit scale, beside the paper's ImageNet-100 rows.

Each row: this repository's top-1 on the digits' real test split and its ratio to the real
baseline's (row `digits-real`, the same recipe on the real train split); then the paper's
Table 1 row of the same setting on ImageNet-100 (catalog.DIGITS_PAPER_ROWS) and its ratio to
the paper's row 1. The ratio is what carries over between the two scales, not the top-1.
Then the real test split's top-1 per class for every row (reports/imagenet.json), so a class
the generator cannot make stands out.

Docs: docs/digits.md#the-digits-queue-group
"""
from __future__ import annotations

from imagenet_sd.experiments import catalog
from imagenet_sd.prompts.classes import digits_wnids
from imagenet_sd.report import paper
from imagenet_sd.report.runs import MISSING, Runs, markdown_table, mean_of


def _ratio(value: float | None, base: float | None) -> str:
    return f"{100 * value / base:.0f} %" if value is not None and base else "–"


def _pct(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def per_class(runs: Runs, setting) -> dict[str, float] | None:
    """The setting's newest run's top-1 per class on the real test split (its details file)."""
    for run in reversed(runs.of(setting)):
        found = (runs.details(run, "reports/imagenet.json") or {}).get("val", {}).get("per_class_top1")
        if isinstance(found, dict):
            return found
    return None


def table(runs: Runs) -> str:
    settings = catalog.groups()["digits"]
    paper_rows = {r["row"]: r for r in paper.table(1)}
    top1 = {s.name: runs.value(s, "metrics/imagenet.json", "val", "top1") for s in settings}
    real = top1["digits-real"]
    paper_real = paper_rows[1]["val_top1"]
    lines = []
    for s in settings:
        row = catalog.DIGITS_PAPER_ROWS[s.name]
        theirs = paper_rows[row]["val_top1"] if row is not None else None
        lines.append([s.name, s.label, str(len(runs.of(s))), _pct(top1[s.name]), _ratio(top1[s.name], real),
                      str(row) if row is not None else "–", _pct(theirs) if row is not None else "–",
                      _ratio(theirs, paper_real)])
    header = ["row", "setting", "runs", "digits test top-1", "of real", "paper row", "paper IN-100 val top-1",
              "of paper's real"]
    wnids = digits_wnids()
    classes = [per_class(runs, s) for s in settings]
    class_lines = [[f"{digit} ({wnid})"] + [_pct(None if c is None else c.get(wnid)) for c in classes]
                   for digit, wnid in enumerate(wnids)]
    images = mean_of(runs.of(settings[1]), "metrics/generate.json", "memorised_share")
    return "\n".join([
        f"# Table 1 at digit scale (profile `{runs.profile}`)", "",
        "ResNet-50 trained from scratch on each row's images, scored on the real test split of scikit-learn's "
        "digits, which neither the generator nor the classifier has seen. `of real`: the ratio to `digits-real` "
        "(the same recipe on the real train split), beside the paper's ratio of the same setting on "
        "ImageNet-100 to its row 1. The generator has seen the digits' train split: this is Real-Fake's setting "
        "(a generator adapted to the data) more than the paper's (docs/digits.md). "
        f"`missing`: not run yet (`python -m imagenet_sd.experiments queue digits --profile {runs.profile}`).", "",
        *markdown_table(header, lines), "",
        "Generated images nearer a train image than 95 % of train images are to theirs (row digits-c-7p5, "
        f"docs/digits.md#memorisation): {MISSING if images is None else f'{images:.2f} %'}.", "",
        "## Top-1 per class on the real test split", "",
        *markdown_table(["class"] + [s.name for s in settings], class_lines), ""])
