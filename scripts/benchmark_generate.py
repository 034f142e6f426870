#!/usr/bin/env python
"""Benchmark (not a test): images/s of diffusers' StableDiffusionPipeline over a grid of settings.

Each row runs the real pipeline call of a generation run (prompt -> text encoder ->
guided UNet steps -> VAE decode -> PIL images, one CPU torch.Generator per image)
and reports images/s, its speedup over the baseline row, FLOPs per image (counted
by imagenet_sd.generate.estimates.count_flops), achieved TFLOP/s, utilisation of the device's
dense peak and peak GPU memory.

Each row also times the stage's own loop, what a user of sd-generate gets: the same
call, then every image JPEG-encoded (imagenet_sd.generate.worker.encode), and the row's
images written as a tar shard of --images-per-shard images (imagenet_sd.datasets.shards.
write_shard, fsync included, in a temporary folder). `loop img/s` is the batch over
the median call plus the median encoding of a call plus the call's share of the
shard write; `enc+wr` is the part of that loop spent encoding and writing, which a
background thread could overlap with the next call on a GPU.

Settings are applied with the stage's functions, so every row is a setting of params.yaml's
`profiles.<profile>.generate` and `scheduler`; the fastest row is printed in that form.
Baseline: the plain pipeline at batch 1, fp16 on CUDA (fp32 on CPU), SDPA, no channels_last or
compile, the model's scheduler; then one axis at a time from the best so far (a greedy walk,
about a dozen rows), or the whole product with --full-grid.

Models: `sd-v1-4-random` is the full SD v1.4 architecture with random weights, built
from the configs in data/sd-v1-4 (no weights are downloaded or needed: speed does
not depend on the weight values); any other value is a pipeline folder.

    python scripts/benchmark_generate.py                       # defaults for this machine
    python scripts/benchmark_generate.py --model sd-v1-4-random --device cuda --json out.json
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import logging
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from imagenet_sd.core.device import cpu_model
from imagenet_sd.core.params import ATTENTION_BACKENDS as ATTENTION
from imagenet_sd.core.params import SCHEDULERS
from imagenet_sd.datasets import shards
from imagenet_sd.generate import worker
from imagenet_sd.models import sd_model
from imagenet_sd.models.sd_model import scheduler_for

ROOT = Path(__file__).resolve().parents[1]
RANDOM_SD = "sd-v1-4-random"
SD_CONFIGS = ROOT / "data" / "sd-v1-4"
TINY_SD = ROOT / "models" / "tiny-sd"       # also the tokenizer of the random SD (SD's vocab is not vendored)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SWITCH = {"off": False, "on": True}

# Greedy walk order. Attention comes before batch size so that the math kernel, whose
# memory grows with the square of the token count, is tried at batch 1; compile comes
# after batch size so that it compiles once, for the batch that will be used.
AXES = ("dtype", "attention", "channels_last", "batch", "compile", "scheduler")
# Axes whose best value the walk carries on with. The scheduler is measured but not
# adopted: it changes which images come out, so it is a quality decision, not a speed one.
ADOPTED = ("dtype", "attention", "channels_last", "batch", "compile")
# A value is adopted only if it beats the current best by this factor, so that timing
# noise does not steer the walk.
ADOPT_MARGIN = 1.03

# Dense (no sparsity) peak FLOP/s by device-name substrings; the first match wins, so
# PCIe comes before the plain H100 (the SXM part). fp32 is the non-tensor-core peak;
# cuDNN runs fp32 convolutions in TF32 by default, so fp32 rows can exceed 100%.
PEAKS = (
    (("H100", "PCIe"), {"fp16": 756e12, "bf16": 756e12, "fp32": 51e12}),   # fp32: datasheet
    (("H200",), {"fp16": 989e12, "bf16": 989e12, "fp32": 67e12}),
    (("H100",), {"fp16": 989e12, "bf16": 989e12, "fp32": 67e12}),
    (("A100",), {"fp16": 312e12, "bf16": 312e12, "fp32": 19.5e12}),
)
# Dense bf16 matmul rate measured on an H100 (../shared/reference/README.md); the issue's
# compute-bound target is 40% of it.
H100_MEASURED = 790e12
TARGET_FRACTION = 0.40
TARGET_SPEEDUP = 2.0


class UsageError(Exception):
    """A bad command line: reported as one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):            # argparse prints usage as well; we want one line
        raise UsageError(message)


@dataclasses.dataclass(frozen=True)
class Setting:
    batch: int
    dtype: str
    attention: str
    channels_last: bool
    compile: bool
    scheduler: str

    def label(self) -> str:
        return (f"{self.dtype} bs{self.batch} {self.attention}"
                f"{' channels_last' if self.channels_last else ''}{' compile' if self.compile else ''}"
                f" {self.scheduler}")


# --------------------------------------------------------------------------- command line

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"'{RANDOM_SD}' or a pipeline folder (default: {RANDOM_SD} with CUDA, "
                                   f"else models/tiny-sd)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-sizes", help="comma list (default: 1,4,8,16 on CUDA, 1,4,16 on CPU)")
    p.add_argument("--dtypes", help="comma list of fp32, fp16, bf16 (default: fp16,bf16,fp32 on CUDA, fp32,bf16 on CPU)")
    p.add_argument("--attention", default="sdpa,math,classic", help="comma list of " + ", ".join(ATTENTION))
    p.add_argument("--channels-last", default="off,on", help="comma list of off, on")
    p.add_argument("--compile", default="off,on", help="comma list of off, on (torch.compile of the UNet)")
    p.add_argument("--compile-mode", help="torch.compile mode (default: sd-generate's, sd_model.compile_mode: "
                                          "reduce-overhead on CUDA, default on CPU)")
    p.add_argument("--schedulers", default="model,ddim,dpm-solver++", help="comma list of " + ", ".join(SCHEDULERS))
    p.add_argument("--full-grid", action="store_true", help="run the whole cartesian product of the axes")
    p.add_argument("--steps", type=int, help="inference steps (default: 50 on CUDA, 20 on CPU)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's native size)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing each row")
    p.add_argument("--repeats", type=int, help="timed calls a row (default: 3 on CUDA, 10 on CPU, whose short calls are noisier)")
    p.add_argument("--prompt", default="a photo of a tench, a type of fish")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the stage loop (the paper profile's 95)")
    p.add_argument("--images-per-shard", type=int, default=1000,
                   help="images of the shard the stage loop writes (the paper profile's 1000)")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible")
    cuda = args.device == "cuda"
    args.model = args.model or (RANDOM_SD if cuda else str(TINY_SD.relative_to(ROOT)))
    args.batch_sizes = _ints("--batch-sizes", args.batch_sizes or ("1,4,8,16" if cuda else "1,4,16"))
    args.dtypes = _choices("--dtypes", args.dtypes or ("fp16,bf16,fp32" if cuda else "fp32,bf16"), DTYPES)
    if "fp16" in args.dtypes and not cuda:
        raise UsageError("--dtypes fp16 needs CUDA: CPUs have no fast fp16 kernels (use fp32 or bf16)")
    args.attention = _choices("--attention", args.attention, ATTENTION)
    args.channels_last = [SWITCH[v] for v in _choices("--channels-last", args.channels_last, SWITCH)]
    args.compile = [SWITCH[v] for v in _choices("--compile", args.compile, SWITCH)]
    args.compile_mode = args.compile_mode or sd_model.compile_mode(torch.device(args.device))
    args.schedulers = _choices("--schedulers", args.schedulers, SCHEDULERS)
    args.steps = args.steps if args.steps is not None else (50 if cuda else 20)
    args.repeats = args.repeats if args.repeats is not None else (3 if cuda else 10)
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.warmup < 0:
        raise UsageError("--warmup must be 0 or more")
    if not 1 <= args.jpeg_quality <= 100:
        raise UsageError(f"--jpeg-quality {args.jpeg_quality}: must be 1 to 100")
    if args.images_per_shard < 1:
        raise UsageError("--images-per-shard must be at least 1")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution {args.resolution}: must be a positive multiple of 8 (the VAE downsamples by 8)")
    if args.model == RANDOM_SD:
        for need in (SD_CONFIGS / "unet" / "config.json", TINY_SD / "tokenizer"):
            if not need.exists():
                raise UsageError(f"--model {RANDOM_SD} needs {need}, which is missing (run scripts/setup.sh)")
    elif not (Path(args.model) / "model_index.json").is_file():
        what = "is not a pipeline folder (no model_index.json)" if Path(args.model).is_dir() else "no such folder"
        raise UsageError(f"--model {args.model}: {what}; give a StableDiffusionPipeline folder or {RANDOM_SD}")
    if args.json is not None and not args.json.resolve().parent.is_dir():   # fail now, not after a long run
        raise UsageError(f"--json {args.json}: folder {args.json.resolve().parent} does not exist")
    return args


def _items(option: str, text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{option}: empty list")
    return list(dict.fromkeys(items))        # drop repeats, keep order


def _choices(option: str, text: str, allowed) -> list[str]:
    items = _items(option, text)
    for item in items:
        if item not in allowed:
            raise UsageError(f"{option}: unknown value {item!r} (choose from {', '.join(allowed)})")
    return items


def _ints(option: str, text: str) -> list[int]:
    items = _items(option, text)
    if not all(i.isdigit() and int(i) > 0 for i in items):
        raise UsageError(f"{option}: {text!r} is not a comma list of positive integers")
    return [int(i) for i in items]


# --------------------------------------------------------------------------- model

def quiet_libraries() -> None:
    """Hide load-time progress bars and notices, which would bury the table."""
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Random or fp16-cast weights can make NaN pixels; numpy warns when casting them to uint8.
    warnings.filterwarnings("ignore", "invalid value encountered in cast", RuntimeWarning)
    # Dynamo's note that it traces through diffusers' cached version checks; harmless here.
    warnings.filterwarnings("ignore", "Dynamo detected a call to a `functools.lru_cache`", UserWarning)
    # torch.compile on a CPU-only machine notes that it found no CUDA runtime; nothing is wrong.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def build_random_sd(device: torch.device):
    """SD v1.4's architecture with random weights, from the vendored configs."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    # Initialising 1.07G parameters is far faster on the GPU; the device context puts them there.
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD_CONFIGS, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD_CONFIGS, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD_CONFIGS, subfolder="text_encoder"))
    # The tiny model's byte-level tokenizer: its ids (< 514) index SD's 49408-row embedding,
    # and the pipeline pads every prompt to 77 tokens, so the text encoder does SD's work.
    tokenizer = CLIPTokenizer.from_pretrained(TINY_SD, subfolder="tokenizer")
    scheduler = PNDMScheduler.from_pretrained(SD_CONFIGS, subfolder="scheduler")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def load_pipeline(model: str, device: torch.device):
    if model == RANDOM_SD:
        pipe = build_random_sd(device)
    else:
        from diffusers import StableDiffusionPipeline
        options = {}
        if importlib.util.find_spec("accelerate") is None:
            options["low_cpu_mem_usage"] = False     # what diffusers falls back to anyway, minus its warning
        try:
            pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None,
                                                           requires_safety_checker=False, **options)
        except (OSError, ValueError) as exc:      # how diffusers reports missing or broken files
            raise UsageError(f"--model {model}: cannot load the pipeline ({' '.join(str(exc).split())[:160]})")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def config_dir(model: str) -> str:
    """Where count_flops reads the component configs."""
    return str(SD_CONFIGS) if model == RANDOM_SD else model


# --------------------------------------------------------------------------- measuring

class Bench:
    """One pipeline, reconfigured in place for each setting, and the rows measured so far."""

    def __init__(self, pipe, args):
        self.pipe, self.args = pipe, args
        self.device = pipe.device
        self.unet = pipe.unet                         # the eager UNet; compiled rows wrap it
        self.model_scheduler = pipe.scheduler
        self.resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.flops: dict[str, float] = {}
        self.rows: dict[Setting, dict] = {}
        self.baseline: dict | None = None
        self.on_row = lambda rows: None               # main saves the rows so far: a killed run keeps them

    def flops_per_image(self, scheduler: str) -> float:
        if scheduler not in self.flops:
            from imagenet_sd.generate.estimates import count_flops
            counted = count_flops(config_dir(self.args.model), self.resolution, self.args.steps, self.args.guidance,
                                  scheduler=scheduler_for(scheduler, self.model_scheduler.config))
            self.flops[scheduler] = counted.per_image
        return self.flops[scheduler]

    def configure(self, s: Setting) -> None:
        """Setting `s` applied as sd_model.load_pipeline applies generate's params."""
        pipe = self.pipe
        pipe.unet = self.unet
        # Casting in place: a round trip through fp16/bf16 rounds the weights, which changes
        # the pictures but not the work, and the pictures are thrown away.
        pipe.to(dtype=DTYPES[s.dtype])
        sd_model.set_attention(pipe, s.attention)
        sd_model.set_channels_last(pipe, s.channels_last)
        pipe.scheduler = scheduler_for(s.scheduler, self.model_scheduler.config)
        if s.compile:
            torch._dynamo.reset()                     # compile afresh, so every compile row pays its own compile
            pipe.unet = sd_model.compiled(self.unet, self.device, self.args.compile_mode)

    def generate(self, s: Setting) -> list:
        """The stage's pipeline call (sd_model.draw: one CPU generator per image); its PIL images."""
        a = self.args
        images, _ = sd_model.draw(self.pipe, [a.prompt] * s.batch, list(range(s.batch)), guidance=a.guidance,
                                  steps=a.steps, resolution=self.resolution)
        return images

    def timed(self, s: Setting) -> tuple[float, float, list[bytes]]:
        """Seconds of one pipeline call, seconds of JPEG-encoding its images as the stage does, the JPEGs."""
        self.sync()
        start = time.perf_counter()
        images = self.generate(s)
        self.sync()
        drawn = time.perf_counter()
        jpegs = [worker.encode(image, self.args.jpeg_quality, None) for image in images]
        return drawn - start, time.perf_counter() - drawn, jpegs

    def write_seconds(self, jpegs: list[bytes]) -> float:
        """Seconds of writing a shard of --images-per-shard images (`jpegs` over and over), as the stage does.

        A full-size shard, because its fsync is paid once a shard, not once a call.
        """
        a = self.args
        samples = [(f"{i:012d}", jpegs[i % len(jpegs)],        # a key as long as the stage's
                    {"prompt": a.prompt, "seed": i, "guidance": a.guidance, "steps": a.steps, "flagged": False})
                   for i in range(a.images_per_shard)]
        with tempfile.TemporaryDirectory(prefix="bench-generate-") as folder:
            start = time.perf_counter()
            shards.write_shard(Path(folder) / shards.SHARD_PATTERN.format(0), samples)
            return time.perf_counter() - start

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()              # kernels run asynchronously; time their end, not their launch

    def run(self, s: Setting) -> dict:
        """Configure, warm up, time. Compile time is in the first (untimed) call, not the timing."""
        self.configure(s)
        # With compile the first call compiles; it must be untimed even with --warmup 0.
        warmups = [self.timed(s)[0] for _ in range(max(self.args.warmup, 1 if s.compile else 0))]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        calls = [self.timed(s) for _ in range(self.args.repeats)]
        memory = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None
        jpegs = [jpeg for _, _, call_jpegs in calls for jpeg in call_jpegs]
        return {"first_call_s": warmups[0] if warmups else None, "seconds": [c[0] for c in calls],
                "encode_seconds": [c[1] for c in calls], "write_seconds": self.write_seconds(jpegs),
                "images_written": self.args.images_per_shard, "peak_memory_gib": memory}

    @staticmethod
    def add_loop(row: dict, batch: int, median_call: float) -> None:
        """The stage loop's figures: the median call, its median encoding, the shard write's share."""
        encode = sorted(row["encode_seconds"])[len(row["encode_seconds"]) // 2]
        write = row["write_seconds"] * batch / row["images_written"]
        loop = median_call + encode + write
        row["loop_images_per_s"] = batch / loop
        row["encode_write_fraction"] = (encode + write) / loop
        row["encode_ms_per_image"] = 1000 * encode / batch
        row["write_ms_per_image"] = 1000 * write / batch

    def measure(self, s: Setting, role: str) -> dict:
        """The row of setting `s`, measured once (later calls return the same row)."""
        if s in self.rows:
            return self.rows[s]
        row = self.measure_new(s, role)
        self.on_row(list(self.rows.values()))
        return row

    def measure_new(self, s: Setting, role: str) -> dict:
        print(f"[row {len(self.rows) + 1}, {role}] {s.label()}: ", end="", file=sys.stderr, flush=True)
        row = {"role": role, **dataclasses.asdict(s)}
        try:
            row.update(self.run(s))
        except Exception as exc:                      # an OOM or compile failure loses one row, not the run
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        self.rows[s] = row
        if "error" in row:
            # Out here the exception's frames, which hold the failed call's tensors, are gone.
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"failed: {row['error']}", file=sys.stderr, flush=True)
            return row

        seconds = sorted(row["seconds"])
        median = seconds[len(seconds) // 2]
        # images/s of the median timed call: a burst of other work on the machine slows
        # one call, not the median. The mean over all calls is kept as well; on a quiet
        # machine the two agree.
        row["images_per_s"] = s.batch / median
        row["images_per_s_mean"] = s.batch * len(seconds) / sum(seconds)
        # Spread of the timed calls around their median: a noisy row shows here rather
        # than passing as a speed difference.
        row["spread"] = (seconds[-1] - seconds[0]) / median
        self.add_loop(row, s.batch, median)
        flops = self.flops_per_image(s.scheduler)
        row["tflop_per_image"] = flops / 1e12
        row["achieved_tflops"] = row["images_per_s"] * flops / 1e12
        peak = device_peak(self.device, s.dtype)
        row["utilisation"] = row["achieved_tflops"] * 1e12 / peak if peak else None
        if role == "baseline":
            self.baseline = row
        row["speedup"] = row["images_per_s"] / self.baseline["images_per_s"] if self.baseline else None
        print(f"{row['images_per_s']:.3g} img/s ({fmt(row['speedup'], '.2f')}x), stage loop "
              f"{row['loop_images_per_s']:.3g} img/s", file=sys.stderr, flush=True)
        return row


def peak_entry(device: torch.device) -> tuple | None:
    """The PEAKS entry of this GPU; None on a CPU or an unlisted GPU (utilisation n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((entry for entry in PEAKS if all(part in name for part in entry[0])), None)


def device_peak(device: torch.device, dtype: str) -> float | None:
    entry = peak_entry(device)
    return entry[1][dtype] if entry else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model()
    # The load average says whether other work shared the cores (timings then mean little).
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), no GPU; load average {load}"


# --------------------------------------------------------------------------- the walk

def baseline_setting(args) -> Setting:
    return Setting(batch=1, dtype="fp16" if args.device == "cuda" else "fp32", attention="sdpa",
                   channels_last=False, compile=False, scheduler="model")


def axis_values(args) -> dict[str, list]:
    return {"dtype": args.dtypes, "attention": args.attention, "channels_last": args.channels_last,
            "batch": args.batch_sizes, "compile": args.compile, "scheduler": args.schedulers}


def greedy_walk(bench: Bench, args) -> None:
    """Baseline, then each axis in turn from the best setting so far."""
    best = baseline_setting(args)
    best_row = bench.measure(best, "baseline")
    for axis in AXES:
        for value in axis_values(args)[axis]:
            candidate = dataclasses.replace(best, **{axis: value})
            row = bench.measure(candidate, f"vary {axis}")
            if (axis in ADOPTED and "error" not in row and "error" not in best_row
                    and row["images_per_s"] > best_row["images_per_s"] * ADOPT_MARGIN):
                best, best_row = candidate, row


def full_grid(bench: Bench, args) -> None:
    bench.measure(baseline_setting(args), "baseline")
    values = axis_values(args)
    # dtype outermost and compile innermost-but-one keeps casts and recompiles few.
    for dtype, attention, channels_last, batch, scheduler, compile_ in itertools.product(
            values["dtype"], values["attention"], values["channels_last"], values["batch"],
            values["scheduler"], values["compile"]):
        bench.measure(Setting(batch, dtype, attention, channels_last, compile_, scheduler), "full grid")


# --------------------------------------------------------------------------- report

def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    head = ("#", "role", "dtype", "batch", "attention", "ch_last", "compile", "scheduler",
            "img/s", "spread", "speedup", "loop img/s", "enc+wr", "TFLOP/img", "TFLOP/s", "util", "peak GiB",
            "1st call s")
    lines = [head]
    for i, r in enumerate(rows, 1):
        settings = (str(i), r["role"], r["dtype"], str(r["batch"]), r["attention"], "on" if r["channels_last"] else "off",
                    "on" if r["compile"] else "off", r["scheduler"])
        if "error" in r:
            lines.append(settings + ("failed",) + ("",) * 9)       # the reason is printed below the table
            continue
        util = None if r["utilisation"] is None else 100 * r["utilisation"]
        lines.append(settings + (fmt(r["images_per_s"], ".3g"), fmt(100 * r["spread"], ".0f") + "%",
                                 fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""),
                                 fmt(r["loop_images_per_s"], ".3g"), fmt(100 * r["encode_write_fraction"], ".1f") + "%",
                                 fmt(r["tflop_per_image"], ".3g"), fmt(r["achieved_tflops"], ".3g"),
                                 fmt(util, ".1f") + ("%" if util is not None else ""),
                                 fmt(r["peak_memory_gib"], ".2f"), fmt(r["first_call_s"], ".2f", "-")))
    widths = [max(len(line[c]) for line in lines) for c in range(len(head))]
    for n, line in enumerate(lines):
        print("  ".join(cell.ljust(w) if c < 8 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for i, r in enumerate(rows, 1):
        if "error" in r:
            print(f"row {i} failed: {r['error']}")


def targets(bench: Bench, rows: list[dict]) -> dict:
    """The issue's two GPU targets, in images/s, and where the fastest row stands."""
    ok = [r for r in rows if "error" not in r]
    best = max(ok, key=lambda r: r["images_per_s"])
    flops = bench.flops_per_image("model")
    base = bench.baseline["images_per_s"]
    return {"baseline_images_per_s": base, "flop_per_image": flops,
            "speedup_target_images_per_s": TARGET_SPEEDUP * base,
            "compute_bound_target_images_per_s": TARGET_FRACTION * H100_MEASURED / flops,
            "best_row": rows.index(best) + 1, "best_images_per_s": best["images_per_s"],
            "best_speedup": best["speedup"], "best_achieved_tflops": best["achieved_tflops"]}


def as_params(row: dict) -> str:
    """A row's setting as params.yaml spells it (profiles.<profile>.generate, and the top-level scheduler)."""
    flag = lambda on: "true" if on else "false"
    return (f"dtype: {row['dtype']}, batch_size: {row['batch']}, attention: {row['attention']}, "
            f"channels_last: {flag(row['channels_last'])}, compile: {flag(row['compile'])}; scheduler: {row['scheduler']}")


def print_targets(t: dict, best: dict, device: torch.device) -> None:
    gpu = device.type == "cuda"
    met = (lambda ok: "met" if ok else "NOT met") if gpu else (lambda ok: "n/a on CPU (GPU targets)")
    print(f"\nfastest: row {t['best_row']}, {t['best_images_per_s']:.3g} img/s, {t['best_speedup']:.2f}x the baseline, "
          f"{t['best_achieved_tflops']:.3g} TFLOP/s = {100 * t['best_achieved_tflops'] * 1e12 / H100_MEASURED:.2g}% "
          f"of the {H100_MEASURED / 1e12:.0f} TFLOP/s H100 bf16 matmul rate")
    print(f"  as params.yaml: {as_params(best)}")
    print(f"  stage loop (call + JPEG + tar): {best['loop_images_per_s']:.3g} img/s; encode {best['encode_ms_per_image']:.2g} "
          f"+ write {best['write_ms_per_image']:.2g} ms an image = {100 * best['encode_write_fraction']:.1f}% of the loop")
    print(f"target 1, >= {TARGET_SPEEDUP:g}x the plain baseline ({t['baseline_images_per_s']:.3g} img/s): "
          f"needs >= {t['speedup_target_images_per_s']:.3g} img/s -> "
          f"{met(t['best_images_per_s'] >= t['speedup_target_images_per_s'])}")
    print(f"target 2, >= {TARGET_FRACTION:.0%} of the H100 compute bound: {TARGET_FRACTION:g} x "
          f"{H100_MEASURED / 1e12:.0f} TFLOP/s / {t['flop_per_image'] / 1e12:.3g} TFLOP an image = "
          f"{t['compute_bound_target_images_per_s']:.3g} img/s -> "
          f"{met(t['best_images_per_s'] >= t['compute_bound_target_images_per_s'])}")


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        import diffusers
        import transformers
        quiet_libraries()
        device = torch.device(args.device)
        command = shlex.join(["python", "scripts/benchmark_generate.py", *argv])
        print(f"command: {command}")
        print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
        device_text = device_name(device)
        print(f"device: {device_text}")
        start = time.perf_counter()
        pipe = load_pipeline(args.model, device)
    except UsageError as exc:
        print(f"benchmark_generate: error: {exc}", file=sys.stderr)
        return 2
    bench = Bench(pipe, args)
    print(f"model: {args.model} (built/loaded in {time.perf_counter() - start:.1f} s), {bench.resolution} px, "
          f"{args.steps} steps, guidance {args.guidance}, warm-up {args.warmup}, {args.repeats} timed calls a row, "
          f"compile mode {args.compile_mode}")
    entry = peak_entry(device)
    if entry:
        print(f"dense peaks used ({' '.join(entry[0])}): fp16/bf16 {entry[1]['bf16'] / 1e12:g}, "
              f"fp32 {entry[1]['fp32'] / 1e12:g} TFLOP/s (fp32: non-tensor-core; TF32 convolutions can exceed it)")
    elif device.type == "cuda":
        print("dense peak of this GPU unknown: utilisation n/a")
    print(flush=True)

    header = {"command": command, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "device": device_text, "model": args.model, "resolution": bench.resolution,
              "steps": args.steps, "guidance": args.guidance, "warmup": args.warmup, "repeats": args.repeats,
              "compile_mode": args.compile_mode, "jpeg_quality": args.jpeg_quality,
              "images_per_shard": args.images_per_shard}
    if args.json:
        bench.on_row = lambda rows: write_json(args.json, {**header, "partial": True, "rows": rows})
    (full_grid if args.full_grid else greedy_walk)(bench, args)
    rows = list(bench.rows.values())
    print()
    print_table(rows)
    if bench.baseline is None:          # no speedups or targets without it
        print("benchmark_generate: error: the baseline row failed; see the messages above", file=sys.stderr)
        return 1
    result = targets(bench, rows)
    print_targets(result, rows[result["best_row"] - 1], device)
    if args.json:
        write_json(args.json, {**header, "rows": rows, "targets": result})
        print(f"\nrows written to {args.json}")
    return 0


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)                   # a reader (scripts/gpu_check.sh) never sees half a file


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
