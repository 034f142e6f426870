"""CLIP for the clip-filter and clip-tune stages, through either of two libraries (backends), and its
text embeddings, class directions and zero-shot scores.

- transformers (CLIPModel, CLIPTokenizer, CLIPImageProcessor): a local folder or a Hugging Face id,
  `openai/clip-vit-base-patch32`; found, fingerprinted and loaded here;
- OpenCLIP (open_clip_torch), spelled `open_clip:...`: `open_clip:RN50-quickgelu/openai`, OpenAI's RN50
  (He et al.'s), which no transformers format has; models/open_clip_model.py.

Only `backend`, `locate`, `weights`, `load`, `library_versions`, `backend_key` and `backbone` look at
which one `model` names. A loaded `Clip` is one interface to both, and all the stages use of it:

| what | read as | OpenCLIP (open_clip_model) |
|---|---|---|
| image features | `model.vision_model(pixel_values=...).pooler_output`, then `model.visual_projection` | `encode_image`; the projection the identity |
| text features | `tokenizer(texts, ...)`, `model.text_model(input_ids=..., ...).pooler_output`, then `model.text_projection` | its tokenizer, `encode_text`; the identity |
| preprocessing | `processor(images=..., return_tensors="pt")["pixel_values"]`, `.size`, `.crop_size`, `.to_json_string()` | its inference transform |
| logit scale | `model.logit_scale` (its log) | the same |

Spelled as transformers spells them because the functions that read them (text_features, score_batch,
class_directions here; clip-tune's ImageTower, Preprocess, encode_shards; datasets/shard_images.py) key
every user's caches by their source (tests/test_code_identity.py): OpenCLIP gets that surface, not a
second copy of that code, and a transformers model's keys and numbers are the ones they were."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imagenet_sd.core.errors import UserError
from imagenet_sd.models import hub, open_clip_model, tiny_clip

CONFIG = "config.json"          # what a transformers model folder (or Hub snapshot) always has
LIBRARIES = ("torch", "transformers", "pillow", "numpy")      # a transformers model's (OpenCLIP's: its module's)
TRANSFORMERS = "transformers"
TEXT_BATCH = 256


EMBEDDED = (tiny_clip.DEFAULT_DIR, "tiny CLIP")


def _missing(model: str, key: str, reason: str) -> UserError:
    return hub.not_found(model, key, reason, embedded=EMBEDDED)


def _incomplete(folder: Path, key: str, reason: str) -> UserError:
    return UserError(f"{key} = {str(folder)!r}: not a CLIP model folder ({reason}); save a CLIPModel, its "
                     f"tokenizer and image processor there with save_pretrained, or set {key} to a "
                     "Hugging Face id such as openai/clip-vit-base-patch32")


def backend(model: str) -> str:
    """The library `model` loads through: open_clip for an `open_clip:` spelling, else transformers."""
    return open_clip_model.BACKEND if open_clip_model.spelled(model) else TRANSFORMERS


def locate(model: str, key: str) -> str:
    """Where the model is, checked before any work: for transformers hub.locate (a local folder with
    config.json, or a Hub id, the cache only when offline); for OpenCLIP open_clip_model.locate."""
    if open_clip_model.spelled(model):
        return open_clip_model.locate(model, key).model_name
    return hub.locate(model, key, CONFIG, _incomplete, EMBEDDED)


def weights(model: str, key: str) -> str:
    """The weights' fingerprint (hub.fingerprint: snapshot commit, or a local folder's files; OpenCLIP's
    open_clip_model.weights: its folder's files, or the Hub repository and commit its weights came from)."""
    if open_clip_model.spelled(model):
        return open_clip_model.weights(model, key)
    return hub.fingerprint(model, key, locate(model, key), CONFIG)


def backbone(model: str, fingerprint: str) -> dict:
    """What the stages' details say of the CLIP they ran: the model, its backend, its weights' fingerprint."""
    return {"model": model, "backend": backend(model), "weights": fingerprint}


@dataclass
class Clip:
    """A loaded CLIP of either backend, read through the surface of the module doc's table."""
    model: object           # transformers CLIPModel, or open_clip_model.Model
    tokenizer: object       # CLIPTokenizer, or open_clip_model.Tokenizer
    processor: object       # CLIPImageProcessor, or open_clip_model.Processor


def load(model: str, key: str, device: torch.device) -> Clip:
    """CLIPModel, tokenizer and image processor from a local folder or the Hugging Face cache; an
    `open_clip:` model by open_clip's own loading (open_clip_model.load)."""
    if open_clip_model.spelled(model):
        return Clip(*open_clip_model.load(model, key, device))
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


def library_versions(model: str) -> dict[str, str]:
    """The versions of the libraries that make `model`'s numbers (part of the stages' cache keys)."""
    return hub.library_versions(open_clip_model.LIBRARIES if open_clip_model.spelled(model) else LIBRARIES)


def backend_key(model: str) -> dict:
    """What a cache key adds for `model`'s backend: nothing for transformers (its keys predate OpenCLIP
    and stay as they were); for OpenCLIP its name and the source of open_clip_model's surface."""
    if open_clip_model.spelled(model):
        return {"backend": open_clip_model.BACKEND, "backend_code": open_clip_model.code_identity()}
    return {}


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
