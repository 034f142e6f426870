"""params.yaml, validated once into typed objects.

Every stage calls `load()` first. A wrong value stops the stage before it touches
any output, with one line naming the key, the value and what is allowed.
Paths are checked for existence only by the stage that reads them
(`require_file` / `require_dir`), so that e.g. the prompt stage does not demand
ImageNet on disk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from imagenet_sd.core.errors import UserError, missing_path, param_error

CLASS_SETS = ("imagenet100", "imagenet1k", "digits", "custom")
PROMPT_VARIANTS = ("c", "c_hc", "c_dc", "c_hc_b", "c_hc_bm", "le")   # le: language enhancement (module language)
NUM_SCENES = 365            # Places365 (backgrounds.NUM_SCENES): the range of background_top_k
SOURCES = ("synthetic", "real")
CLIP_CLASS_NAMES = ("openai", "wordnet")           # CLIP's texts, clip-filter and clip-tune (module prompts.clip_texts)
CLIP_TEMPLATES = ("he2023", "openai80", "single")
FILTER_RULES = ("top1", "threshold")
FILTER_KEEPS = ("per_class", "passing")            # filter.keep: He et al.'s exact count a class | passing images only
CHANCE = "chance"                                  # filter.threshold: 1 / number of classes (He et al.'s)
DEVICES = ("auto", "cpu", "cuda")
PROBES = ("auto", "sklearn", "torch")              # transfer's linear probe; auto: see probes.resolve_kind
DTYPES = ("auto", "fp32", "fp16", "bf16")
SCHEDULERS = ("model", "ddim", "dpm-solver++", "unipc", "euler", "lcm")
# sd-generate's attention: SDPA as PyTorch dispatches it (flash/memory-efficient/math), SDPA held
# to its math kernel, diffusers' classic processor (baddbmm + softmax); see sd_model.set_attention.
ATTENTION_BACKENDS = ("sdpa", "math", "classic")
GLOBAL_CROP_STYLES = ("trex", "dino")           # augmentation.MultiCrop
PRECISIONS = ("auto", "bf16", "fp16", "none")      # training autocast; auto: bf16 or fp16 on GPU, none on CPU
SAFETY_POLICIES = ("none", "keep", "regenerate")   # not "off": YAML reads that as false
# ImageNet-1K models of Table 1 rows 13-14, scored beside the trained one; loaders in checkpoints.py.
REFERENCE_MODELS = ("torchvision-resnet50", "timm-resnet50-a1")


@dataclass(frozen=True)
class GenerateParams:
    model: str
    resolution: int
    dtype: str
    batch_size: int
    processes: int
    images_per_shard: int
    jpeg_quality: int
    stored_size: int | None       # None: store images at `resolution`
    work_dir: Path
    device: str
    # Speed only: the same pictures up to float rounding (like batch_size), so they stay out
    # of the work folder's key. All three can still change the JPEG bytes: other kernels round
    # the last float bit differently, which can move a pixel a grey level (docs/parameters.md#speed-settings).
    attention: str = "sdpa"       # one of ATTENTION_BACKENDS
    channels_last: bool = False   # NHWC layout of the UNet's and VAE's weights
    compile: bool = False         # torch.compile of the UNet (sd_model.compile_mode picks the mode)
    # prompt le: local folder or Hugging Face id of the T5 that writes each image's sentence (module language)
    language_model: str = ""
    # The family's own arguments and the model's add-ons (models/families.py; docs/generating.md#generators).
    # They decide the pictures, so they are in the work folder's key (only when set: 0 and '' leave it as it was).
    max_sequence_length: int = 0  # T5 tokens the prompt may take (SD3, PixArt-Sigma, FLUX); 0: the pipeline's default
    lora: str = ""                # a LoRA (.safetensors file, folder or Hub id) fused into the weights; '': none
    lora_scale: float = 1.0
    deepcache_interval: int = 0   # UNets: the deep blocks run every N steps, their features reused between (DeepCache); 0: off
    token_merging: float = 0.0    # UNets: ratio of tokens merged before each attention block (ToMe for SD); 0: off


@dataclass(frozen=True)
class DataParams:
    """Roots of the real image folders; None where not configured ('', or a test set left out)."""
    train: Path | None
    # Test set name -> root, each key of `data` but train and val_labels. evaluate/evaluation.py checks
    # the names against datasets/imagenet_sets.py, which this module does not import: a new test set then
    # changes the deps of the stages that score test sets only (dvc.yaml), not of every stage.
    test_sets: dict[str, Path | None]
    val_labels: Path | None = None   # labels of a flat val folder; None: look beside it

    @property
    def val(self) -> Path | None:
        """ImageNet val: also the real test split of cog's and the digits profile's probes."""
        return self.test_sets.get("val")


@dataclass(frozen=True)
class TrainParams:
    epochs: int
    max_steps: int          # > 0: a fixed budget of optimiser steps instead of `epochs` (docs/training.md#what-is-held-fixed-at-10x-50x)
    batch_size: int
    lr: float
    min_lr: float           # where the cosine ends
    nesterov: bool
    weight_decay: float
    warmup_epochs: int
    label_smoothing: float
    sync_batchnorm: bool    # BatchNorm statistics over all processes' crops (DDP only)
    global_crops: int
    global_crop_style: str  # one of GLOBAL_CROP_STYLES
    global_crop_size: int
    global_crop_scale: tuple[float, float]
    local_crops: int
    local_crop_size: int
    local_crop_scale: tuple[float, float]
    holdout_per_class: int  # images per class generated beyond real x scale, kept out of training, scored every epoch
    augment_device: str     # where multi-crop runs: cpu (loader workers) | cuda (the training GPU) | auto
    amp: str                # one of PRECISIONS
    channels_last: bool
    compile: bool
    workers: int
    processes: int          # DDP processes (GPUs) on this machine; batch_size is split over them
    checkpoint_every_steps: int   # 0: save the training state at the end of each epoch only
    work_dir: Path          # training state for resume, outside the DVC output
    device: str
    # Each residual block's last BatchNorm starts at 0 (Goyal et al.'s trick); t-ReX and torchvision: false.
    zero_init_residual: bool = False
    # A name in models/heads' registry, checked there when train-resnet50 starts (this module cannot import it).
    head: str = "linear"
    trex_memory: int = 8192  # head trex: memory entries the class prototypes are summed from (t-ReX: 8192)


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


@dataclass(frozen=True)
class FilterParams:
    """The clip-filter stage's CLIP and rule (module clip_filter); used when `filter: clip`."""
    model: str              # local folder or Hugging Face id of a transformers CLIPModel
    rule: str               # one of FILTER_RULES: own class is CLIP's top-1 | its probability > threshold
    threshold: float | None  # None: chance, 1 / number of classes
    keep: str               # one of FILTER_KEEPS: exactly real x scale a class (He et al.'s) | every passing one, at most that
    overgenerate: float     # sd-generate makes ceil(real x scale x this) more a class for the filter to choose among
    batch_size: int
    workers: int            # loader processes decoding and preprocessing the images
    device: str
    work_dir: Path          # CLIP scores per shard, reused by any rule or threshold


@dataclass(frozen=True)
class SlurmParams:
    """The profile's `slurm` block: the job sd-generate and train-resnet50 submit with `launcher: slurm`
    (core/slurm.py; docs/cluster.md). One task a GPU, `gpus_per_node` of them on each of `nodes`."""
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    mem: str                # per node, Slurm's syntax (480G); '' = the partition's default
    time_min: int           # the job's time limit; a job that reaches it is requeued and resumes
    partition: str
    account: str
    qos: str
    constraint: str
    extra: dict             # more sbatch options, {name: value} (e.g. {exclusive: true})
    log_dir: Path           # submitit's folder: each job's pickles, stdout and stderr
    wait: bool              # false: submit and return (the stage exits 1 saying so; run it again later)

    @property
    def tasks(self) -> int:
        return self.nodes * self.gpus_per_node


LAUNCHERS = ("local", "slurm")


@dataclass(frozen=True)
class ClipClassifierParams:
    """The clip-tune stage's CLIP and recipe (module clip_classifier); used when `clip_tune: true`."""
    model: str              # local folder or Hugging Face id of a transformers CLIPModel
    epochs: int
    lr: float               # AdamW's peak lr with shots: 0 (cosine to 0 over every step)
    few_shot_lr: float      # the same with shots > 0
    weight_decay: float
    batch_size: int         # synthetic image features a step
    real_batch_size: int    # shots > 0: real image features a step, beside them
    soft_label: float       # weight of the zero-shot head's softened predictions in the synthetic images' loss
    soft_label_temperature: float
    encode_batch_size: int  # images a CLIP forward pass
    workers: int            # loader processes decoding and preprocessing the synthetic images
    device: str
    work_dir: Path          # CLIP image features per shard and per real image set, shared by experiments


@dataclass(frozen=True)
class Params:
    profile: str
    classes: str
    custom_classes: Path
    prompt: str
    background_top_k: int   # c_hc_bm: b is drawn among the class's k best-matching scenes (module matching)
    guidance: float
    steps: int
    scheduler: str
    negative_prompt: str    # '' for none; families.settings_for checks the model takes one
    safety_checker: str
    scale: float
    seed: int
    source: str
    # Which synthetic images train-resnet50 reads: a filter's name, checked by filter/registry.py's
    # `chosen` (this layer cannot import the filters).
    filter: str
    generate: GenerateParams
    data: DataParams
    train: TrainParams
    evaluate: EvaluateParams
    transfer: TransferParams
    filtering: FilterParams   # the profile's `filter` block
    clip_tune: bool         # the clip-tune stage runs (He et al.'s classifier tuning); false: it writes "skipped"
    clip_classifier: ClipClassifierParams   # the profile's `clip_classifier` block
    # Few-shot setting and real-image guidance (He et al., ICLR 2023; module fewshot, docs/he2023.md#real-image-guidance-and-k-shot-subsets).
    shots: int = 0            # K real images a class (the few-shot stage's K-shot subset); 0: zero-shot
    init_strength: float = 0.0   # > 0: each image starts from a real shot noised to this img2img strength
    # CLIP's texts in clip-filter and clip-tune (module prompts.clip_texts).
    clip_class_names: str = "openai"   # one of CLIP_CLASS_NAMES
    clip_templates: str = "he2023"     # one of CLIP_TEMPLATES
    # Language enhancement (prompt le, module language): distinct sentences a class, images cycling over them.
    le_sentences_per_class: int = 200  # 0: one sentence an image; He et al.: 200, 10 images each
    # Where the GPU stages run: this machine (torchrun for processes > 1) or Slurm jobs (core/slurm.py).
    launcher: str = "local"
    slurm: SlurmParams | None = None


# --------------------------------------------------------------------------- checks

class _Section:
    """A mapping of params.yaml read with its dotted key path, for error messages."""

    def __init__(self, raw: Any, key: str):
        if not isinstance(raw, dict):
            raise param_error(key, raw, "a mapping of keys to values")
        self.raw, self.key = raw, key

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str):
        if name not in self.raw:
            raise UserError(f"params.yaml: missing key {self.path(name)}; add it (see docs/parameters.md)")
        return self.raw[name]

    def section(self, name: str) -> "_Section":
        return _Section(self.get(name), self.path(name))

    def choice(self, name: str, allowed: tuple[str, ...]) -> str:
        value = self.get(name)
        if value not in allowed:
            raise param_error(self.path(name), value, " | ".join(allowed))
        return value

    def number(self, name: str, kind: type, *, low=None, high=None, low_open=False) -> Any:
        value = self.get(name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind is int:
            ok = float(value).is_integer()
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
            hi = "" if high is None else f"<= {high}"
            bounds = " and ".join(b for b in (lo, hi) if b)
            name_of_kind = "an integer" if kind is int else "a number"
            raise param_error(self.path(name), value, f"{name_of_kind}{' ' + bounds if bounds else ''}")
        return kind(value)

    def flag(self, name: str) -> bool:
        value = self.get(name)
        if not isinstance(value, bool):
            raise param_error(self.path(name), value, "true or false")
        return value

    def text(self, name: str) -> str:
        value = self.get(name)
        if not isinstance(value, str):
            raise param_error(self.path(name), value, "a string")
        return value

    def optional_path(self, name: str) -> Path | None:
        value = self.text(name)
        return _expanded(value) if value.strip() else None

    def fraction_range(self, name: str) -> tuple[float, float]:
        value = self.get(name)
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) for v in value)
                or not 0 < value[0] <= value[1] <= 1):
            raise param_error(self.path(name), value, "[low, high] with 0 < low <= high <= 1")
        return float(value[0]), float(value[1])

    def no_unknown_keys(self, known: tuple[str, ...]) -> None:
        unknown = sorted(set(self.raw) - set(known))
        if unknown:
            raise UserError(
                f"params.yaml: unknown key {self.path(unknown[0])}; known keys here: {', '.join(known)}")


def _keys(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _generate(s: _Section) -> GenerateParams:
    s.no_unknown_keys(_keys(GenerateParams))
    # Whole latent tokens: a multiple of the model's VAE scale factor x patch, checked against the
    # model's own configs when sd-generate plans (families.check_resolution).
    resolution = s.number("resolution", int, low=8)
    stored_size = s.number("stored_size", int, low=0)
    if stored_size > resolution:
        raise param_error(s.path("stored_size"), stored_size, f"0 (keep {resolution} px) or a size <= resolution")
    return GenerateParams(
        model=s.text("model"),
        resolution=resolution,
        dtype=s.choice("dtype", DTYPES),
        batch_size=s.number("batch_size", int, low=1),
        processes=s.number("processes", int, low=1),
        images_per_shard=s.number("images_per_shard", int, low=1),
        jpeg_quality=s.number("jpeg_quality", int, low=1, high=100),
        stored_size=stored_size or None,
        work_dir=_work_dir(s),
        device=s.choice("device", DEVICES),
        attention=s.choice("attention", ATTENTION_BACKENDS),
        channels_last=s.flag("channels_last"),
        compile=s.flag("compile"),
        language_model=_language_model(s),
        max_sequence_length=s.number("max_sequence_length", int, low=0),
        lora=s.text("lora").strip(),
        lora_scale=s.number("lora_scale", float),
        deepcache_interval=_deepcache_interval(s),
        token_merging=s.number("token_merging", float, low=0, high=0.9),
    )


def _deepcache_interval(s: _Section) -> int:
    value = s.number("deepcache_interval", int, low=0)
    if value == 1:
        raise param_error(s.path("deepcache_interval"), value, "0 (off) or N >= 2 (the full UNet every N steps)")
    return value


def _language_model(s: _Section) -> str:
    """The T5 of prompt le; whether it exists is checked by the stage that loads it (language.locate)."""
    value = s.text("language_model")
    if not value.strip():
        raise param_error(s.path("language_model"), value, "a local folder or Hugging Face id of a T5 model, "
                          "e.g. models/tiny-t5 (embedded) or mrm8488/t5-base-finetuned-common_gen (He et al.)")
    return value


def _processes(s: _Section) -> int:
    processes, batch = s.number("processes", int, low=1), s.number("batch_size", int, low=1)
    if batch % processes:
        raise param_error(s.path("processes"), processes, f"a divisor of batch_size ({batch}), "
                          "which is the batch of all processes together")
    return processes


def _work_dir(s: _Section) -> Path:
    value = s.text("work_dir")
    if not value.strip():
        raise param_error(s.path("work_dir"), value, "a folder kept between runs, e.g. ~/.cache/imagenet-sd/...")
    return _expanded(value)


def _expanded(value: str | Path) -> Path:
    # ~ and $VARS expand, so one params.yaml can name per-user or per-cluster folders
    # (scratch space, torch hub's and Hugging Face's caches under the home folder).
    return Path(os.path.expandvars(str(value))).expanduser()


def _slurm(s: _Section) -> SlurmParams:
    s.no_unknown_keys(_keys(SlurmParams))
    extra = s.get("extra")
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise param_error(s.path("extra"), extra, "a mapping of sbatch option names to values, e.g. {exclusive: true}")
    log_dir = s.text("log_dir")
    if not log_dir.strip():
        raise param_error(s.path("log_dir"), log_dir, "a folder on a file system the compute nodes share")
    return SlurmParams(
        nodes=s.number("nodes", int, low=1), gpus_per_node=s.number("gpus_per_node", int, low=1),
        cpus_per_task=s.number("cpus_per_task", int, low=1), mem=s.text("mem").strip(),
        time_min=s.number("time_min", int, low=1), partition=s.text("partition").strip(),
        account=s.text("account").strip(), qos=s.text("qos").strip(), constraint=s.text("constraint").strip(),
        extra=dict(extra), log_dir=_expanded(log_dir), wait=s.flag("wait"))


def _custom_classes(top: _Section) -> Path:
    """The class file, as written: dvc.yaml names it as a dependency (`${custom_classes}`) and DVC does not
    expand `~` or `$VARS`, so an unexpanded path would have the stage read one file and DVC watch another."""
    value = top.text("custom_classes")
    expanded = _expanded(value)
    if str(expanded) != value:
        raise param_error("custom_classes", value, f"a path without ~ or $VARS (DVC watches this file as written "
                          f"and does not expand them): write {str(expanded)!r}")
    return expanded


def _data(s: _Section) -> DataParams:
    """train and val_labels, and every other key a test set's root (evaluation checks their names)."""
    own = ("train", "val_labels")
    return DataParams(train=s.optional_path("train"), val_labels=s.optional_path("val_labels"),
                      test_sets={str(name): s.optional_path(name) for name in s.raw if name not in own})


def _train(s: _Section) -> TrainParams:
    s.no_unknown_keys(_keys(TrainParams))
    tp = TrainParams(
        epochs=s.number("epochs", int, low=1),
        max_steps=s.number("max_steps", int, low=0),
        batch_size=s.number("batch_size", int, low=1),
        lr=s.number("lr", float, low=0, low_open=True, high=1e6),
        min_lr=s.number("min_lr", float, low=0),
        nesterov=s.flag("nesterov"),
        weight_decay=s.number("weight_decay", float, low=0),
        warmup_epochs=s.number("warmup_epochs", int, low=0),
        label_smoothing=s.number("label_smoothing", float, low=0, high=0.99),
        sync_batchnorm=s.flag("sync_batchnorm"),
        global_crops=s.number("global_crops", int, low=1),
        global_crop_style=s.choice("global_crop_style", GLOBAL_CROP_STYLES),
        global_crop_size=s.number("global_crop_size", int, low=16),
        global_crop_scale=s.fraction_range("global_crop_scale"),
        local_crops=s.number("local_crops", int, low=0),
        local_crop_size=s.number("local_crop_size", int, low=16),
        local_crop_scale=s.fraction_range("local_crop_scale"),
        holdout_per_class=s.number("holdout_per_class", int, low=0),
        augment_device=s.choice("augment_device", DEVICES),
        amp=s.choice("amp", PRECISIONS),
        channels_last=s.flag("channels_last"),
        compile=s.flag("compile"),
        workers=s.number("workers", int, low=0),
        processes=_processes(s),
        checkpoint_every_steps=s.number("checkpoint_every_steps", int, low=0),
        work_dir=_work_dir(s),
        device=s.choice("device", DEVICES),
        zero_init_residual=s.flag("zero_init_residual"),
        head=s.text("head"),
        trex_memory=s.number("trex_memory", int, low=1),
    )
    peak = tp.lr * tp.batch_size / 256
    if tp.min_lr >= peak:
        raise param_error(s.path("min_lr"), tp.min_lr, f"a number below the peak lr, lr x batch_size / 256 = {peak:g}")
    if tp.warmup_epochs >= tp.epochs and tp.warmup_epochs:
        raise param_error(s.path("warmup_epochs"), tp.warmup_epochs, f"an integer below epochs ({tp.epochs})")
    return tp


def _evaluate(s: _Section) -> EvaluateParams:
    s.no_unknown_keys(_keys(EvaluateParams))
    crop = s.number("crop", int, low=16)
    resize = s.number("resize", int, low=16)
    if resize < crop:
        raise param_error(s.path("resize"), resize, f"an integer >= crop ({crop})")
    return EvaluateParams(resize=resize, crop=crop, batch_size=s.number("batch_size", int, low=1),
                          device=s.choice("device", DEVICES),
                          reference_models=_reference_models(
                              _Section(s.get("reference_models") or {}, s.path("reference_models"))),
                          work_dir=_work_dir(s))


def _reference_models(s: _Section) -> dict[str, Path | None]:
    """Weight file of each reference model; a name left out or set to '' is not configured."""
    s.no_unknown_keys(REFERENCE_MODELS)
    return {name: s.optional_path(name) if name in s.raw else None for name in REFERENCE_MODELS}


def _transfer(s: _Section) -> TransferParams:
    s.no_unknown_keys(_keys(TransferParams))
    datasets = s.get("datasets") or {}
    if not isinstance(datasets, dict) or not all(isinstance(v, str) for v in datasets.values()):
        raise param_error(s.path("datasets"), datasets, "a mapping of dataset name to folder")
    return TransferParams(
        datasets={str(name): _expanded(root) if root.strip() else None for name, root in datasets.items()},
        batch_size=s.number("batch_size", int, low=1),
        device=s.choice("device", DEVICES),
        probe=s.choice("probe", PROBES),
        c_range=_c_range(s),
        c_points=s.number("c_points", int, low=1, high=1000),
        baselines=s.flag("baselines"),
        cog=_cog(s.section("cog")),
        in1k=s.flag("in1k"),
        work_dir=_work_dir(s),
    )


def _as_number(v):
    """A number, or a string that is one: PyYAML reads 1.0e5 (no sign in the exponent) as a string."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _c_range(s: _Section) -> tuple[float, float]:
    value = s.get("c_range")
    if isinstance(value, list):
        value = [_as_number(v) for v in value]
    if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value)
            or not 0 < value[0] <= value[1]):
        raise param_error(s.path("c_range"), value, "[low, high] with 0 < low <= high, e.g. [1.0e-6, 1.0e5]")
    return float(value[0]), float(value[1])


def _cog(s: _Section) -> CogParams | None:
    s.no_unknown_keys(_keys(CogParams))
    paths = {name: s.optional_path(name) for name in _keys(CogParams)}
    unset = [name for name, path in paths.items() if path is None]
    if len(unset) == len(paths):
        return None
    if unset:
        raise UserError(f"params.yaml: {s.path(unset[0])} is '' but ImageNet-CoG needs all of "
                        f"{', '.join(paths)}; set it, or set all three to '' to skip CoG (docs/evaluation.md#imagenet-cog)")
    return CogParams(**paths)


def _filtering(s: _Section) -> FilterParams:
    s.no_unknown_keys(_keys(FilterParams))
    return FilterParams(
        model=s.text("model"),
        rule=s.choice("rule", FILTER_RULES),
        threshold=_threshold(s),
        keep=s.choice("keep", FILTER_KEEPS),
        overgenerate=s.number("overgenerate", float, low=0, high=10),
        batch_size=s.number("batch_size", int, low=1),
        workers=s.number("workers", int, low=0),
        device=s.choice("device", DEVICES),
        work_dir=_work_dir(s),
    )


def _clip_classifier(s: _Section) -> ClipClassifierParams:
    s.no_unknown_keys(_keys(ClipClassifierParams))
    return ClipClassifierParams(
        model=s.text("model"),
        epochs=s.number("epochs", int, low=1),
        lr=s.number("lr", float, low=0, low_open=True, high=1),
        few_shot_lr=s.number("few_shot_lr", float, low=0, low_open=True, high=1),
        weight_decay=s.number("weight_decay", float, low=0),
        batch_size=s.number("batch_size", int, low=1),
        real_batch_size=s.number("real_batch_size", int, low=1),
        soft_label=s.number("soft_label", float, low=0, high=1),
        soft_label_temperature=s.number("soft_label_temperature", float, low=0, low_open=True),
        encode_batch_size=s.number("encode_batch_size", int, low=1),
        workers=s.number("workers", int, low=0),
        device=s.choice("device", DEVICES),
        work_dir=_work_dir(s),
    )


def _name(s: _Section, key: str) -> str:
    """A name a registry of a higher layer checks (the filters: filter/registry.py)."""
    value = s.text(key).strip()
    if not value:
        raise param_error(s.path(key), value, "a name, e.g. none")
    return value


def _threshold(s: _Section) -> float | None:
    """The probability of its own class an image needs (rule threshold); `chance`: 1 / classes."""
    value = s.get("threshold")
    if value == CHANCE:
        return None
    value = _as_number(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
        raise param_error(s.path("threshold"), value, f"{CHANCE} (1 / number of classes) or a number > 0 and < 1")
    return float(value)


_TOP_KEYS = ("profile", "classes", "custom_classes", "prompt", "background_top_k", "guidance", "steps",
             "scheduler", "safety_checker", "scale", "seed", "source", "filter", "profiles")
_TOP_KEYS += ("shots", "init_strength")        # the few-shot setting and real guidance (_few_shot)
_TOP_KEYS += ("clip_tune",)                    # the clip-tune stage on or off (_clip_classifier: its recipe)
_TOP_KEYS += ("clip_class_names", "clip_templates")   # CLIP's texts in clip-filter and clip-tune
_TOP_KEYS += ("le_sentences_per_class",)      # prompt le: sentences a class (module language)
_TOP_KEYS += ("negative_prompt",)             # the generator's negative prompt (families.CallSettings)


def _few_shot(top: _Section, steps: int) -> dict:
    """shots (K real images a class) and init_strength (img2img strength from them; 0: text-to-image)."""
    shots = top.number("shots", int, low=0)
    strength = top.number("init_strength", float, low=0, high=1)
    if strength and not shots:
        raise param_error("init_strength", strength, "0 while shots = 0; real guidance starts each image from a "
                          "real image of its class: set shots to K > 0 (He et al.: 1, 2, 4, 8, 16), or init_strength: 0")
    # diffusers' img2img runs int(steps x strength) denoising steps and fails on none.
    if strength and int(steps * strength) < 1:
        raise param_error("init_strength", strength, f"0 (text-to-image) or a number > 0 and <= 1 with "
                          f"steps x init_strength >= 1 (steps = {steps}: at least {1 / steps:.4g})")
    return {"shots": shots, "init_strength": strength}


def parse(raw: Any) -> Params:
    """Validate the content of params.yaml (already parsed YAML) into `Params`."""
    top = _Section(raw, "")
    top.no_unknown_keys(_TOP_KEYS)
    profiles = top.section("profiles")
    profile = top.choice("profile", tuple(profiles.raw))
    chosen = profiles.section(profile)
    chosen.no_unknown_keys(("generate", "data", "train", "evaluate", "transfer", "filter", "clip_classifier",
                            "launcher", "slurm"))
    return Params(
        profile=profile,
        classes=top.choice("classes", CLASS_SETS),
        custom_classes=_custom_classes(top),
        prompt=top.choice("prompt", PROMPT_VARIANTS),
        background_top_k=top.number("background_top_k", int, low=1, high=NUM_SCENES),
        guidance=top.number("guidance", float, low=0),
        steps=top.number("steps", int, low=1),
        scheduler=top.choice("scheduler", SCHEDULERS),
        negative_prompt=top.text("negative_prompt").strip(),
        safety_checker=top.choice("safety_checker", SAFETY_POLICIES),
        scale=top.number("scale", float, low=0.1, high=50),
        seed=top.number("seed", int, low=0),
        source=top.choice("source", SOURCES),
        filter=_name(top, "filter"),
        generate=_generate(chosen.section("generate")),
        data=_data(chosen.section("data")),
        train=_train(chosen.section("train")),
        evaluate=_evaluate(chosen.section("evaluate")),
        transfer=_transfer(chosen.section("transfer")),
        filtering=_filtering(chosen.section("filter")),
        clip_tune=top.flag("clip_tune"),
        clip_classifier=_clip_classifier(chosen.section("clip_classifier")),
        launcher=chosen.choice("launcher", LAUNCHERS),
        slurm=_slurm(chosen.section("slurm")),
        **_few_shot(top, top.number("steps", int, low=1)),
        clip_class_names=top.choice("clip_class_names", CLIP_CLASS_NAMES),
        clip_templates=top.choice("clip_templates", CLIP_TEMPLATES),
        le_sentences_per_class=top.number("le_sentences_per_class", int, low=0),
    )


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; run stages from the repository root, where params.yaml is")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}; fix the syntax") from None
    return parse(raw)


def require_file(key: str, path: Path) -> Path:
    if not path.is_file():
        raise missing_path(key, path, "file")
    return path


def writable_dir(key: str, work_dir: Path, folder: Path | None = None) -> Path:
    """`folder` (default `work_dir`) created and written to once; UserError naming `key` if it cannot be."""
    folder = folder or work_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"params.yaml: {key} = {str(work_dir)!r}: cannot write there "
                        f"({exc.strerror or exc}); point it at a writable folder") from None
    return folder


def require_dir(key: str, path: Path) -> Path:
    if not path.is_dir():
        raise missing_path(key, path, "folder")
    return path
