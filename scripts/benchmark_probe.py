#!/usr/bin/env python
"""Benchmark (not a test): linear-probe fit time, scikit-learn vs PyTorch, and feature-extraction images/s.

Probe rows. For each size (train images x classes, 2048-d features) and probe kind,
`imagenet_sd.models.probes.probe` runs the whole protocol eval-transfer runs: C chosen from
`--c-points` log-spaced values over `--c-range` on a seeded 20 % of train (warm-started
fits on the other 80 %; the defaults, 6 over [1e-3, 1e2], are the grid the figures in
docs/benchmarks.md were measured with; eval-transfer's paper profile uses 45 over [1e-6, 1e5]),
refit on all of train, prediction of a test set. A row reports

- fit s:    wall seconds of that call (`--max-seconds` per call; a call over the
            budget is stopped and its row says how many of its c-points + 1 fits had finished);
- CPU s:    CPU seconds of the process (all its threads) over the same call, which
            other work on a shared machine moves less than wall time;
- iters:    L-BFGS iterations summed over the c-points + 1 fits;
- s/iter:   seconds of one L-BFGS iteration on all of train at C = 1, measured
            separately (`--cost-iterations` iterations from zero), so that a call
            stopped at the budget still says what an iteration costs;
- top-1, C: test accuracy (percent) and the chosen C.

Each call runs in a fresh process (spawned, so that a stopped call takes nothing
with it), one at a time. The features imitate a trained encoder's: class means in
a 64-dimensional subspace of the 2048 plus unit Gaussian noise, clipped at 0 like a
ReLU's output (about half the entries zero); `--signal` sets how far apart the
means are (0.15: about 80 % top-1 with 100 classes and 50 images a class).

Extraction rows: images/s of the ResNet-50 encoder (fc removed, as eval-transfer
uses it) at the paper profile's preprocessing (evaluate.resize / evaluate.crop),
(a) the forward pass alone on random tensors and (b) the stage's path from JPEG
files: eval-transfer's loader (decode, resize, centre crop, normalise) plus the
forward pass, on photo-sized (500 x 375) JPEGs written to a temporary folder.

    python scripts/benchmark_probe.py                                     # CPU defaults
    python scripts/benchmark_probe.py --sizes 100000x1000 --max-seconds 1800 --json probe.json
    python scripts/benchmark_probe.py --device cuda                       # torch probe on the GPU
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

DIM = 2048
RANK = 64            # class means span a subspace this big, as a trained encoder's class structure does
SCRATCH = "sklearn-scratch"   # scikit-learn fitted from zero at every C: the baseline of the 45-point target


def parse_args(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="5000x100,20000x100,20000x1000,100000x1000",
                        help="comma-separated TRAINxCLASSES")
    parser.add_argument("--kinds", default="sklearn,torch",
                        help=f"sklearn, torch and/or {SCRATCH} (scikit-learn without warm starts)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cpu", "cuda"),
                        help="device of the torch probe (scikit-learn runs on the CPU)")
    parser.add_argument("--test", type=int, default=10_000, help="test images a size")
    parser.add_argument("--signal", type=float, default=0.15, help="spread of the class means")
    parser.add_argument("--max-seconds", type=float, default=900, help="budget of one probe call")
    parser.add_argument("--cost-iterations", type=int, default=3, help="L-BFGS iterations timed for s/iter")
    parser.add_argument("--extraction-batches", type=int, default=3, help="timed batches (0: no extraction rows)")
    parser.add_argument("--extraction-batch", type=int, default=16)
    parser.add_argument("--c-range", default="1e-3,1e2", help="low,high of the C grid")
    parser.add_argument("--c-points", type=int, default=6, help="values of C in the grid")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    try:
        args.sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: expected e.g. 5000x100,20000x1000")
    args.kinds = args.kinds.split(",")
    if set(args.kinds) - {"sklearn", "torch", SCRATCH}:
        parser.error(f"--kinds: sklearn, torch and/or {SCRATCH}")
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda but no CUDA device is visible")
    return args


# --------------------------------------------------------------------------- probe

def features(n: int, classes: int, seed: int, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """Encoder-like features: low-rank class means (the same for every seed) + noise, then ReLU."""
    rng = np.random.default_rng(classes)
    means = rng.standard_normal((classes, RANK)) @ rng.standard_normal((RANK, DIM)) * (signal / np.sqrt(RANK))
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % classes)
    x = means.astype(np.float32)[y] + rng.standard_normal((n, DIM), dtype=np.float32)
    return np.maximum(x, 0, out=x), y


def counting(fitter: type, progress) -> type:
    """`fitter` that reports (fits done, iterations so far) after each fit."""
    class Counting(fitter):
        def fit(self, c: float) -> None:
            before = self.iterations
            super().fit(c)
            Counting.fits += 1
            Counting.iterations += self.iterations - before
            progress.put(("fit", Counting.fits, Counting.iterations))
    Counting.fits = Counting.iterations = 0
    return Counting


def from_scratch(fitter: type) -> type:
    """`fitter` (scikit-learn's) with no warm start: each C of the grid, and the refit, start from zero."""
    class Scratch(fitter):
        def fit(self, c: float) -> None:
            self.clf.set_params(warm_start=False)
            super().fit(c)

        def load(self, solution) -> None:
            pass
    return Scratch


def iteration_cost(fitter: type, x: np.ndarray, y: np.ndarray, device: torch.device, iterations: int) -> float:
    """Seconds of one L-BFGS iteration on (x, y) at C = 1, from zero."""
    from imagenet_sd.models import probes
    saved = probes.MAX_ITER
    probes.MAX_ITER = iterations        # read by sklearn's fitter when built, by torch's when fitting
    try:
        fitter(x[:1000], y[:1000], device).fit(1.0)   # warm-up: the first L-BFGS call sets things up
        model = fitter(x, y, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # "did not converge": that is the point here
            sync(device)
            start = time.perf_counter()
            model.fit(1.0)
            sync(device)
            elapsed = time.perf_counter() - start
    finally:
        probes.MAX_ITER = saved
    return elapsed / max(1, model.iterations)


def probe_child(size: tuple[int, int], kind: str, device: str, args: dict, progress) -> None:
    """One probe call in its own process; reports through `progress`."""
    from imagenet_sd.models import probes
    n, classes = size
    device = torch.device(device if kind == "torch" else "cpu")
    train_x, train_y = features(n, classes, 1, args["signal"])
    test_x, test_y = features(args["test"], classes, 2, args["signal"])
    if kind == SCRATCH:
        probes.FITTERS[SCRATCH] = from_scratch(probes.FITTERS["sklearn"])
    fitter = probes.FITTERS[kind]
    progress.put(("cost", iteration_cost(fitter, train_x, train_y, device, args["cost_iterations"])))
    probes.FITTERS[kind] = counting(fitter, progress)
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # ConvergenceWarning at MAX_ITER: counted in iters instead
        grid = probes.c_grid(*(float(v) for v in args["c_range"].split(",")), args["c_points"])
        result = probes.probe(train_x, train_y, test_x, test_y, seed=0, kind=kind, device=device, grid=grid)
    sync(device)
    progress.put(("done", time.perf_counter() - wall, time.process_time() - cpu, result))


def run_probe(size: tuple[int, int], kind: str, args) -> dict:
    context = multiprocessing.get_context("spawn")
    progress = context.Queue()
    child = context.Process(target=probe_child, args=(size, kind, args.device, vars(args), progress))
    row = {"train": size[0], "classes": size[1], "kind": kind, "c_points": args.c_points,
           "device": args.device if kind == "torch" else "cpu", "fits": 0, "iterations": 0}
    child.start()
    deadline = None
    while True:
        try:
            message = progress.get(timeout=1 if deadline is None else max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(f"{size} {kind}: the probe process died (exit {child.exitcode})")
            if deadline is not None and time.monotonic() >= deadline:
                child.terminate()
                row.update(status=f"stopped at {args.max_seconds:.0f} s")
                break
            continue
        if message[0] == "cost":
            row["s_per_iteration"] = message[1]
            deadline = time.monotonic() + args.max_seconds     # the budget is the probe call's alone
        elif message[0] == "fit":
            row["fits"], row["iterations"] = message[1], message[2]
        else:
            _, wall, cpu, result = message
            row.update(status="measured", fit_s=wall, cpu_s=cpu, top1=result["top1"], C=result["C"])
            break
    child.join()
    return row


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- extraction

def paper_preprocessing() -> tuple[int, int]:
    import yaml

    from imagenet_sd.core import params
    raw = yaml.safe_load(Path("params.yaml").read_text())
    paper = params.parse({**raw, "profile": "paper"})
    return paper.evaluate.resize, paper.evaluate.crop


def extraction_rows(args) -> list[dict]:
    from PIL import Image

    from imagenet_sd.datasets import inference, transforms
    from imagenet_sd.evaluate import transfer
    from imagenet_sd.models import network
    from imagenet_sd.models.heads.linear import Linear
    device = torch.device(args.device)
    resize, crop = paper_preprocessing()
    encoder = transfer.encoder_of(network.build("resnet50", Linear(), 1000)).to(device)
    batch, count = args.extraction_batch, args.extraction_batches
    rows = []

    times = []
    images = torch.randn(batch, 3, crop, crop, device=device)
    with torch.no_grad():
        for i in range(count + 1):                  # the first batch warms up and is not timed
            sync(device)
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                encoder(images)
            sync(device)
            times.append(time.perf_counter() - start)
    rows.append({"path": "encoder forward (random tensors)", "images_per_s": batch / statistics.median(times[1:])})

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        samples = []
        for i in range(batch * (count + 1)):
            path = Path(tmp) / f"{i}.jpg"
            pixels = rng.integers(0, 256, (375 // 8, 500 // 8, 3), dtype=np.uint8)   # blocky: photo-like JPEG size
            Image.fromarray(pixels).resize((500, 375), Image.BILINEAR).save(path, quality=90)
            samples.append((path, 0))
        data = inference.loader(samples, transforms.build_transform(resize, crop), batch, device)
        stamps = [time.perf_counter()]
        for _ in inference.forward_batches(encoder, data, device, "extraction"):
            stamps.append(time.perf_counter())
        per_batch = np.diff(stamps)[1:]              # the first batch (start-up) is not timed
    rows.append({"path": "stage: JPEG -> loader -> encoder", "images_per_s": batch / statistics.median(per_batch)})
    for r in rows:
        r.update(resize=resize, crop=crop, batch=batch, device=args.device)
    return rows


# --------------------------------------------------------------------------- report

def print_probe_table(rows: list[dict]) -> None:
    print("\n| train x classes | probe | device | fit s (C choice + refit) | CPU s | iters | s/iter | top-1 | C |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] == "measured":
            fit, cpu, top1, c = f"{r['fit_s']:.1f}", f"{r['cpu_s']:.0f}", f"{r['top1']:.2f}", f"{r['C']:g}"
        else:
            fit, cpu, top1, c = f"> {r['status'].split()[-2]} ({r['fits']}/{r['c_points'] + 1} fits done)", "", "", ""
        print(f"| {r['train']} x {r['classes']} | {r['kind']} | {r['device']} | {fit} | {cpu} | "
              f"{r['iterations']} | {r['s_per_iteration']:.3g} | {top1} | {c} |")


def print_target(rows: list[dict], args) -> None:
    """Per size: each warm-started probe's time against scikit-learn from scratch on the same grid
    (the target: <= 1/5 of it, the same C within one grid step, top-1 within 0.2)."""
    from imagenet_sd.models import probes
    grid = list(probes.c_grid(*(float(v) for v in args.c_range.split(",")), args.c_points))
    for size in args.sizes:
        at = {r["kind"]: r for r in rows if (r["train"], r["classes"]) == size and r["status"] == "measured"}
        if SCRATCH not in at:
            continue
        base = at[SCRATCH]
        for kind in ("sklearn", "torch"):
            if kind in at:
                r = at[kind]
                steps = abs(grid.index(r["C"]) - grid.index(base["C"]))
                ratio = r["fit_s"] / base["fit_s"]
                met = ratio <= 0.2 and steps <= 1 and abs(r["top1"] - base["top1"]) <= 0.2
                print(f"{size[0]} x {size[1]}, {args.c_points} C: {kind} (warm) {r['fit_s']:.1f} s = {ratio:.2f} x "
                      f"{SCRATCH} {base['fit_s']:.1f} s; C {steps} step(s) apart; top-1 {r['top1'] - base['top1']:+.2f}"
                      f" -> target {'met' if met else 'NOT met'}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; torch probe on {args.device}; "
          f"features {DIM}-d, {args.test} test images a size", file=sys.stderr)
    rows = []
    for size in args.sizes:
        for kind in args.kinds:
            rows.append(run_probe(size, kind, args))
            print(rows[-1], file=sys.stderr, flush=True)
    print_probe_table(rows)
    print_target(rows, args)
    extraction = extraction_rows(args) if args.extraction_batches else []
    if extraction:
        print("\n| path | resize / crop | batch | device | images/s |")
        print("|---|---|---|---|---|")
        for r in extraction:
            print(f"| {r['path']} | {r['resize']} / {r['crop']} | {r['batch']} | {r['device']} | "
                  f"{r['images_per_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "probe": rows, "extraction": extraction},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
