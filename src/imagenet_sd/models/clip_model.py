"""CLIP through transformers (CLIPModel, CLIPTokenizer, CLIPImageProcessor): finding, fingerprinting
and loading it, for the clip-filter and clip-tune stages. Why transformers and not open_clip:
docs/he2023.md#clip-filtering."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from imagenet_sd.core.errors import UserError
from imagenet_sd.models import hub, tiny_clip

CONFIG = "config.json"          # what a transformers model folder (or Hub snapshot) always has
LIBRARIES = ("torch", "transformers", "pillow", "numpy")


EMBEDDED = (tiny_clip.DEFAULT_DIR, "tiny CLIP")


def _missing(model: str, key: str, reason: str) -> UserError:
    return hub.not_found(model, key, reason, embedded=EMBEDDED)


def _incomplete(folder: Path, key: str, reason: str) -> UserError:
    return UserError(f"{key} = {str(folder)!r}: not a CLIP model folder ({reason}); save a CLIPModel, its "
                     f"tokenizer and image processor there with save_pretrained, or set {key} to a "
                     "Hugging Face id such as openai/clip-vit-base-patch32")


def locate(model: str, key: str) -> str:
    """hub.locate for a CLIP model: a local folder with config.json, or a Hub id (the cache only when offline)."""
    return hub.locate(model, key, CONFIG, _incomplete, EMBEDDED)


def weights(model: str, key: str) -> str:
    """The weights' fingerprint (hub.fingerprint: snapshot commit, or a local folder's files)."""
    return hub.fingerprint(model, key, locate(model, key), CONFIG)


@dataclass
class Clip:
    model: object           # transformers CLIPModel
    tokenizer: object
    processor: object       # CLIPImageProcessor


def load(model: str, key: str, device: torch.device) -> Clip:
    """CLIPModel, tokenizer and image processor from a local folder or the Hugging Face cache."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
    source = locate(model, key)
    if (Path(source) / tiny_clip.MARKER).is_file():
        # Said, not hidden: the embedded CLIP has random weights, so its scores and choices are chance.
        print(f"note: {key} = {model!r} is the embedded tiny CLIP, random weights that have seen no image: "
              "its scores are chance-level and say nothing about the images (a real CLIP: docs/he2023.md)",
              file=sys.stderr)
    options = {"local_files_only": True} if not Path(source).is_dir() and hub.offline() else {}
    try:
        net = CLIPModel.from_pretrained(source, **options)
        tokenizer = CLIPTokenizer.from_pretrained(source, **options)
        processor = CLIPImageProcessor.from_pretrained(source, **options)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        if Path(source).is_dir():
            raise UserError(f"{key} = {model!r}: not a complete CLIP model folder ({reason}); it needs a CLIPModel, "
                            "its tokenizer and its image processor, each saved with save_pretrained") from None
        raise _missing(model, key, reason) from None
    return Clip(net.float().eval().to(device), tokenizer, processor)


def precision(device: torch.device) -> str:
    return "fp16" if device.type == "cuda" else "fp32"


def library_versions() -> dict[str, str]:
    return hub.library_versions(LIBRARIES)
