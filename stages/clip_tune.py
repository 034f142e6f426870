"""DVC stage clip-tune: He et al. (ICLR 2023)'s classifier tuning of CLIP on the synthetic images.

A linear head on a frozen CLIP image encoder, initialised from the class names' text embeddings
(CLIP's zero-shot classifier), tuned on the synthetic images the clip-filter stage keeps (and,
with shots > 0, the K real images a class of the few-shot stage); both heads are scored on
eval-imagenet's test sets, and zero-shot CLIP on each transfer dataset's own classes
(profiles.*.clip_classifier; src/imagenet_sd/clip_tune/). CLIP's image features are
cached per shard, so a re-run or another recipe encodes nothing again. With `clip_tune: false` it
writes "skipped" without loading a model.
"""
import sys
from pathlib import Path

from imagenet_sd.clip_tune import stage
from imagenet_sd.core import slurm
from imagenet_sd.core.cli import run_stage, stage_parser


def main(params, args):
    if params.clip_tune and slurm.wanted(params, params.clip_classifier.device):
        sys.exit(slurm.submit(params, "clip-tune", one_gpu=True))
    details = stage.run(params, args.prompts, args.shards, args.kept, args.shots, args.metrics,
                                  args.details, args.plot)
    if details.get("skipped"):
        print(f"clip-tune: skipped ({details['skipped']})")
        return
    val = details["tuned"].get("val", {}).get("top1")
    print(f"clip-tune ({details['setting']}): {details['train_images']} synthetic + {details['real_images']} real "
          f"images, {details['training']['steps']} steps in {details['training']['seconds']} s"
          f"{'' if val is None else f', tuned IN val top-1 {val}'} -> {args.metrics}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--prompts", type=Path, default=Path("data/prompts/prompts.tsv"), help="class names")
    parser.add_argument("--shards", type=Path, default=Path("data/synthetic"), help="shards and index.json")
    parser.add_argument("--kept", type=Path, default=Path("data/filtered"), help="the clip-filter stage's kept set")
    parser.add_argument("--shots", type=Path, default=Path("data/fewshot/shots.tsv"), help="the few-shot stage's table")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/clip.json"))
    parser.add_argument("--details", type=Path, default=Path("reports/clip.json"))
    parser.add_argument("--plot", type=Path, default=Path("reports/clip.tsv"), help="per-epoch curve (TSV)")
    run_stage(main, parser)
