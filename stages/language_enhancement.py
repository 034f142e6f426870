"""DVC stage language-enhancement: for prompt le, each image's sentence, written by a T5 from its class name.

He et al. (ICLR 2023)'s language enhancement: as many distinct sentences a class as it has images
(real x scale, plus the held-out ones), image i getting sentence i, into data/prompts/sentences/
(sentences.tsv: class, image_index, sentence; offsets.npy; index.json). For any other prompt the
header only, and no model is loaded. See src/imagenet_sd/language/language.py.
"""
from pathlib import Path

from imagenet_sd.core.cli import run_stage, stage_parser
from imagenet_sd.language import language
from imagenet_sd.prompts import prompts


def main(params, args):
    rows = prompts.read(args.prompts) if params.prompt == prompts.SENTENCES else []
    print(language.write(params, rows, args.out, args.details))


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--prompts", type=Path, default=Path("data/prompts/prompts.tsv"))
    parser.add_argument("--out", type=Path, default=Path("data/prompts/sentences"),
                        help="folder of sentences.tsv, offsets.npy and index.json")
    parser.add_argument("--details", type=Path, help="JSON of the run: sentences drawn, candidates, speed")
    run_stage(main, parser)
