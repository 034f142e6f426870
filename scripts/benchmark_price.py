#!/usr/bin/env python
"""Benchmark (not a test): the price of an image for each generator family and each cheaper setting.

Prices are counted, not assumed: TFLOP an image from the real configs shipped in data/
(estimates.count_flops on the meta device: the family's denoiser, text encoders and VAE,
guidance, the sampler's calls, DeepCache's cached calls, ToMe's merged tokens).

`--cpu-ratio` also times the denoising loop (pipeline call to latents, no VAE decode) of
SD v1.4's full-size architecture with random weights (benchmark_generate.build_random_sd)
plain, with DeepCache and with ToMe, and prints each speed-up's time ratio against the
counted FLOP ratio. On a GPU: `--device cuda` (scripts/gpu_check.sh runs it).

    python scripts/benchmark_price.py                          # the price table (seconds)
    python scripts/benchmark_price.py --cpu-ratio --steps 6    # + measured speed-ups (minutes on 2 cores)
    python scripts/benchmark_price.py --cpu-ratio --device cuda --resolution 512 --steps 50
    python scripts/benchmark_price.py --cpu-ratio --model models/tiny-sd --resolution 64 --steps 2   # smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RANDOM_SD = "sd-v1-4-random"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from imagenet_sd.core.paths import DATA  # noqa: E402
from imagenet_sd.generate import estimates  # noqa: E402
from imagenet_sd.models import families, sd_model  # noqa: E402

# (label, data/ folder, resolution, steps, guidance, extra count_flops arguments, scheduler):
# SD v1.4 at the paper's setting and its cheaper settings, then each family's generators (its module in
# models/families/) at their model cards' settings, at each resolution its prices name.
ROWS = [
    ("SD v1.4 (paper), PNDM 50, cfg 7.5", "sd-v1-4", 512, 50, 7.5, {}, "model"),
    ("SD v1.4, UniPC 20", "sd-v1-4", 512, 20, 7.5, {}, "unipc"),
    ("SD v1.4 + LCM-LoRA, LCM 4, cfg 1", "sd-v1-4", 512, 4, 1.0, {}, "lcm"),
    ("SD v1.4, DeepCache N=3", "sd-v1-4", 512, 50, 7.5, {"deepcache_interval": 3}, "model"),
    ("SD v1.4, DeepCache N=5", "sd-v1-4", 512, 50, 7.5, {"deepcache_interval": 5}, "model"),
    ("SD v1.4, ToMe r=0.5", "sd-v1-4", 512, 50, 7.5, {"token_merging": 0.5}, "model"),
    ("SD v1.4, UniPC 20 + DeepCache N=3", "sd-v1-4", 512, 20, 7.5, {"deepcache_interval": 3}, "unipc"),
] + [
    (label, estimates.SHIPPED_CONFIGS[g.paper["model"]], resolution, g.settings["steps"], g.settings["guidance"],
     {k: v for k, v in g.paper.items() if k == "max_sequence_length"}, "model")
    for family in families.FAMILIES.values() for g in family.generators for label, resolution in g.prices
]


def price_table() -> list[dict]:
    rows = []
    for label, folder, resolution, steps, guidance, extra, scheduler in ROWS:
        source = str(DATA / folder)
        sampler = sd_model.scheduler_for(scheduler, sd_model.scheduler_config(source, True))
        flops = estimates.count_flops(source, resolution, steps, guidance, scheduler=sampler, local_files_only=True,
                                      **extra)
        rows.append({"setting": label, "tflop_per_image": round(flops.per_image / 1e12, 2),
                     "denoiser_calls": flops.unet_calls, "cached_calls": flops.cached_calls,
                     "gpu_hours_in1k_1x_a100": round(estimates.gpu_hours(1_281_167, flops.per_image)[
                         next(iter(estimates.RATES))], 1)})
    return rows


def time_loop(pipe, steps: int, resolution: int, repeats: int) -> float:
    """Median seconds of one guided pipeline call of one image, to latents (the denoising loop)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        pipe(prompt=["a photo of a tench"], height=resolution, width=resolution, num_inference_steps=steps,
             guidance_scale=7.5, output_type="latent", generator=[torch.Generator("cpu").manual_seed(0)])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def load(model: str, device: torch.device):
    """(pipeline, where its configs are): SD v1.4's architecture with random weights, or a pipeline folder."""
    if model == RANDOM_SD:
        from benchmark_generate import build_random_sd
        return build_random_sd(device), str(DATA / "sd-v1-4")
    return sd_model.load_pipeline(model, device, torch.float16 if device.type == "cuda" else torch.float32), model


def speed_ratios(model: str, device: torch.device, resolution: int, steps: int, repeats: int) -> list[dict]:
    settings = [("plain", 0, 0.0), ("DeepCache N=3", 3, 0.0), ("ToMe r=0.5", 0, 0.5)]
    rows, base = [], None
    for label, interval, ratio in settings:
        pipe, configs = load(model, device)           # a fresh one: the speed-ups patch it in place
        pipe.set_progress_bar_config(disable=True)
        sd_model.speed_ups(pipe, interval, ratio)
        time_loop(pipe, 1, resolution, 1)                 # warm-up (allocations, kernels)
        seconds = time_loop(pipe, steps, resolution, repeats)
        flops = estimates.count_flops(configs, resolution, steps, 7.5, local_files_only=True,
                                      deepcache_interval=interval, token_merging=ratio)
        loop = flops.unet_calls * flops.unet_call + flops.cached_calls * flops.cached_call
        base = base or (seconds, loop)
        rows.append({"setting": label, "model": model, "device": device.type, "resolution": resolution, "steps": steps,
                     "seconds": round(seconds, 2), "time_ratio": round(base[0] / seconds, 2),
                     "flop_ratio": round(base[1] / loop, 2)})
        del pipe
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-ratio", action="store_true", help="also time DeepCache and ToMe on SD v1.4's size")
    parser.add_argument("--model", default=RANDOM_SD, help=f"{RANDOM_SD} (default) or a pipeline folder to time")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    out = {"prices": price_table()}
    print(f"{'setting':44} {'TFLOP/img':>10} {'calls':>6} {'cached':>6} {'A100 GPU-h, IN-1K 1x':>21}")
    for r in out["prices"]:
        print(f"{r['setting']:44} {r['tflop_per_image']:>10} {r['denoiser_calls']:>6} {r['cached_calls']:>6} "
              f"{r['gpu_hours_in1k_1x_a100']:>21}")
    if args.cpu_ratio:
        torch.set_grad_enabled(False)
        out["speed_ups"] = speed_ratios(args.model, torch.device(args.device), args.resolution, args.steps,
                                        args.repeats)
        print(f"\n{'speed-up':16} {'device':6} {'px':>4} {'steps':>5} {'s/img':>7} {'time x':>7} {'FLOP x':>7}")
        for r in out["speed_ups"]:
            print(f"{r['setting']:16} {r['device']:6} {r['resolution']:>4} {r['steps']:>5} {r['seconds']:>7} "
                  f"{r['time_ratio']:>7} {r['flop_ratio']:>7}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
