"""DVC stage sd-generate: class prompts -> Stable Diffusion images in tar shards, plus a sample grid."""
from pathlib import Path

from imagenet_sd import backgrounds, generation, prompts, reports
from imagenet_sd.cli import run_stage, stage_parser


def main(params, args):
    rows = prompts.read(args.prompts)
    phrases = backgrounds.read_phrases(args.backgrounds)
    # Checks the train folder and loads the model before any output is removed.
    prepared = generation.prepare(params, rows, phrases)
    metrics = generation.generate(params, prepared, args.out, args.metrics)
    reports.sample_grid(args.out, rows, args.grid)
    print(f"{metrics['images']} images of {metrics['classes']} classes in {metrics['shards']} shards -> {args.out} "
          f"({metrics['images_per_second']} img/s); sample grid -> {args.grid}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--backgrounds", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the shards and index.json")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--grid", type=Path, required=True, help="PNG of sample images per class")
    run_stage(main, parser)
