"""DVC stage train-resnet50: ResNet-50 from scratch on the synthetic shards (or, with source: real, on the real train folder).

With train.processes > 1 the stage runs itself again under torchrun (DDP); with `launcher: slurm`
it submits itself as a Slurm job of DDP tasks and waits for it (core/slurm.py). `--kept`: the
clip-filter stage's output; the synthetic images it leaves out are not trained on.
"""
import sys
from pathlib import Path

from imagenet_sd.core import distributed, slurm
from imagenet_sd.core.cli import run_stage, stage_parser
from imagenet_sd.core.errors import UserError
from imagenet_sd.train import training


def main(params, args):
    if slurm.wanted(params):
        training.prepare(params, args.prompts, args.shards, args.kept)     # one-line errors before submitting
        if params.train.batch_size % params.slurm.tasks:
            raise UserError(f"params.yaml: profiles.{params.profile}.train.batch_size = {params.train.batch_size} "
                            f"is split over the job's {params.slurm.tasks} tasks (slurm.nodes x gpus_per_node); "
                            "use a multiple of it")
        sys.exit(slurm.submit(params, "train-resnet50"))
    if params.train.processes > 1 and not distributed.under_torchrun():
        training.prepare(params, args.prompts, args.shards, args.kept)     # one-line errors before any worker starts
        sys.exit(distributed.relaunch(params.train.processes))
    metrics = training.run(params, args.prompts, args.shards, args.out, args.metrics, args.dvclive, args.details,
                           kept_dir=args.kept)
    if metrics is None:
        return          # not the main rank
    held = f", held-out top-1 {metrics['holdout_top1']}%" if "holdout_top1" in metrics else ""
    print(f"{metrics['epochs']} epochs, final loss {metrics['loss']}, train top-1 {metrics['train_top1']}%{held}, "
          f"{metrics['images_per_second']} img/s, {metrics['seconds']} s -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--prompts", type=Path, required=True, help="prompt table (class order = logit order)")
    parser.add_argument("--shards", type=Path, required=True, help="folder of synthetic tar shards")
    parser.add_argument("--kept", type=Path, help="the clip-filter stage's kept set (default: every image)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--details", type=Path, help="JSON of everything the metrics leave out (counts, settings)")
    parser.add_argument("--dvclive", type=Path, required=True, help="folder of the per-epoch DVCLive log to write")
    run_stage(main, parser)
