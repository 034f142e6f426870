"""DVC stage eval-imagenet: the trained ResNet-50 on real ImageNet test sets (val, v2, sketch, R, A)."""
import sys
from pathlib import Path

from imagenet_sd.core import slurm
from imagenet_sd.core.cli import run_stage, stage_parser
from imagenet_sd.evaluate import evaluation


def main(params, args):
    if slurm.wanted(params, params.evaluate.device):
        sys.exit(slurm.submit(params, "eval-imagenet", one_gpu=True))
    evaluation.run(params, args.model, args.metrics, args.plot, args.details)


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint from train-resnet50")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON metrics out")
    parser.add_argument("--plot", type=Path, required=True, help="TSV (test_set, top1, top5) out")
    parser.add_argument("--details", type=Path, help="JSON of everything the metrics leave out (counts, settings)")
    run_stage(main, parser)
