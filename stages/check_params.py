"""DVC stage check-params: every key of params.yaml validated whenever the file changes.

Its params are the whole file, so a change no other stage tracks (the profile's `launcher` and
`slurm` block, speed settings, another profile's block) still runs project code: `dvc exp run -S
profiles.paper.launcher=kubernetes` on an up-to-date pipeline fails here in one line instead of
recording an experiment with a value nothing checked. It reads params.yaml and writes nothing.
"""
from imagenet_sd.core.cli import run_stage, stage_parser
from imagenet_sd.core.params import check_every_profile


def main(params, args):
    names = check_every_profile(args.params)
    print(f"params.yaml: valid (profile {params.profile}; the blocks of {', '.join(names)} checked too)")


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__))
