"""DVC stage few-shot: the K-shot subset (K = `shots`) of every class, drawn from data.train by `seed`.

Writes data/fewshot/shots.tsv (class, shot, path relative to data.train, bytes, sha256); with
shots: 0 (zero-shot) the header only, and no folder is read. See src/imagenet_sd/datasets/fewshot.py
for how the images are chosen.
"""
from pathlib import Path

from imagenet_sd.core.cli import run_stage, stage_parser
from imagenet_sd.datasets import fewshot
from imagenet_sd.prompts import prompts


def main(params, args):
    rows = prompts.read(args.prompts)
    table = fewshot.draw(rows, params.data.train, params.shots, params.seed,
                         f"profiles.{params.profile}.data.train", cache_dir=params.generate.work_dir)
    fewshot.write(args.out, table)
    print(f"{params.shots} shots x {len(rows) if table else 0} classes -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--prompts", type=Path, default=Path("data/prompts/prompts.tsv"))
    parser.add_argument("--out", type=Path, default=Path("data/fewshot/shots.tsv"))
    run_stage(main, parser)
