"""DVC stage places-backgrounds: the 365 Places365 scenes as readable background phrases,
and for prompt c_hc_bm each class's `background_top_k` best-matching scenes (module matching).

For any other prompt the matched table is written with its header only, and no model is loaded.
"""
from pathlib import Path

from imagenet_sd.core.cli import run_stage, stage_parser
from imagenet_sd.prompts import backgrounds, matching


def main(params, args):
    rows = backgrounds.build()
    backgrounds.write(args.out, rows)
    print(f"{len(rows)} scenes -> {args.out}")
    print(matching.write_table(params, args.prompts, [phrase for _, _, phrase in rows], args.matched))


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, default=Path("data/prompts/prompts.tsv"),
                        help="the class prompts (read for prompt c_hc_bm only)")
    parser.add_argument("--matched", type=Path, default=Path("data/backgrounds/matched.tsv"),
                        help="each class's matched scenes (header only unless prompt is c_hc_bm)")
    run_stage(main, parser)
