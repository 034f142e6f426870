"""DVC stage sd-generate: class prompts -> Stable Diffusion images in tar shards, plus a sample grid.

`--dry-run` prints images, shards, disk and GPU-hours and stops; it needs neither
a GPU, the weights, the real train folder nor the internet (a login node will do), and says
what it could not check. With `processes > 1` the stage runs
itself again under torchrun, one process per GPU; with `launcher: slurm` it submits itself
as a Slurm job and waits for it (core/slurm.py), and its dry run also prints the job. `--verify` re-reads every
finished shard's bytes against its sha256 instead of trusting size and mtime.
"""
import sys
from pathlib import Path

from imagenet_sd.core import distributed, slurm
from imagenet_sd.core.cli import run_stage, stage_parser
from imagenet_sd.datasets import fewshot, shards
from imagenet_sd.generate import estimates, generation, samples
from imagenet_sd.language import language
from imagenet_sd.prompts import backgrounds, prompts


def main(params, args):
    rows = prompts.read(args.prompts)
    phrases = backgrounds.read_phrases(args.backgrounds)
    # c_hc_bm: b among each class's matched scenes (the places-backgrounds stage's table); else all 365.
    matched = (backgrounds.read_matched(args.matched, [r.key for r in rows], params.background_top_k, phrases)
               if params.prompt == prompts.MATCHED else None)
    # Real guidance: each image starts from one of its class's K real images (the few-shot stage's table).
    shots = fewshot.load(args.shots, [r.key for r in rows], params.shots) if params.init_strength else None
    # Language enhancement: which of its class's sentences prompts image i, language/language.py's module doc says.
    sentences = language.Sentences(args.sentences) if params.prompt == prompts.SENTENCES else None
    if args.dry_run:
        plan = generation.make_plan(params, rows, phrases, estimate=True, matched=matched, shots=shots,
                                    sentences=sentences)
        print("\n".join(estimates.describe(params, plan)), file=sys.stderr)
        if params.launcher == "slurm":
            print("\n".join(slurm.describe(params, "sd-generate", [a for a in sys.argv if a != "--dry-run"])),
                  file=sys.stderr)
        return
    plan = generation.make_plan(params, rows, phrases, matched=matched, shots=shots, sentences=sentences)
    if not distributed.under_torchrun():
        # Checked once, before any worker starts or any output is touched.
        generation.check(params, plan)
        finished = shards.finished_in(plan.folder)
        print("\n".join(estimates.describe(params, plan, finished)), file=sys.stderr)
        # Nothing left to draw (a re-run, a scale-down): publish here, without starting workers.
        left = generation.unfinished(plan, finished)
        if slurm.wanted(params) and left:
            sys.exit(slurm.submit(params, "sd-generate", generation.watch(plan, left, params.slurm.tasks)))
        if params.generate.processes > 1 and left:
            sys.exit(distributed.relaunch(params.generate.processes))
    metrics = generation.generate(params, plan, args.out, args.metrics, verify=args.verify, details_path=args.details)
    if metrics is None:
        return          # not the main rank
    samples.sample_grid(args.out, rows, args.grid)
    rate = f" at {metrics['images_per_second']} img/s" if metrics["generated"] else ""
    print(f"{metrics['images']} images of {metrics['classes']} classes in {metrics['shards']} shards -> {args.out} "
          f"({metrics['generated']} made{rate}, {metrics['reused']} reused); sample grid -> {args.grid}")
    copies = metrics["memorisation"]
    print(f"memorisation: skipped, {copies['skipped']}" if "skipped" in copies else
          f"memorisation: {copies['memorised_share']}% of {copies['generated_checked']:,} generated images are nearer "
          f"to a real train image than {100 - copies['percentile']}% of the {copies['real_images']:,} train images "
          f"are to their nearest neighbour (docs/digits.md#memorisation)")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--prompts", type=Path, default=Path("data/prompts/prompts.tsv"))
    parser.add_argument("--backgrounds", type=Path, default=Path("data/backgrounds/backgrounds.tsv"))
    parser.add_argument("--matched", type=Path, default=Path("data/backgrounds/matched.tsv"),
                        help="each class's matched scenes, read for prompt c_hc_bm only")
    parser.add_argument("--shots", type=Path, default=Path("data/fewshot/shots.tsv"),
                        help="each class's K real images, read for init_strength > 0 only")
    parser.add_argument("--sentences", type=Path, default=Path("data/prompts/sentences"),
                        help="each image's sentence (language enhancement), read for prompt le only")
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"), help="folder for the shards and index.json")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/generate.json"))
    parser.add_argument("--details", type=Path, help="JSON of everything the metrics leave out (counts, settings)")
    parser.add_argument("--grid", type=Path, default=Path("reports/samples.png"), help="PNG of sample images per class")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and estimates, generate nothing")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every finished shard (slow at scale) instead of trusting its manifest")
    run_stage(main, parser)
