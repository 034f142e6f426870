"""Which classes the generator cannot make: per-class IN-Val top-1 of each synthetic row beside the
model trained on real images of the same classes, and the filter's pass rate of the class where the run
filtered (CLIP's, with `filter: clip`) (report files per_class.md and per_class_gap.png).

Per-class scores come from the runs' details, `reports/imagenet.json` (eval-imagenet's
`per_class_top1`, class key -> top-1 %), and `reports/filter.json` (clip-filter's
`pass_rate_per_class`), read at each run's revision; a row's runs are averaged class by class.
The real baseline of ImageNet-100 rows is Table 1 row 1's runs; of ImageNet-1K rows, the
torchvision ResNet-50 reference model (row 13) scored by the same runs.

Docs: docs/experiments.md#which-classes-the-generator-cannot-make
"""
from __future__ import annotations

from pathlib import Path
from statistics import mean

from imagenet_sd.datasets import kept
from imagenet_sd.experiments import catalog
from imagenet_sd.experiments.catalog import TABLE1, Setting
from imagenet_sd.prompts import clip_texts
from imagenet_sd.report.figures import pyplot, save

DETAILS, FILTER_DETAILS = "reports/imagenet.json", "reports/filter.json"
TEST_SET = "val"
WORST = 10                 # classes listed a row
PLOTTED = 4                # rows drawn in the figure


def _averaged(tables: list[dict]) -> dict[str, float] | None:
    """Class by class, the mean over the tables of the classes every table has."""
    if not tables:
        return None
    shared = set(tables[0]).intersection(*tables[1:])
    return {key: mean(table[key] for table in tables) for key in sorted(shared)}


def per_class(runs, setting: Setting) -> dict[str, float] | None:
    """IN-Val top-1 of each class, averaged over the setting's runs that have it."""
    found = [d[TEST_SET]["per_class_top1"] for r in runs.of(setting)
             if isinstance(d := runs.details(r, DETAILS), dict) and "per_class_top1" in d.get(TEST_SET, {})]
    return _averaged(found)


def pass_rates(runs, setting: Setting) -> dict[str, float] | None:
    """The filter's pass rate of each class, averaged over the setting's runs that filtered (any filter
    but `none`, which passes every image)."""
    found = [d["pass_rate_per_class"] for r in runs.of(setting)
             if isinstance(d := runs.details(r, FILTER_DETAILS), dict) and d.get("filter", kept.NONE) != kept.NONE
             and "pass_rate_per_class" in d]
    rates = _averaged(found)
    return None if rates is None else {k: 100 * v for k, v in rates.items()}


def real_baseline(runs, classes: str) -> tuple[str, dict[str, float] | None]:
    """(label, per-class top-1) of the real-image model of a class set."""
    if classes == "imagenet100":
        return "real, row 1", per_class(runs, TABLE1[1])
    for run in reversed(runs.all):
        details = runs.details(run, DETAILS)
        table = (((details or {}).get("reference") or {}).get("torchvision-resnet50") or {}).get(TEST_SET) or {}
        if "per_class_top1" in table:
            return "torchvision ResNet-50, row 13", table["per_class_top1"]
    return "torchvision ResNet-50, row 13", None


def comparisons(runs) -> list[dict]:
    """Every synthetic row with per-class scores and a baseline: its classes' gaps, worst first."""
    settings = [(str(row), s) for row, s in sorted(TABLE1.items()) if s.params.get("source") == "synthetic"]
    settings += [(s.name, s) for s in catalog.groups()["beyond"]]
    out = []
    for row, setting in settings:
        synthetic = per_class(runs, setting)
        if not synthetic:
            continue
        label, real = real_baseline(runs, setting.params["classes"])
        if not real:
            continue
        shared = [k for k in synthetic if k in real]
        rates = pass_rates(runs, setting) or {}
        gaps = sorted(((synthetic[k] - real[k], k) for k in shared), key=lambda g: (g[0], g[1]))
        out.append({"row": row, "label": setting.label, "runs": len(runs.of(setting)), "baseline": label,
                    "mean_gap": mean(g for g, _ in gaps) if gaps else None,
                    "classes": [{"key": k, "real": real[k], "synthetic": synthetic[k], "gap": g,
                                 "pass_rate": rates.get(k)} for g, k in gaps]})
    return out


def _name(key: str) -> str:
    return clip_texts.openai_names().get(key, key)


def markdown(runs, found: list[dict] | None = None) -> str:
    found = comparisons(runs) if found is None else found
    lines = [f"# Which classes the generator cannot make (profile `{runs.profile}`)", "",
             f"Per-class IN-Val top-1 (%) of each synthetic row's model beside the model trained on real "
             f"images of the same classes; the {WORST} classes with the largest gap (synthetic - real) a row, "
             "and the filter's pass rate (%) of the class where the row's runs filtered (`filter: clip`: CLIP's). "
             "Figure: per_class_gap.png.", ""]
    if not found:
        return "\n".join(lines + ["No synthetic row has per-class scores beside a real baseline yet (eval-imagenet "
                                  "writes them in reports/imagenet.json; run Table 1 row 1 or configure the "
                                  "torchvision reference model).", ""])
    for item in found:
        lines += [f"## Row {item['row']}: {item['label']} ({item['runs']} runs) vs {item['baseline']}", "",
                  f"Mean gap over {len(item['classes'])} classes: {item['mean_gap']:+.1f} points.", "",
                  "| class | name | real | synthetic | gap | filter pass rate |", "|---|---|---|---|---|---|"]
        for c in item["classes"][:WORST]:
            rate = "–" if c["pass_rate"] is None else f"{c['pass_rate']:.0f}"
            lines.append(f"| {c['key']} | {_name(c['key'])} | {c['real']:.1f} | {c['synthetic']:.1f} | "
                         f"{c['gap']:+.1f} | {rate} |")
        lines.append("")
    return "\n".join(lines)


def figure(runs, path: Path, found: list[dict] | None = None) -> Path:
    """Per class, real top-1 (x) against synthetic (y), one panel a row (the first PLOTTED), the
    worst three named; a point under the diagonal is a class the synthetic data teaches worse."""
    found = (comparisons(runs) if found is None else found)[:PLOTTED]
    plt = pyplot()
    fig, axes = plt.subplots(1, max(1, len(found)), figsize=(4.2 * max(1, len(found)), 4.2), squeeze=False)
    if not found:
        axes[0][0].text(0.5, 0.5, "no synthetic row with per-class scores\nbeside a real baseline yet",
                        ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, item in zip(axes[0], found):
        xs, ys = [c["real"] for c in item["classes"]], [c["synthetic"] for c in item["classes"]]
        ax.scatter(xs, ys, s=10, alpha=0.6)
        ax.plot([0, 100], [0, 100], color="grey", linewidth=0.8)
        for c in item["classes"][:3]:
            ax.annotate(_name(c["key"]), (c["real"], c["synthetic"]), fontsize=7)
        ax.set(xlim=(-2, 102), ylim=(-2, 102), xlabel=f"{item['baseline']}: IN-Val top-1 per class (%)",
               ylabel="synthetic: IN-Val top-1 per class (%)", title=f"row {item['row']}: {item['label']}")
        ax.title.set_fontsize(9)
    return save(fig, path)
