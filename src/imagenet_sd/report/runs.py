"""The runs a report reads (one profile's DVC experiments, module experiments.queue), what a table
cell reads of them, and the Markdown table they become. Shared by the report's tables, figures,
per-class and digits pages; it imports none of them.
"""
from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from imagenet_sd.experiments.catalog import PROFILE_DEFAULTS, TOP_DEFAULTS, Setting
from imagenet_sd.experiments.queue import Run

MISSING = "missing"


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
            if (v := metric_at(run.metrics.get("metrics/imagenet.json"), ("reference", model, *keys))) is not None:
                return v
        return None

    def reference_transfer_average(self, model: str) -> float | None:
        """A baseline's average transfer top-1 (metrics/transfer.json baselines.<model>), newest run."""
        for run in reversed(self.all):
            if (v := metric_at(run.metrics.get("metrics/transfer.json"), ("baselines", model, "average_top1"))) is not None:
                return v
        return None

    def baseline_transfer(self, model: str, dataset: str) -> float | None:
        """eval-transfer's baseline (random-init or a reference model) on one dataset: in the details file."""
        for run in reversed(self.all):
            if (v := metric_at(self.details(run, "reports/transfer.json"), ("baselines", model, dataset, "top1"))) is not None:
                return v
        return None


def arch_of(params: dict) -> str:
    """The network a run trained: train.arch of its train recipe over its profile's train block."""
    recipe = params.get("train_recipe", TOP_DEFAULTS["train_recipe"])
    own = ((params.get("train_recipes") or {}).get(recipe) or {}).get("arch")
    profile = ((params.get("profiles") or {}).get(params.get("profile")) or {}).get("train") or {}
    return own or profile.get("arch") or PROFILE_DEFAULTS["train.arch"]


def network(runs: list[Run], setting: Setting | None) -> str:
    """The table's `network` cell: what the setting's runs trained; before any run, what it asks for."""
    found = sorted({arch_of(r.params) for r in runs})
    if found:
        return ", ".join(found)
    recipe = setting.params.get("train_recipe", TOP_DEFAULTS["train_recipe"]) if setting else None
    return PROFILE_DEFAULTS["train.arch"] if recipe in (None, TOP_DEFAULTS["train_recipe"]) else f"recipe {recipe}"


def mean_of(runs: list[Run], metrics_file: str, *keys: str) -> float | None:
    """Mean over `runs` of metrics_file[keys...]; None if no run has it."""
    found = [v for r in runs if (v := metric_at(r.metrics.get(metrics_file), keys)) is not None]
    return mean(found) if found else None


def metric_at(data, keys):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data if isinstance(data, (int, float)) and not isinstance(data, bool) else None



def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
