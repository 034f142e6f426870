"""The paper's Tables 1 and 2, He et al.'s table and the headline claims, from a profile's runs
(module runs) beside the paper's numbers (module paper): every cell "this run / the paper
(difference)"; a row not run yet says "missing", never 0. ▲ marks a score above the real-image model
of the same class set, as the paper's brick colour does (the run's against the run's, the paper's
against the paper's). IN-R and IN-A are the restricted scores (logits of the shared classes only;
metrics key top1, not top1_all_logits), as the paper's footnote reads most naturally.

The command that writes them with the figures: module command (`python -m imagenet_sd.report`).
"""
from __future__ import annotations

from statistics import mean

from imagenet_sd.experiments import catalog
from imagenet_sd.experiments.catalog import PROMPT_LABELS, SYNTHETIC, TABLE1, TABLE2_FROM_TABLE1, Setting
from imagenet_sd.experiments.queue import Run
from imagenet_sd.filter.registry import FILTERS
from imagenet_sd.report import paper
from imagenet_sd.report.paper import TEST_SETS, TRANSFER
from imagenet_sd.report.runs import MISSING, Runs, markdown_table, mean_of, network

REFERENCE_ROWS = {13: "torchvision-resnet50", 14: "timm-resnet50-a1"}        # Table 1 row -> model key
TABLE2_BASELINES = {1: "random-init", 4: "torchvision-resnet50", 5: "timm-resnet50-a1"}


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
                      network(runs.of(setting), setting) if setting else REFERENCE_ROWS[row],
                      _count(runs, setting) if setting else "reference"] + cells
                     + [protocols.cell(str(row), runs.of(setting)) if setting else "–"])
    for setting in catalog.groups()["beyond"]:
        ours_real = real["imagenet100"][0]
        cells = [cell(v := runs.value(setting, "metrics/imagenet.json", name, k), None,
                      _above(v, ours_real.get((name, k)))) for name, k in columns]
        lines.append([setting.name, "ImageNet-100-SD", "1x", f"{setting.params['guidance']}",
                      PROMPT_LABELS["c_hc_bm"], network(runs.of(setting), setting), _count(runs, setting)] + cells
                     + [protocols.cell(setting.name, runs.of(setting))])
    header = ["row", "training data", "size", "guidance", "prompt / model", "network", "runs"] + \
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
        *markdown_table(header, lines), "", *protocols.legend()])


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
        net = network(runs.of(trained), trained) if trained else TABLE2_BASELINES[row]
        lines.append([str(row), p["training_data"], p["guidance"], p["prompt_or_model"], net, count] + cells
                     + [protocols.cell(str(row), runs.of(trained)) if trained else "–"])
    header = ["row", "training data", "guidance", "prompt / model", "network", "runs", *TRANSFER, "average",
              "protocol"]
    others = _other_transfer(runs)
    return "\n".join([
        f"# Table 2: top-1 of linear probes on ten transfer datasets (profile `{runs.profile}`)", "",
        "Each cell: this repository's run / the paper (difference); `missing`: not run, or the dataset is "
        "not configured (`profiles.<profile>.transfer.datasets`). The average is over the ten or missing. "
        "Rows 1, 4, 5 are eval-transfer's baselines (random weights, the reference models). "
        "▲: above the real-image model(s) of the same classes.", "",
        *markdown_table(header, lines), "", *protocols.legend(), *others])


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
            *markdown_table(["row", "experiment", "top-1"], rows), ""]


def _count(runs: Runs, setting: Setting | None) -> str:
    n = len(runs.of(setting)) if setting else 0
    return str(n) if n else MISSING


# --------------------------------------------------------------------------- protocols

def protocol(params: dict) -> str:
    """The choices of a run that its setting's params do not fix but that move its numbers (the
    classifier head, residual init, CLIP filter's count and texts, LE's sentences a class), read
    from its params.yaml. A key a run predates reads as what the code did then: zero-init
    residual on, every passing image kept, WordNet names, one sentence an image, LE from WordNet lemmas."""
    block = (params.get("profiles") or {}).get(params.get("profile"), {}) or {}
    train = block.get("train") or {}
    parts = [f"head {train.get('head', 'linear')}, "
             f"zero-init residual {'on' if train.get('zero_init_residual', True) else 'off'}"]
    if params.get("prompt") == "le":
        n, k = params.get("le_sentences_per_class", 0), params.get("le_images_per_sentence", 0)
        parts.append(f"LE {k} images a sentence" if k else f"LE {n} sentences a class" if n else "LE one sentence an image")
        names = params.get("le_class_names", "wordnet")
        parts.append(f"LE from {'CLIP names ' + params.get('clip_class_names', 'wordnet') if names == 'clip' else 'WordNet lemmas'}")
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
    settings = groups["he2023"] + groups["he2023-fewshot"] + groups["he2023-fewshot-guidance"]
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
        f"(`python -m imagenet_sd.experiments queue he2023 he2023-fewshot he2023-fewshot-guidance --profile "
        f"{runs.profile}`). "
        "Transfer: zero-shot CLIP averaged over the transfer datasets with class names; a tuned head "
        "knows only ImageNet's classes. IN-R and IN-A: the classes shared with the model.", "",
        *markdown_table(header, lines), "", *protocols.legend()])


VIT_B_SETS = ("val", "v2", "sketch", "r", "a")      # the test sets Deliberate Practice's Table 1 reports


def vit_b_table(runs: Runs) -> str:
    """The vit-b group: ViT-B/16 on synthetic ImageNet-1K beside Fan et al.'s and Deliberate Practice's numbers."""
    papers = {r["setting"]: r for r in paper.rows("vit_b")}
    labels = dict(TEST_SETS)
    protocols, lines = Protocols(), []
    for s in catalog.groups()["vit-b"]:
        theirs = papers.get(s.name)
        cells = [cell(runs.value(s, "metrics/imagenet.json", name, "top1"),
                      theirs[f"{name}_top1"] if theirs else None) for name in VIT_B_SETS]
        source = f"{theirs['source']}, {theirs['images']}, {theirs['iterations']} it. ({theirs['match']}: " \
                 f"{theirs['note']})" if theirs else "–"
        lines.append([s.name, s.label, network(runs.of(s), s), _count(runs, s), *cells, source,
                      protocols.cell(s.name, runs.of(s))])
    header = ["setting", "what", "network", "runs", *[labels[n].rstrip("*") + " top-1" for n in VIT_B_SETS],
              "paper row", "protocol"]
    return "\n".join([
        f"# ViT-B/16 on synthetic ImageNet-1K (profile `{runs.profile}`)", "",
        "Group `vit-b`: `train_recipe: vit_b` (DeiT-B's recipe: docs/training.md#the-vit-b-recipe) at the settings "
        "of Fan et al. (CVPR 2024) and Deliberate Practice (Askari-Hemmat et al., ICML 2025). Each cell: this "
        "repository's run / the paper's number as Deliberate Practice's Table 1 reports it (difference); `same`: "
        "the paper's setting, `near`: what differs is named (data/paper/vit_b.tsv). `missing`: not run yet "
        f"(`python -m imagenet_sd.experiments queue vit-b --profile {runs.profile}`). *IN-R and IN-A: ours on "
        "the classes shared with the model; the papers do not say which.", "",
        *markdown_table(header, lines), "", *protocols.legend()])


def _params_text(setting: Setting) -> str:
    shown = [(k, setting.params[k]) for k in ("prompt", "filter", "shots", "init_strength")
             if setting.params.get(k) not in (None, 0, "none")]
    if setting.params.get("guidance") != SYNTHETIC["guidance"]:      # the study's own is 7.5 (catalog)
        shown.append(("guidance", setting.params["guidance"]))
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
