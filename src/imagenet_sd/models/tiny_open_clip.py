"""The embedded profile's OpenCLIP: a tiny OpenCLIP model with a ModifiedResNet image tower (RN50's kind,
He et al.'s CLIP filter's), random weights, for the `open_clip:` path of clip-filter and clip-tune.

An open_clip `CLIP` built from MODEL_CFG: a 64 px ModifiedResNet (its three-convolution stem, one
bottleneck a stage at widths 8 to 64, the attention pool projecting to 16-d) and a one-layer text
transformer over open_clip's own tokenizer (its 49,408-token vocabulary: the token table is 0.8M of the
1.1M weights, 4.5 MB), QuickGELU as OpenAI's RN50. Saved in open_clip's local-dir format: `open_clip_config.json`
(by open_clip's save_config_for_hf) and `open_clip_model.safetensors`, so
`open_clip.create_model_from_pretrained('local-dir:models/tiny-open-clip')` loads it exactly as it loads a
published model; params.yaml spells it `open_clip:local-dir:models/tiny-open-clip`. Its scores mean nothing.

Weights are drawn from a fixed seed: every build gives identical files.

Build: `python -m imagenet_sd.models.tiny_open_clip models/tiny-open-clip` (the embedded-assets stage runs
it; it does nothing when the folder already holds the current VERSION).
"""
from __future__ import annotations

import sys
from pathlib import Path

from imagenet_sd.models import embedded

VERSION = 1
MARKER = "tiny-open-clip.json"
DEFAULT_DIR = Path("models/tiny-open-clip")
SEED = 6                    # next to tiny_clip.SEED: a component of its own
IMAGE_SIZE = 64             # two 32x-downsampled positions a side for the attention pool
MODEL_CFG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
WEIGHTS = "open_clip_model.safetensors"     # open_clip's HF_SAFE_WEIGHTS_NAME, the name it looks for first


def assemble():
    """The open_clip CLIP (eval mode), random weights from SEED, its preprocessing set, not yet saved."""
    import torch
    from open_clip.model import CLIP, set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg
    torch.manual_seed(SEED)
    model = CLIP(**MODEL_CFG).eval()
    set_model_preprocess_cfg(model, {**vars(PreprocessCfg()), "size": IMAGE_SIZE})
    return model


def is_current(out_dir: Path) -> bool:
    return embedded.is_current(out_dir, MARKER, VERSION)


def _save(workdir: Path, folder: Path) -> None:
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file
    model = assemble()
    folder.mkdir(parents=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, folder / WEIGHTS)
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=MODEL_CFG)


def build(out_dir: Path) -> bool:
    """Build into `out_dir` unless it is there and current; True if built (embedded.build_folder:
    an interrupted build never looks complete)."""
    return embedded.build_folder(out_dir, _save, MARKER, VERSION)


def main(argv: list[str]) -> None:
    embedded.build_command(argv, DEFAULT_DIR, build, "tiny OpenCLIP", VERSION)


if __name__ == "__main__":
    main(sys.argv[1:])
