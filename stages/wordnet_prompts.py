"""DVC stage wordnet-prompts: class set + WordNet -> one prompt per class (Table 1 variants)."""
from pathlib import Path

from imagenet_sd.core.cli import run_stage, stage_parser
from imagenet_sd.core.params import require_file
from imagenet_sd.prompts import classes, prompts


def main(params, args):
    if params.classes == "custom":
        require_file("custom_classes", params.custom_classes)
    specs = classes.load_class_set(params.classes, params.custom_classes)
    rows = prompts.build(specs, params.prompt)
    prompts.write(args.out, rows)
    print(f"{len(rows)} classes, prompt {params.prompt!r} -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True)
    run_stage(main, parser)
