"""The report's figures (module report): the paper's Figs. 1, 2 and 4 and the supplementary's sweeps.

Each figure is drawn from whatever runs exist: a missing point is left out and named in
the figure, never drawn as 0. matplotlib with the Agg backend (no display needed).
"""
from __future__ import annotations

import io
from pathlib import Path
from statistics import mean

import numpy as np

from imagenet_sd.evaluate import representation
from imagenet_sd.experiments import catalog
from imagenet_sd.experiments.catalog import PROMPT_LABELS, TABLE1, Setting
from imagenet_sd.generate.samples import FIGURE2_CLASSES
from imagenet_sd.report import paper
from imagenet_sd.report.paper import COG_LEVELS, LONG_TAIL, SMALL_SCALE, TEST_SETS
from imagenet_sd.report.runs import metric_at

IMAGENET = "metrics/imagenet.json"
TRANSFER = "metrics/transfer.json"


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    tmp.replace(path)            # never a half-written PNG under the real name
    return path


def draw_all(runs, out: Path) -> list[Path]:
    return [radar(runs, out / "fig1_radar.png"), prompt_grid(runs, out / "fig2_prompts.png"),
            representation_radar(runs, out / "representation_radar.png"),
            scaling(runs, out / "fig4_scaling.png"),
            sweep(runs, "steps", "steps", "diffusion steps", out / "sweep_steps.png"),
            sweep(runs, "guidance", "guidance", "guidance scale", out / "sweep_guidance.png"),
            price(runs, out / "price.png")]


# --------------------------------------------------------------------------- Fig. 1

def _datasets(runs) -> list[str]:
    """Transfer datasets the runs were probed on (names of metrics/transfer.json's per-dataset entries)."""
    names: list[str] = []
    for run in runs.all:
        for key, value in (run.metrics.get(TRANSFER) or {}).items():
            if isinstance(value, dict) and "top1" in value and key not in names and key != "baselines":
                names.append(key)
    return names


def _groups(datasets: list[str]) -> dict[str, list[str]]:
    groups = {"small-scale": [d for d in datasets if d in SMALL_SCALE],
              "long-tail": [d for d in datasets if d in LONG_TAIL],
              "CoG": [d for d in datasets if d in COG_LEVELS]}
    groups["other transfer"] = [d for d in datasets if not any(d in g for g in groups.values())]
    return {f"{name} ({len(members)})": members for name, members in groups.items() if members}


def polygon(scores_of_set, transfer_of_dataset, groups: dict[str, list[str]]) -> dict[str, float | None]:
    """Fig. 1's axes: top-5 on the five ImageNet test sets, average transfer top-1 per dataset group."""
    axes = {f"{label} top-5": scores_of_set(name) for name, label in TEST_SETS}
    for group, members in groups.items():
        values = [transfer_of_dataset(d) for d in members]
        axes[group] = mean(values) if values and all(v is not None for v in values) else None
    return axes


def real_vs_synthetic(runs) -> list[tuple[str, Setting]]:
    """ImageNet-100's real row 1 and its best synthetic row of Table 1 (by IN-Val top-1), those that ran."""
    pair = [("ImageNet-100 (real, row 1)", TABLE1[1])] if runs.of(TABLE1[1]) else []
    synthetic = [(runs.value(TABLE1[r], IMAGENET, "val", "top1"), r) for r in range(2, 13) if runs.of(TABLE1[r])]
    if synthetic:
        row = max(synthetic)[1]
        pair.append((f"ImageNet-100-SD (row {row}: {TABLE1[row].label})", TABLE1[row]))
    return pair


def fig1_models(runs) -> list[tuple[str, dict]]:
    """(label, axes) of real vs synthetic: ImageNet-1K (row 13 vs 17) when row 17 exists, else ImageNet-100
    (`real_vs_synthetic`)."""
    groups = _groups(_datasets(runs))
    trained = lambda s: polygon(lambda name: runs.value(s, IMAGENET, name, "top5"),
                                lambda d: runs.value(s, TRANSFER, d, "top1"), groups)
    if runs.of(TABLE1[17]) and runs.reference("torchvision-resnet50", "val", "top5") is not None:
        real = polygon(lambda name: runs.reference("torchvision-resnet50", name, "top5"),
                       lambda d: runs.baseline_transfer("torchvision-resnet50", d), groups)
        return [("ImageNet-1K (torchvision ResNet-50, row 13)", real), ("ImageNet-1K-SD (row 17)", trained(TABLE1[17]))]
    return [(label, trained(setting)) for label, setting in real_vs_synthetic(runs)]


def radar(runs, path: Path) -> Path:
    plt = pyplot()
    models = fig1_models(runs)
    fig = plt.figure(figsize=(7, 7))
    ax = fig.add_subplot(projection="polar")
    if not models:
        ax.set_title("Fig. 1: no finished run of Table 1 rows 1-12 or 17 yet")
        return save(fig, path)
    axes = list(models[0][1])
    angles = np.linspace(0, 2 * np.pi, len(axes), endpoint=False)
    for (label, values), colour in zip(models, ("tab:blue", "tab:red", "tab:green")):
        # A missing axis is drawn at the centre and named in the legend, not plotted as a score.
        r = [values[a] if values[a] is not None else 0.0 for a in axes]
        missing = [a for a in axes if values[a] is None]
        ax.plot(np.append(angles, angles[0]), r + r[:1], color=colour,
                label=label + (f" (missing: {', '.join(missing)})" if missing else ""))
        ax.fill(np.append(angles, angles[0]), r + r[:1], color=colour, alpha=0.15)
    ax.set_xticks(angles, axes, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_title("Fig. 1: top-5 on ImageNet test sets, average transfer top-1 per group (%)", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=8)
    return save(fig, path)


def representation_radar(runs, path: Path) -> Path:
    """The supplementary's spider plot: the encoder's feature statistics on IN val, real vs synthetic."""
    stats = {}
    for label, setting in real_vs_synthetic(runs):
        values = {k: runs.value(setting, IMAGENET, "representation", k) for k in representation.KEYS}
        stats[label] = {k: v for k, v in values.items() if v is not None}
    try:
        representation.radar(stats, path, "Encoder features on IN val (t-ReX statistics; module representation)")
    except ValueError as exc:          # no runs yet, or too few statistics: say so in the figure
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"representation radar not drawn: {exc}", ha="center", wrap=True)
        save(fig, path)
    return path


# --------------------------------------------------------------------------- Fig. 2

def _samples(runs, setting: Setting):
    """The sample grid (reports/samples.png) of the setting's newest run, read from DVC at its revision."""
    import dvc.api
    from PIL import Image
    for run in reversed(runs.of(setting)):
        try:
            return Image.open(io.BytesIO(dvc.api.read("reports/samples.png", repo=str(runs.repo), rev=run.rev,
                                                      mode="rb"))).convert("RGB")
        except Exception:       # not in this machine's cache
            continue
    return None


def _real_images(runs):
    """Real images of Fig. 2's classes from data.train, when it is set: a grid like the samples'."""
    from PIL import Image

    from imagenet_sd.generate.samples import draw_grid
    for run in runs.all:
        root = ((run.params.get("profiles") or {}).get(runs.profile) or {}).get("data", {}).get("train")
        if not root:
            continue
        root = Path(root).expanduser()
        root = root if root.is_absolute() else runs.repo / root
        rows = []
        for wnid, name in FIGURE2_CLASSES.items():
            files = sorted((root / wnid).glob("*"))[:6] if (root / wnid).is_dir() else []
            if files:
                rows.append((name, [Image.open(f).convert("RGB") for f in files]))
        if rows:
            return draw_grid(rows, columns=max(len(images) for _, images in rows))
    return None


def prompt_grid(runs, path: Path) -> Path:
    plt = pyplot()
    prompts = ("c", "c_hc", "c_dc", "c_hc_b", "c_hc_bm")
    by_cell = {}
    for s in [TABLE1[r] for r in range(2, 10)] + catalog.groups()["beyond"]:
        by_cell[s.params["prompt"], s.params["guidance"]] = s
    real = _real_images(runs)
    fig, axes = plt.subplots(2, len(prompts) + 1, figsize=(3.2 * (len(prompts) + 1), 7.5))
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].set_title("(a) real (data.train)", fontsize=9)
    if real is not None:
        axes[0, 0].imshow(real)
    else:
        axes[0, 0].text(0.5, 0.5, "data.train not set", ha="center", transform=axes[0, 0].transAxes)
    for row, guidance in enumerate((7.5, 2.0)):
        for col, prompt in enumerate(prompts, start=1):
            ax, setting = axes[row, col], by_cell[prompt, guidance]
            image = _samples(runs, setting)
            ax.set_title(f"{PROMPT_LABELS[prompt]}\nguidance {guidance} ({setting.name})", fontsize=8)
            if image is None:
                ax.text(0.5, 0.5, "missing", ha="center", transform=ax.transAxes)
            else:
                ax.imshow(image)
    fig.suptitle("Fig. 2: the same classes under each prompt and guidance (each run's reports/samples.png)")
    return save(fig, path)


# --------------------------------------------------------------------------- Fig. 4 and the sweeps

def _transfer_label(runs) -> str:
    names = [d for d in _datasets(runs) if d not in COG_LEVELS]
    return f"average transfer top-1 (%) over {', '.join(names) or 'no dataset'}"


def scaling(runs, path: Path) -> Path:
    plt = pyplot()
    settings = catalog.groups()["scaling"]
    points = [(s.params["scale"], runs.value(s, TRANSFER, "average_top1")) for s in settings]
    done = [(x, y) for x, y in points if y is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if done:
        ax.plot(*zip(*done), "o-", color="tab:red", label="ImageNet-100-SD (c, d_c, 2.0), this repository")
    real = runs.value(TABLE1[1], TRANSFER, "average_top1")
    if real is not None:
        ax.axhline(real, color="tab:blue", label="ImageNet-100 real (row 1), this repository")
    table2 = {r["row"]: r for r in paper.table(2)}
    ax.axhline(table2[2]["average"], color="tab:blue", linestyle=":", label="real, the paper (Table 2 row 2)")
    ax.plot([50], [table2[3]["average"]], "s", mfc="none", color="tab:red", label="50x, the paper (Table 2 row 3)")
    ax.set_xscale("log")
    ax.set_xticks([s.params["scale"] for s in settings], [f"{s.params['scale']:g}x" for s in settings])
    ax.set_xlabel("synthetic images per class, relative to the real dataset")
    ax.set_ylabel(_transfer_label(runs), fontsize=8)
    missing = [f"{x:g}x" for x, y in points if y is None]
    ax.set_title("Fig. 4: scaling the synthetic dataset" + (f"\nmissing: {', '.join(missing)}" if missing else ""),
                 fontsize=10)
    ax.legend(fontsize=7)
    return save(fig, path)


def sweep(runs, group: str, key: str, label: str, path: Path) -> Path:
    plt = pyplot()
    settings = catalog.groups()[group]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (file, keys, name) in zip(axes, ((IMAGENET, ("val", "top1"), "IN-Val top-1 (%)"),
                                              (TRANSFER, ("average_top1",), _transfer_label(runs)))):
        points = [(s.params[key], runs.value(s, file, *keys)) for s in settings]
        done = [(x, y) for x, y in points if y is not None]
        if done:
            ax.plot(*zip(*done), "o-")
        ax.set_xticks([x for x, _ in points])
        ax.set_xlabel(label)
        ax.set_ylabel(name, fontsize=8)
        missing = [f"{x:g}" for x, y in points if y is None]
        if missing:
            ax.set_title(f"missing: {', '.join(missing)}", fontsize=8)
    fig.suptitle(f"Sweep over the {label} (ImageNet-100-SD, c, d_c; `python -m imagenet_sd.experiments "
                 f"queue {group}`)", fontsize=10)
    return save(fig, path)


# --------------------------------------------------------------------------- price

GENERATE = "metrics/generate.json"


def price(runs, path: Path) -> Path:
    """Downstream accuracy against the generator's TFLOP an image (metrics/generate.json's
    tflop_per_image), one point a finished run, labelled with its model, sampler and steps; the
    profile's own model (SD v1.4 on the paper profile) with its sampler at 50 steps, the paper's
    setting, drawn as a star. Runs made before the price was counted are left out."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    priced = [r for r in runs.all if isinstance((r.metrics.get(GENERATE) or {}).get("tflop_per_image"), (int, float))]
    for ax, (file, keys, name) in zip(axes, ((IMAGENET, ("val", "top1"), "IN-Val top-1 (%)"),
                                              (TRANSFER, ("average_top1",), _transfer_label(runs)))):
        for run in priced:
            y = metric_at(run.metrics.get(file), keys)
            if y is None:
                continue
            profile = run.params.get("profile", "")
            model = metric_at(run.params, ("profiles", profile, "generate", "model")) or catalog.DEFAULT_MODELS.get(profile, "")
            paper = (model == catalog.DEFAULT_MODELS.get(profile, model) and run.params.get("steps") == 50
                     and run.params.get("scheduler", "model") == "model")
            x = run.metrics[GENERATE]["tflop_per_image"]
            ax.plot(x, y, "*" if paper else "o", markersize=11 if paper else 6, color="C3" if paper else "C0")
            ax.annotate(f"{Path(str(model)).name} {run.params.get('scheduler', 'model')} {run.params.get('steps')}",
                        (x, y), fontsize=6)
        ax.set_xscale("log")       # 1-step distilled models to 1024 px SDXL: three orders of magnitude
        ax.set_xlabel("generator TFLOP an image (counted, log scale)")
        ax.set_ylabel(name, fontsize=8)
    if not priced:
        axes[0].set_title("missing: no finished run reports tflop_per_image yet", fontsize=8)
    fig.suptitle("Accuracy against the price of an image (one point a run; star: the paper's SD v1.4 at 50 steps; "
                 "`python -m imagenet_sd.experiments queue samplers generators`)", fontsize=8)
    return save(fig, path)
