"""DVC stage clip-filter: which synthetic images train-resnet50 reads, by the filter params.yaml's
`filter:` names (src/imagenet_sd/filter/registry.py lists them).

With `filter: clip` (He et al., ICLR 2023), a CLIP model scores every image against every class text and the images
whose own class it is not confident enough of are left out (profiles.*.filter: model, rule,
threshold), keeping real x scale a class with `keep: per_class`; scores are cached per shard,
so a rule, threshold or keep change runs no model. With
`filter: none` it writes "keep everything" from index.json alone, without loading a model.
"""
import sys
from pathlib import Path

from imagenet_sd.core import slurm
from imagenet_sd.core.cli import run_stage, stage_parser
from imagenet_sd.filter import registry


def main(params, args):
    chosen = registry.chosen(params)
    if chosen.device is not None and slurm.wanted(params, chosen.device(params)):
        sys.exit(slurm.submit(params, "clip-filter", one_gpu=True))
    details = registry.run(params, args.prompts, args.shards, args.out, args.metrics, args.details)
    rate = f", {details['images_per_second']} img/s" if details.get("images_per_second") else ""
    topped = (f", {details['classes_topped_up']} classes topped up with their most confident failing images"
              if details["classes_topped_up"] else "")
    print(f"filter {details['filter']}: {details['kept']} of {details['candidates']} training images kept "
          f"({details['pass_rate']:.1%} pass, at least {details['min_pass_rate']:.1%} a class), at least "
          f"{details['min_per_class']} a class{topped}{rate} -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--prompts", type=Path, default=Path("data/prompts/prompts.tsv"), help="class names (first lemma)")
    parser.add_argument("--shards", type=Path, default=Path("data/synthetic"), help="folder of the shards and index.json")
    parser.add_argument("--out", type=Path, default=Path("data/filtered"), help="folder of the kept set")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/filter.json"))
    parser.add_argument("--details", type=Path, help="JSON of everything the metrics leave out (per class, rule, speed)")
    run_stage(main, parser)
