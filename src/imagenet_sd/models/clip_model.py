"""CLIP through transformers (CLIPModel, CLIPTokenizer, CLIPImageProcessor): finding, fingerprinting
and loading it, and its text embeddings, class directions and zero-shot scores, for the clip-filter
and clip-tune stages. Why transformers and not open_clip: docs/he2023.md#clip-filtering."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imagenet_sd.core.errors import UserError
from imagenet_sd.models import hub, tiny_clip

CONFIG = "config.json"          # what a transformers model folder (or Hub snapshot) always has
LIBRARIES = ("torch", "transformers", "pillow", "numpy")
TEXT_BATCH = 256


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


# --------------------------------------------------------------------------- texts and scores
# text_features, score_batch and class_directions key clip-filter's score cache by their source
# (filter/clip_filter.py's code_identity): an edit to one re-scores every user's images.

def _autocast(device: torch.device):
    # fp16 on a GPU: ViT-B/32 in fp16 runs at tensor-core speed; CPUs have no fast fp16 kernels.
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


@torch.inference_mode()
def text_features(clip: Clip, texts: list[str], device: torch.device) -> torch.Tensor:
    """Unit-length projected text embeddings, one row a text, float32."""
    rows = []
    for start in range(0, len(texts), TEXT_BATCH):
        tokens = clip.tokenizer(texts[start:start + TEXT_BATCH], padding=True, truncation=True,
                                max_length=clip.tokenizer.model_max_length, return_tensors="pt").to(device)
        with _autocast(device):
            pooled = clip.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
            rows.append(clip.model.text_projection(pooled).float())
    return F.normalize(torch.cat(rows), dim=-1)


@torch.inference_mode()
def score_batch(clip: Clip, pixels: torch.Tensor, texts: torch.Tensor,
                labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(probability of the own class, CLIP's top-1 class) of each image: softmax over all classes
    of logit_scale x cosine similarity, as CLIP's zero-shot classifier (and He et al.) compute it."""
    with _autocast(texts.device):
        pooled = clip.model.vision_model(pixel_values=pixels.to(texts.device)).pooler_output
        image = F.normalize(clip.model.visual_projection(pooled).float(), dim=-1)
    probability = (clip.model.logit_scale.exp().float() * image @ texts.T).softmax(dim=-1)
    own = probability.gather(1, labels.to(texts.device)[:, None])[:, 0]
    return own.cpu().numpy().astype(np.float32), probability.argmax(dim=-1).cpu().numpy().astype(np.int32)


def class_directions(clip: Clip, names: list[str], templates: tuple[str, ...],
                     device: torch.device) -> torch.Tensor:
    """One unit row a class: the mean of its templates' unit text embeddings, made unit again
    (CLIP's prompt ensembling, He et al.'s zero-shot classifier; one template: its embedding).
    float32, on the CPU."""
    texts = [template.format(name) for name in names for template in templates]
    embedded = text_features(clip, texts, device).reshape(len(names), len(templates), -1)
    return F.normalize(embedded.mean(dim=1), dim=-1).cpu()
