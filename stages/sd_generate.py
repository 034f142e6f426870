"""DVC stage sd-generate: class prompts -> Stable Diffusion images in tar shards, plus a sample grid.

`--dry-run` prints images, shards, disk and GPU-hours and stops. With
`processes > 1` the stage runs itself again under torchrun, one process per GPU.
"""
import sys
from pathlib import Path

from imagenet_sd import backgrounds, distributed, generation, prompts, reports
from imagenet_sd.cli import run_stage, stage_parser


def main(params, args):
    rows = prompts.read(args.prompts)
    phrases = backgrounds.read_phrases(args.backgrounds)
    plan = generation.make_plan(params, rows, phrases)
    if not distributed.under_torchrun():
        # Checked once, before any worker starts or any output is touched.
        generation.check(params, plan)
        print("\n".join(generation.describe(params, plan)), file=sys.stderr)
        if args.dry_run:
            return
        if params.generate.processes > 1:
            sys.exit(distributed.relaunch(params.generate.processes))
    metrics = generation.generate(params, plan, args.out, args.metrics)
    if metrics is None:
        return          # not the main rank
    reports.sample_grid(args.out, rows, args.grid)
    print(f"{metrics['images']} images of {metrics['classes']} classes in {metrics['shards']} shards -> {args.out} "
          f"({metrics['generated']} made at {metrics['images_per_second']} img/s, {metrics['reused']} reused); "
          f"sample grid -> {args.grid}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--prompts", type=Path, default=Path("data/prompts/prompts.tsv"))
    parser.add_argument("--backgrounds", type=Path, default=Path("data/backgrounds/backgrounds.tsv"))
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"), help="folder for the shards and index.json")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/generate.json"))
    parser.add_argument("--grid", type=Path, default=Path("reports/samples.png"), help="PNG of sample images per class")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and estimates, generate nothing")
    run_stage(main, parser)
