"""The paper's tables and figures from this repository's DVC experiments, beside the paper's numbers.

    python -m imagenet_sd.report --profile paper              # -> reports/paper/
    python -m imagenet_sd.report --profile embedded --out /tmp/r

Reads the experiments of the current commit through `dvc exp show --json` (module
experiments), finds each table row's runs by their params (whatever they were named;
several runs of a row, e.g. seeds, are averaged and counted), and writes:

- table1.md, table2.md: the paper's layout, every cell "this run / the paper (difference)";
  a row not run yet says "missing", never 0. ▲ marks a score above the real-image model
  of the same class set, as the paper's brick colour does (the run's against the run's,
  the paper's against the paper's). IN-R and IN-A are the restricted scores (logits of the
  shared classes only; metrics key top1, not top1_all_logits), as the paper's footnote
  reads most naturally.
- claims.md: the paper's headline claims checked on these runs, PASS / FAIL / NOT CHECKED.
- per_class.md, per_class_gap.png: the classes whose synthetic model falls furthest behind the
  real one (module report.classes).
- digits.md: the `digits` group, Table 1 at digit scale on the digits profile, with the ratio of each
  row to the real baseline beside the paper's, and every row's top-1 per class (module report.digits).
- he2023.md: He et al. (ICLR 2023)'s study on these runs (groups he2023, he2023-fewshot):
  zero-shot CLIP, then CLIP's head tuned on synthetic images (+ LE, + CF, K-shot real
  guidance), top-1 on the ImageNet test sets and zero-shot transfer; our runs only.
- fig1_radar.png (Fig. 1), fig2_prompts.png (Fig. 2), fig4_scaling.png (Fig. 4),
  sweep_steps.png and sweep_guidance.png (the supplementary's sweeps).

It is a command, not a DVC stage: its input is the set of experiments, which no stage's
deps can name. Its outputs are ignored by git (they contain figures); re-run it any time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean

from imagenet_sd.core.errors import UserError
from imagenet_sd.experiments import catalog, queue
from imagenet_sd.experiments.catalog import PROMPT_LABELS, TABLE1, TABLE2_FROM_TABLE1, Setting
from imagenet_sd.experiments.queue import Run
from imagenet_sd.filter.registry import FILTERS
from imagenet_sd.report import paper
from imagenet_sd.report.paper import TEST_SETS, TRANSFER

REFERENCE_ROWS = {13: "torchvision-resnet50", 14: "timm-resnet50-a1"}        # Table 1 row -> model key
TABLE2_BASELINES = {1: "random-init", 4: "torchvision-resnet50", 5: "timm-resnet50-a1"}
MISSING = "missing"


# --------------------------------------------------------------------------- reading runs

class Runs:
    """One profile's runs, and what each table cell reads from them."""

    def __init__(self, runs: list[Run], profile: str, repo: Path):
        self.all = [r for r in runs if r.profile == profile and r.done]
        self.finished = [r for r in runs if r.profile == profile and r.state == "success"]
        self.profile, self.repo = profile, repo
        self._details: dict[str, dict | None] = {}

    def of(self, setting: Setting) -> list[Run]:
        """The setting's finished runs, with the metrics it needs (He et al.'s run to clip-tune only)."""
        return [r for r in self.finished if r.done_for(setting.needs) and setting.matches(r.params)]

    def value(self, setting: Setting, metrics_file: str, *keys: str) -> float | None:
        """Mean over the setting's runs of metrics_file[keys...]; None if no run has it."""
        return mean_of(self.of(setting), metrics_file, *keys)

    def details(self, run: Run, path: str) -> dict | None:
        """A run's non-metrics JSON (reports/*.json), a cached DVC out, read at the run's revision."""
        key = f"{run.rev}:{path}"
        if key not in self._details:
            import dvc.api
            try:
                self._details[key] = json.loads(dvc.api.read(path, repo=str(self.repo), rev=run.rev))
            except Exception:           # not in the cache (pulled elsewhere), or an older layout
                self._details[key] = None
        return self._details[key]

    def reference(self, model: str, *keys: str) -> float | None:
        """A reference model's score; every run of a profile computes the same, so the newest is taken."""
        for run in reversed(self.all):
            if (v := dig(run.metrics.get("metrics/imagenet.json"), ("reference", model, *keys))) is not None:
                return v
        return None

    def reference_transfer_average(self, model: str) -> float | None:
        """A baseline's average transfer top-1 (metrics/transfer.json baselines.<model>), newest run."""
        for run in reversed(self.all):
            if (v := dig(run.metrics.get("metrics/transfer.json"), ("baselines", model, "average_top1"))) is not None:
                return v
        return None

    def baseline_transfer(self, model: str, dataset: str) -> float | None:
        """eval-transfer's baseline (random-init or a reference model) on one dataset: in the details file."""
        for run in reversed(self.all):
            if (v := dig(self.details(run, "reports/transfer.json"), ("baselines", model, dataset, "top1"))) is not None:
                return v
        return None


def mean_of(runs: list[Run], metrics_file: str, *keys: str) -> float | None:
    """Mean over `runs` of metrics_file[keys...]; None if no run has it."""
    found = [v for r in runs if (v := dig(r.metrics.get(metrics_file), keys)) is not None]
    return mean(found) if found else None


def dig(data, keys):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data if isinstance(data, (int, float)) and not isinstance(data, bool) else None


# --------------------------------------------------------------------------- tables

def cell(run: float | None, paper_value: float | None, run_beats: bool = False, paper_beats: bool = False) -> str:
    ours = MISSING if run is None else f"{'▲' if run_beats else ''}{run:.1f}"
    if paper_value is None:
        return ours
    theirs = f"{'▲' if paper_beats else ''}{paper_value:.1f}"
    diff = "" if run is None else f" ({run - paper_value:+.1f})"
    return f"{ours} / {theirs}{diff}"


def _above(value, baseline) -> bool:
    return value is not None and baseline is not None and value > baseline


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def table1(runs: Runs) -> str:
    paper_rows = {r["row"]: r for r in paper.table(1)}
    columns = [(name, k) for name, _ in TEST_SETS for k in ("top1", "top5")]

    def ours(row: int, name: str, k: str) -> float | None:
        if row in REFERENCE_ROWS:
            return runs.reference(REFERENCE_ROWS[row], name, k)
        return runs.value(TABLE1[row], "metrics/imagenet.json", name, k)

    def real_best(rows, source) -> dict:
        """Per column, the best real-image score among `rows`: what ▲ compares with."""
        out = {}
        for name, k in columns:
            values = [v for row in rows if (v := source(row, name, k)) is not None]
            out[name, k] = max(values) if values else None
        return out

    paper_value = lambda row, name, k: paper_rows[row][f"{name}_{k}"]
    real = {"imagenet100": (real_best([1], ours), real_best([1], paper_value)),
            "imagenet1k": (real_best([13, 14], ours), real_best([13, 14], paper_value))}
    lines, protocols = [], Protocols()
    for row in sorted(paper_rows):
        p = paper_rows[row]
        setting = TABLE1.get(row)
        synthetic = setting is not None and setting.params.get("source") == "synthetic"
        ours_real, paper_real = real[setting.params["classes"]] if synthetic else ({}, {})
        cells = [cell(v := ours(row, name, k), paper_value(row, name, k),
                      synthetic and _above(v, ours_real.get((name, k))),
                      synthetic and _above(paper_value(row, name, k), paper_real.get((name, k))))
                 for name, k in columns]
        lines.append([str(row), p["training_data"], p["relative_size"], p["guidance"], p["prompt_or_model"],
                      _count(runs, setting) if setting else "reference"] + cells
                     + [protocols.cell(str(row), runs.of(setting)) if setting else "–"])
    for setting in catalog.groups()["beyond"]:
        ours_real = real["imagenet100"][0]
        cells = [cell(v := runs.value(setting, "metrics/imagenet.json", name, k), None,
                      _above(v, ours_real.get((name, k)))) for name, k in columns]
        lines.append([setting.name, "ImageNet-100-SD", "1x", f"{setting.params['guidance']}",
                      PROMPT_LABELS["c_hc_bm"], _count(runs, setting)] + cells
                     + [protocols.cell(setting.name, runs.of(setting))])
    header = ["row", "training data", "size", "guidance", "prompt / model", "runs"] + \
             [f"{label} {k}" for name, label in TEST_SETS for k in ("top-1", "top-5")] + ["protocol"]
    return "\n".join([
        f"# Table 1: top-1 / top-5 on ImageNet test sets (profile `{runs.profile}`)", "",
        "Each cell: this repository's run / the paper (difference). `missing`: no finished experiment has "
        "this row's params yet (`python -m imagenet_sd.experiments queue table1 --profile "
        f"{runs.profile}`). ▲: above the model trained on real images of the same classes (row 1 for "
        "ImageNet-100, the better of rows 13-14 for ImageNet-1K), the paper's brick colour. "
        "*IN-R and IN-A: only the classes shared with the model, logits restricted to them. "
        "`runs`: finished experiments averaged in the cell. Rows named `beyond-*` are not in the paper "
        "(class-matched backgrounds, its Sec. 4.3 future work).", "",
        *_markdown(header, lines), "", *protocols.legend()])


def table2(runs: Runs) -> str:
    paper_rows = {r["row"]: r for r in paper.table(2)}

    def ours(row: int, dataset: str) -> float | None:
        if row in TABLE2_BASELINES:
            return runs.baseline_transfer(TABLE2_BASELINES[row], dataset)
        return runs.value(TABLE1[TABLE2_FROM_TABLE1[row]], "metrics/transfer.json", dataset, "top1")

    def average(row: int) -> float | None:
        values = [ours(row, d) for d in TRANSFER]
        return mean(values) if all(v is not None for v in values) else None    # over the ten, or not at all

    def scores(row: int, source) -> dict:
        return {**{d: source(row, d) for d in TRANSFER}, "average": average(row) if source is ours
                else paper_rows[row]["average"]}

    paper_value = lambda row, d: paper_rows[row][d]
    real_rows = {"imagenet100": [2], "imagenet1k": [4, 5]}
    lines, protocols = [], Protocols()
    for row in sorted(paper_rows):
        p = paper_rows[row]
        mine, theirs = scores(row, ours), scores(row, paper_value)
        trained = TABLE1[TABLE2_FROM_TABLE1[row]] if row in TABLE2_FROM_TABLE1 else None
        synthetic = trained is not None and trained.params["source"] == "synthetic"
        reals = real_rows[trained.params["classes"]] if synthetic else []
        best = lambda source, column: max((v for r in reals if (v := scores(r, source)[column]) is not None),
                                          default=None)
        cells = [cell(mine[c], theirs[c], synthetic and _above(mine[c], best(ours, c)),
                      synthetic and _above(theirs[c], best(paper_value, c))) for c in (*TRANSFER, "average")]
        count = _count(runs, trained) if trained else "baseline"
        lines.append([str(row), p["training_data"], p["guidance"], p["prompt_or_model"], count] + cells
                     + [protocols.cell(str(row), runs.of(trained)) if trained else "–"])
    header = ["row", "training data", "guidance", "prompt / model", "runs", *TRANSFER, "average", "protocol"]
    others = _other_transfer(runs)
    return "\n".join([
        f"# Table 2: top-1 of linear probes on ten transfer datasets (profile `{runs.profile}`)", "",
        "Each cell: this repository's run / the paper (difference); `missing`: not run, or the dataset is "
        "not configured (`profiles.<profile>.transfer.datasets`). The average is over the ten or missing. "
        "Rows 1, 4, 5 are eval-transfer's baselines (random weights, the reference models). "
        "▲: above the real-image model(s) of the same classes.", "",
        *_markdown(header, lines), "", *protocols.legend(), *others])


def _other_transfer(runs: Runs) -> list[str]:
    """Datasets of these runs beyond the ten (fixtures, ImageNet-CoG), so that no score is hidden."""
    rows = []
    for row in sorted(TABLE2_FROM_TABLE1):
        setting = TABLE1[TABLE2_FROM_TABLE1[row]]
        for run in runs.of(setting):
            data = run.metrics.get("metrics/transfer.json") or {}
            extra = {k: v["top1"] for k, v in data.items() if isinstance(v, dict) and "top1" in v and k not in TRANSFER}
            if extra:
                rows.append([str(row), run.name, ", ".join(f"{k} {v:.1f}" for k, v in extra.items())])
    if not rows:
        return []
    return ["## Other transfer datasets of these runs (not in the paper's Table 2)", "",
            *_markdown(["row", "experiment", "top-1"], rows), ""]


def _count(runs: Runs, setting: Setting | None) -> str:
    n = len(runs.of(setting)) if setting else 0
    return str(n) if n else MISSING


# --------------------------------------------------------------------------- protocols

def protocol(params: dict) -> str:
    """The choices of a run that its setting's params do not fix but that move its numbers (the
    classifier head, residual init, CLIP filter's count and texts, LE's sentences a class), read
    from its params.yaml. A key a run predates reads as what the code did then: zero-init
    residual on, every passing image kept, WordNet names, one sentence an image."""
    block = (params.get("profiles") or {}).get(params.get("profile"), {}) or {}
    train = block.get("train") or {}
    parts = [f"head {train.get('head', 'linear')}, "
             f"zero-init residual {'on' if train.get('zero_init_residual', True) else 'off'}"]
    if params.get("prompt") == "le":
        n = params.get("le_sentences_per_class", 0)
        parts.append(f"LE {n} sentences a class" if n else "LE one sentence an image")
    if params.get("filter") in FILTERS:         # the filter says what of its settings moves the numbers
        parts += FILTERS[params["filter"]].protocol(params)
    if params.get("clip_tune"):
        parts.append(f"CLIP names {params.get('clip_class_names', 'wordnet')}, "
                     f"templates {params.get('clip_templates', 'he2023')}")
    return "; ".join(dict.fromkeys(parts))       # clip-tune and the CLIP filter name the same texts once


class Protocols:
    """Short names (P1, P2, ...) of the protocols of one table's runs, and the rows that mix them."""

    def __init__(self):
        self.names: dict[str, str] = {}
        self.mixed: list[str] = []

    def cell(self, row: str, runs: list[Run]) -> str:
        found = list(dict.fromkeys(protocol(r.params) for r in runs))
        for text in found:
            self.names.setdefault(text, f"P{len(self.names) + 1}")
        if len(found) > 1:
            self.mixed.append(row)
            return "⚠ " + " + ".join(self.names[t] for t in found)
        return self.names[found[0]] if found else "–"

    def legend(self) -> list[str]:
        lines = [f"- {name}: {text}" for text, name in self.names.items()]
        if self.mixed:
            lines.insert(0, f"- ⚠ rows {', '.join(self.mixed)} average runs of different protocols: compare "
                            "them with care, or run them again under one")
        return ["Protocol of each row's runs (`protocol`; docs/experiments.md#protocols):", "", *lines, ""] if lines else []


def he2023_table(runs: Runs) -> str:
    """He et al.'s zero-shot / few-shot study: each setting's tuned head beside zero-shot CLIP."""
    groups = catalog.groups()
    settings = groups["he2023"] + groups["he2023-fewshot"]
    clip = "metrics/clip.json"
    # Zero-shot CLIP does not depend on the synthetic images: every run of the study scores the same head.
    every = [r for s in settings for r in runs.of(s)]
    zero = {name: mean_of(every, clip, "zero_shot", name, "top1") for name, _ in TEST_SETS}
    protocols = Protocols()
    lines = [["zero-shot CLIP", "class names only", "–", str(len(every)) if every else MISSING,
              *[_pct_or_missing(v) for v in zero.values()],
              _pct_or_missing(mean_of(every, clip, "zero_shot", "transfer", "average_top1")),
              protocols.cell("zero-shot CLIP", every)]]
    for s in settings:
        cells = []
        for name, _ in TEST_SETS:
            v = runs.value(s, clip, "tuned", name, "top1")
            change = "" if v is None or zero[name] is None else f" ({v - zero[name]:+.1f})"
            cells.append(MISSING if v is None else f"{v:.1f}{change}")
        lines.append([s.name, s.label, _params_text(s), _count(runs, s), *cells, "–",
                      protocols.cell(s.name, runs.of(s))])
    header = ["setting", "what", "params", "runs", *[label.rstrip("*") for _, label in TEST_SETS],
              "transfer (zero-shot avg)", "protocol"]
    return "\n".join([
        f"# He et al. (ICLR 2023): CLIP tuned on synthetic data (profile `{runs.profile}`)", "",
        "Top-1 (%) of CLIP's linear head on the ImageNet test sets: zero-shot (initialised from the class "
        "names' text embeddings), then tuned by the clip-tune stage on the synthetic images of each setting "
        "(in brackets: the change from zero-shot CLIP). Our runs only: the paper's own numbers use GLIDE and "
        "other test sets. `missing`: no finished experiment has the setting's params "
        f"(`python -m imagenet_sd.experiments queue he2023 he2023-fewshot --profile {runs.profile}`). "
        "Transfer: zero-shot CLIP averaged over the transfer datasets with class names; a tuned head "
        "knows only ImageNet's classes. IN-R and IN-A: the classes shared with the model.", "",
        *_markdown(header, lines), "", *protocols.legend()])


def _params_text(setting: Setting) -> str:
    shown = [(k, setting.params[k]) for k in ("prompt", "filter", "shots", "init_strength")
             if setting.params.get(k) not in (None, 0, "none")]
    return ", ".join(f"`{k}: {v}`" for k, v in shown)


def _pct_or_missing(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


# --------------------------------------------------------------------------- claims

def claims(runs: Runs) -> list[str]:
    """The paper's headline claims, each checked on these runs and naming its source."""
    val = lambda row: runs.value(TABLE1[row], "metrics/imagenet.json", "val", "top1")
    transfer = lambda setting: runs.value(setting, "metrics/transfer.json", "average_top1")
    scale10 = next(s for s in catalog.groups()["scaling"] if s.params["scale"] == 10)
    checks = [
        ("Table 1 rows 6-9 vs 2-5: guidance 2.0 beats 7.5 on IN-Val top-1 for every prompt (Sec. 4.3)",
         [(val(r + 4), val(r)) for r in (2, 3, 4, 5)]),
        ("Table 1 row 12 vs row 8: 50x images beat 1x on IN-Val top-1 (Sec. 5.1)", [(val(12), val(8))]),
        ("Table 1 row 5 vs row 2: 'c, h_c inside b' beats 'c' on IN-Val top-1 at guidance 7.5 (Sec. 4.3)",
         [(val(5), val(2))]),
        ("Fig. 4: 10x synthetic beats real ImageNet-100 on average transfer top-1 (Sec. 5.3)",
         [(transfer(scale10), transfer(TABLE1[1]))]),
        ("Table 2 row 8 vs rows 4-5: IN-1K-SD (c, d_c, 2.0) beats the ImageNet-1K references on average "
         "transfer top-1 (Sec. 5.3)",
         [(transfer(TABLE1[17]), runs.reference_transfer_average(m)) for m in REFERENCE_ROWS.values()]),
        ("Table 1 row 17 vs row 15: guidance 2.0 beats 7.5 on ImageNet-1K IN-Val top-1 (Sec. 5.1)",
         [(val(17), val(15))]),
    ]
    return [f"{_verdict(pairs)}  {text}" for text, pairs in checks]


def _verdict(pairs: list[tuple[float | None, float | None]]) -> str:
    if any(a is None or b is None for a, b in pairs):
        return "NOT CHECKED (rows missing)"
    return "PASS" if all(a > b for a, b in pairs) else "FAIL"


# --------------------------------------------------------------------------- the command

def write(repo: Path, profile: str, out: Path, all_commits: bool = False) -> list[Path]:
    from imagenet_sd.report import classes, digits, figures
    queue.check_profile(repo, profile)
    runs = Runs(queue.read_runs(repo, all_commits), profile, repo)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    gaps = classes.comparisons(runs)
    for name, text in (("table1.md", table1(runs)), ("table2.md", table2(runs)), ("he2023.md", he2023_table(runs)),
                       ("per_class.md", classes.markdown(runs, gaps)), ("digits.md", digits.table(runs)),
                       ("claims.md", "# Headline claims\n\n" + "\n".join(f"- {c}" for c in claims(runs)) + "\n")):
        (out / name).write_text(text)
        written.append(out / name)
    written += figures.draw_all(runs, out)
    written.append(classes.figure(runs, out / "per_class_gap.png", gaps))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagenet_sd.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded", help="the profile whose experiments to report")
    parser.add_argument("--out", type=Path, default=Path("reports/paper"))
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--all-commits", action="store_true", help="also experiments of other commits")
    args = parser.parse_args(argv)
    try:
        written = write(args.repo, args.profile, args.out, args.all_commits)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((args.out / "claims.md").read_text())
    for path in written:
        print(f"wrote {path}")
    return 0

