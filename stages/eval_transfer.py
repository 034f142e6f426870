"""DVC stage eval-transfer: linear probes of the frozen ResNet-50 encoder on transfer datasets."""
import sys
from pathlib import Path

from imagenet_sd.core import slurm
from imagenet_sd.core.cli import run_stage, stage_parser
from imagenet_sd.evaluate import transfer


def main(params, args):
    if slurm.wanted(params, params.transfer.device):
        sys.exit(slurm.submit(params, "eval-transfer", one_gpu=True))
    transfer.run(params, args.model, args.metrics, args.plot, details_path=args.details)


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint from train-resnet50")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON metrics out")
    parser.add_argument("--plot", type=Path, required=True, help="TSV (dataset, top1) out")
    parser.add_argument("--details", type=Path, help="JSON of everything the metrics leave out (counts, settings)")
    run_stage(main, parser)
