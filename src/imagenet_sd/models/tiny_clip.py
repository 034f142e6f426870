"""The embedded profile's CLIP for the clip-filter stage: a tiny transformers CLIPModel with random weights.

It is the safety checker's tiny CLIP (`embedded.clip_config`: 32 px images in 8 px
patches, two vision layers, one text layer, 32-d embeddings) given the embedded
byte-level tokenizer's vocabulary, saved with that tokenizer and the same 32 px
CLIPImageProcessor, so `CLIPModel`, `CLIPTokenizer` and `CLIPImageProcessor.from_pretrained`
load it exactly as they load openai/clip-vit-base-patch32. It scores images in the
same code path as a real CLIP; its scores mean nothing.

Weights are drawn from a fixed seed: every build gives identical files.

Build: `python -m imagenet_sd.models.tiny_clip models/tiny-clip` (the embedded-assets stage runs
it; it does nothing when the folder already holds the current VERSION).
"""
from __future__ import annotations

import sys
from pathlib import Path

from imagenet_sd.models import embedded

VERSION = 1
MARKER = "tiny-clip.json"
DEFAULT_DIR = Path("models/tiny-clip")
SEED = 5                    # next to embedded.SEEDS: a component of its own


def assemble(workdir: Path):
    """(CLIPModel, tokenizer, image processor), random weights from SEED, not yet saved."""
    import torch
    from transformers import CLIPModel
    tokenizer = embedded._tokenizer(workdir)
    config = embedded.clip_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    return CLIPModel(config).eval(), tokenizer, embedded._feature_extractor()


def is_current(out_dir: Path) -> bool:
    return embedded.is_current(out_dir, MARKER, VERSION)


def _save(workdir: Path, folder: Path) -> None:
    model, tokenizer, processor = assemble(workdir)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)


def build(out_dir: Path) -> bool:
    """Build into `out_dir` unless it is there and current; True if built (embedded.build_folder:
    an interrupted build never looks complete)."""
    return embedded.build_folder(out_dir, _save, MARKER, VERSION)


def main(argv: list[str]) -> None:
    embedded.build_command(argv, DEFAULT_DIR, build, "tiny CLIP", VERSION)


if __name__ == "__main__":
    main(sys.argv[1:])
