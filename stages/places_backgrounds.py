"""DVC stage places-backgrounds: the 365 Places365 scenes as readable background phrases."""
from pathlib import Path

from imagenet_sd import backgrounds
from imagenet_sd.cli import run_stage, stage_parser


def main(params, args):
    rows = backgrounds.build()
    backgrounds.write(args.out, rows)
    print(f"{len(rows)} scenes -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True)
    run_stage(main, parser)
