"""The profile's `evaluate` and `transfer` blocks (eval-imagenet, eval-transfer, ImageNet-CoG)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imagenet_sd.core.errors import UserError, param_error
from imagenet_sd.core.params.reader import DEVICES, Section, as_number, expanded, keys_of, work_dir_at

PROBES = ("auto", "sklearn", "torch")              # transfer's linear probe; auto: see probes.resolve_kind
# ImageNet-1K models of Table 1 rows 13-14, scored beside the trained one; loaders in checkpoints.py.
REFERENCE_MODELS = ("torchvision-resnet50", "timm-resnet50-a1")


@dataclass(frozen=True)
class EvaluateParams:
    resize: int
    crop: int
    batch_size: int
    device: str
    reference_models: dict[str, Path | None]   # every name of REFERENCE_MODELS; None: not configured
    work_dir: Path          # reference models' scores, reused across experiments


@dataclass(frozen=True)
class CogParams:
    """ImageNet-CoG's files (module cog); configured only as a whole."""
    images: Path            # the full ImageNet: <images>/<wnid>/*.JPEG
    levels_file: Path       # cog_levels_mapping_file.pkl
    splits_file: Path       # cog_concepts_split_file.pkl


@dataclass(frozen=True)
class TransferParams:
    datasets: dict[str, Path | None]   # name -> root; None: not configured (''), skipped and reported
    batch_size: int
    device: str
    probe: str              # one of PROBES
    c_range: tuple[float, float]   # the probe's C grid: `c_points` log-spaced values over [low, high]
    c_points: int
    baselines: bool         # also probe a random-weights encoder and the configured reference models
    cog: CogParams | None   # None: all three paths '' (ImageNet-CoG skipped and reported)
    in1k: bool              # also probe ImageNet-1K (data.train -> data.val), as CoG does
    work_dir: Path          # cached encoder features, shared by experiments


def parse_evaluate(s: Section) -> EvaluateParams:
    s.no_unknown_keys(keys_of(EvaluateParams))
    crop = s.number("crop", int, low=16)
    resize = s.number("resize", int, low=16)
    if resize < crop:
        raise param_error(s.path("resize"), resize, f"an integer >= crop ({crop})")
    return EvaluateParams(resize=resize, crop=crop, batch_size=s.number("batch_size", int, low=1),
                          device=s.choice("device", DEVICES),
                          reference_models=_reference_models(
                              Section(s.get("reference_models") or {}, s.path("reference_models"))),
                          work_dir=work_dir_at(s))


def _reference_models(s: Section) -> dict[str, Path | None]:
    """Weight file of each reference model; a name left out or set to '' is not configured."""
    s.no_unknown_keys(REFERENCE_MODELS)
    return {name: s.optional_path(name) if name in s.raw else None for name in REFERENCE_MODELS}


def parse_transfer(s: Section) -> TransferParams:
    s.no_unknown_keys(keys_of(TransferParams))
    datasets = s.get("datasets") or {}
    if not isinstance(datasets, dict) or not all(isinstance(v, str) for v in datasets.values()):
        raise param_error(s.path("datasets"), datasets, "a mapping of dataset name to folder")
    return TransferParams(
        datasets={str(name): expanded(root) if root.strip() else None for name, root in datasets.items()},
        batch_size=s.number("batch_size", int, low=1),
        device=s.choice("device", DEVICES),
        probe=s.choice("probe", PROBES),
        c_range=_c_range(s),
        c_points=s.number("c_points", int, low=1, high=1000),
        baselines=s.flag("baselines"),
        cog=_cog(s.section("cog")),
        in1k=s.flag("in1k"),
        work_dir=work_dir_at(s),
    )


def _c_range(s: Section) -> tuple[float, float]:
    value = s.get("c_range")
    if isinstance(value, list):
        value = [as_number(v) for v in value]
    if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value)
            or not 0 < value[0] <= value[1]):
        raise param_error(s.path("c_range"), value, "[low, high] with 0 < low <= high, e.g. [1.0e-6, 1.0e5]")
    return float(value[0]), float(value[1])


def _cog(s: Section) -> CogParams | None:
    s.no_unknown_keys(keys_of(CogParams))
    paths = {name: s.optional_path(name) for name in keys_of(CogParams)}
    unset = [name for name, path in paths.items() if path is None]
    if len(unset) == len(paths):
        return None
    if unset:
        raise UserError(f"params.yaml: {s.path(unset[0])} is '' but ImageNet-CoG needs all of "
                        f"{', '.join(paths)}; set it, or set all three to '' to skip CoG (docs/evaluation.md#imagenet-cog)")
    return CogParams(**paths)
