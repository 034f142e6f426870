#!/usr/bin/env python
"""The markdown rows of scripts/gpu_check.sh, for docs/benchmarks.md, from the JSON its benchmarks wrote.

    python scripts/gpu_check_rows.py FOLDER [gpu|smoke]

FOLDER holds status.tsv (part, exit status, seconds, limit) and <part>.json of each
part. A part without JSON (it failed or ran out of time before writing any) gets a
line saying so and the tail of its log. Exit status 1 when a part did not finish.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PARTS = ("generate", "train", "loader", "loop", "probe")
TITLES = {
    "generate": "sd-generate: images/s (scripts/benchmark_generate.py)",
    "train": "train-resnet50: training step (scripts/benchmark_train.py)",
    "loader": "train-resnet50: data loader (scripts/benchmark_loader.py)",
    "loop": "train-resnet50: whole training loop beside its parts (scripts/benchmark_loop.py)",
    "probe": "eval-transfer: linear probe and feature extraction (scripts/benchmark_probe.py)",
}


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def generate_rows(data: dict) -> list[str]:
    lines = [f"{data['model']}, {data['resolution']} px, {data['steps']} steps, guidance {data['guidance']}, "
             f"{data['repeats']} timed calls a row, compile mode {data['compile_mode']}, JPEG quality "
             f"{data['jpeg_quality']}, shards of {data['images_per_shard']}; {data['device']}", ""]
    head = ["#", "role", "dtype", "batch", "attention", "channels_last", "compile", "img/s", "spread", "speedup",
            "loop img/s", "enc+wr", "TFLOP/s", "util", "peak GiB", "1st call s"]
    rows = []
    for i, r in enumerate(data["rows"], 1):
        setting = [str(i), r["role"], r["dtype"], str(r["batch"]), r["attention"], str(r["channels_last"]).lower(),
                   str(r["compile"]).lower()]
        if "error" in r:
            rows.append(setting + [f"failed: {r['error'][:80]}"] + [""] * 8)
            continue
        util = r["utilisation"]
        rows.append(setting + [fmt(r["images_per_s"], ".3g"), f"{100 * r['spread']:.0f}%",
                               fmt(r["speedup"], ".2f") + "x", fmt(r["loop_images_per_s"], ".3g"),
                               f"{100 * r['encode_write_fraction']:.1f}%", fmt(r["achieved_tflops"], ".3g"),
                               "n/a" if util is None else f"{100 * util:.1f}%", fmt(r["peak_memory_gib"], ".1f"),
                               fmt(r["first_call_s"], ".1f", "-")])
    lines += table(head, rows)
    if data.get("partial"):
        lines.append(f"\n(cut short by its time limit after {len(data['rows'])} rows)")
    elif "targets" in data:
        t = data["targets"]
        best = data["rows"][t["best_row"] - 1]
        lines.append(f"\nfastest: row {t['best_row']}, {t['best_images_per_s']:.3g} img/s, "
                     f"{t['best_speedup']:.2f}x the baseline; stage loop {best['loop_images_per_s']:.3g} img/s. "
                     f"Targets: >= {t['speedup_target_images_per_s']:.3g} img/s (2x the baseline) and >= "
                     f"{t['compute_bound_target_images_per_s']:.3g} img/s (40 % of the H100 compute bound)")
    return lines


def train_rows(data: dict) -> list[str]:
    a = data["args"]
    lines = [f"{data['device']}; batch {a['batch']}, {a['warmup']} warm-up + {a['steps']} timed steps a row", ""]
    # Rows from before --archs are ResNet-50's.
    arch = lambda r: r.get("arch", "resnet50")
    single = {arch(r): r["gflop_per_image"] for r in reversed(data["rows"]) if r["layout"] == "single crop"}
    head = ["arch", "layout", "crops", "amp", "channels_last", "compile", "img/s", "GFLOP/img (x single)", "TFLOP/s"]
    return lines + table(head, [[arch(r), r["layout"], r["crops"], r["amp"], str(r["channels_last"]).lower(),
                                 str(r["compile"]).lower(), f"{r['images_per_s']:.1f}",
                                 f"{r['gflop_per_image']:.1f} ({r['gflop_per_image'] / single[arch(r)]:.2f}x)",
                                 f"{r['tflop_per_s']:.2f}"] for r in data["rows"]])


def loader_rows(data: dict) -> list[str]:
    images = data["images"]
    lines = [f"{data['cpu']}; {images['images']} JPEGs (mean {images['mean_jpeg_kb']:.0f} kB), "
             f"batch {data['batch_size']}, {data['repeats']} passes a row", ""]
    head = ["local crops", "workers", "loader", "img/s", "img/s/core", "spread", "CPU ms/img", "x baseline/core"]
    return lines + table(head, [[str(r["local_crops"]), str(r["workers"]), r["loader"], f"{r['images_per_s']:.1f}",
                                 f"{r['images_per_s_per_core']:.1f}", f"{100 * r['spread']:.0f}%",
                                 f"{r['cpu_ms_per_image']:.1f}", f"{r['speedup']:.2f}x"] for r in data["rows"]])


def loop_rows(data: dict) -> list[str]:
    a = data["args"]
    lines = [f"{data['device']}; {a['images']} JPEGs of {a['resolution']} px, batch {a['batch']}, crops "
             f"{a['global_crops']}x{a['global_size']} + {a['local_crops']}x{a['local_size']}, {a['workers']} workers, "
             f"{a['warmup']} + {a['steps']} steps a row", ""]
    head = ["head", "multi-crop on", "loader img/s", "augment img/s", "step img/s", "whole loop img/s",
            "loop / slowest part"]
    rows = [[r.get("head", "linear"), r["path"], fmt(r["loader"], ".1f"), fmt(r.get("augment"), ".1f", "(in the loader)"), fmt(r["step"], ".1f"),
             fmt(r["loop"], ".1f"), fmt(r["loop_over_slowest_part"], ".2f")] for r in data["rows"]]
    return lines + table(head, rows)


def probe_rows(data: dict) -> list[str]:
    head = ["train x classes", "probe", "device", "fit s (C choice + refit)", "CPU s", "L-BFGS iters", "s/iter",
            "top-1", "C"]
    rows = []
    for r in data["probe"]:
        measured = r["status"] == "measured"
        rows.append([f"{r['train']} x {r['classes']}", r["kind"], r["device"],
                     f"{r['fit_s']:.1f}" if measured else f"> {r['status'].split()[-2]} ({r['fits']}/7 fits)",
                     f"{r['cpu_s']:.0f}" if measured else "", str(r["iterations"]),
                     fmt(r.get("s_per_iteration"), ".3g"), f"{r['top1']:.2f}" if measured else "",
                     f"{r['C']:g}" if measured else ""])
    lines = table(head, rows)
    if data["extraction"]:
        lines += [""] + table(["path", "resize / crop", "batch", "device", "images/s"],
                              [[r["path"], f"{r['resize']} / {r['crop']}", str(r["batch"]), r["device"],
                                f"{r['images_per_s']:.1f}"] for r in data["extraction"]])
    return lines


FORMATS = {"generate": generate_rows, "train": train_rows, "loader": loader_rows, "loop": loop_rows,
           "probe": probe_rows}


def log_tail(path: Path, lines: int = 5) -> list[str]:
    if not path.is_file():
        return ["    (no log)"]
    return ["    " + line for line in path.read_text(errors="replace").splitlines()[-lines:]]


def section(folder: Path, name: str, status: dict) -> tuple[list[str], bool]:
    """The part's heading, status line and rows, and whether it finished."""
    rc, seconds, limit = status.get(name, (None, "0", "?"))
    done = rc == "0"
    if rc is None:
        state = "not run"
    elif rc == "skipped":
        return [f"### {TITLES[name]}", "", f"{name}: skipped (not in --parts)", ""], True
    else:
        state = "finished" if done else ("ran out of time" if rc in ("124", "137") else f"exit status {rc}")
    lines = [f"### {TITLES[name]}", "", f"{name}: {state}, {seconds} s of its {limit} s limit", ""]
    path = folder / f"{name}.json"
    try:
        data = json.loads(path.read_text())
        return lines + FORMATS[name](data), done
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return lines + [f"no rows ({type(exc).__name__}: {exc}); the end of {folder / (name + '.log')}:"]  \
            + log_tail(folder / f"{name}.log"), False


def device_line(mode: str) -> str:
    if mode != "gpu":
        return "CPU smoke run: tiny sizes, figures mean nothing"
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        name = ""
    return name or "GPU (nvidia-smi gave no name)"


def main(argv: list[str]) -> int:
    folder, mode = Path(argv[0]), (argv[1] if len(argv) > 1 else "gpu")
    status = {}
    for line in (folder / "status.tsv").read_text().splitlines():
        name, rc, seconds, limit = line.split("\t")
        status[name] = (rc, seconds, limit)
    total = sum(int(s) for _, s, _ in status.values())     # a skipped part: 0 s of a 0 s limit
    limits = sum(int(lim) for _, _, lim in status.values())
    print(f"## gpu_check ({mode}): {device_line(mode)}\n")
    print(f"{total} s in all (limits {limits} s); JSON and logs in {folder}\n")
    finished = True
    for name in PARTS:
        lines, done = section(folder, name, status)
        finished &= done
        print("\n".join(lines) + "\n")
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
