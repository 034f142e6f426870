"""CLIP through OpenCLIP (open_clip_torch), the library of He et al.'s RN50: the `open_clip:` spelling of
`filter.model` and `clip_classifier.model`, finding and fingerprinting such a model, and loading it with
open_clip's own API into the surface models/clip_model.py's keyed functions read (its module doc).

Spellings (everything after `open_clip:` is what open_clip's create_model_from_pretrained takes):

- `open_clip:ARCH/TAG`: a built-in architecture and its pretrained tag, e.g. `open_clip:RN50-quickgelu/openai`
  (OpenAI's RN50, He et al.'s); the weights come from the Hugging Face cache as open_clip fetches them;
- `open_clip:local-dir:FOLDER`: open_clip's own local-dir schema, a folder with `open_clip_config.json` and
  its weights (the embedded tiny OpenCLIP: `open_clip:local-dir:models/tiny-open-clip`);
- `open_clip:hf-hub:ORG/REPO`: open_clip's own hf-hub schema, a Hub repository in that format.

The library is imported only here, inside functions: a transformers model never loads it (4 s).
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imagenet_sd.core.errors import UserError
from imagenet_sd.models import hub, tiny_open_clip

PREFIX = "open_clip:"
LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"         # open_clip's own schemas (open_clip.factory.parse_model_name)
CONFIG = "open_clip_config.json"                   # what an OpenCLIP folder or Hub repository always has
# The libraries whose versions key the caches of an OpenCLIP model: open_clip's transforms are torchvision's,
# its tokenizer cleans text with ftfy and splits it with regex.
LIBRARIES = ("torch", "torchvision", "open_clip_torch", "timm", "ftfy", "regex", "pillow", "numpy")
BACKEND = "open_clip"
SPELLINGS = (f"{PREFIX}ARCH/TAG (e.g. {PREFIX}RN50-quickgelu/openai), {PREFIX}{LOCAL_DIR}FOLDER "
             f"or {PREFIX}{HF_HUB}ORG/REPO")
EMBEDDED = f"{PREFIX}{LOCAL_DIR}{tiny_open_clip.DEFAULT_DIR}"


def spelled(model: str) -> bool:
    """Whether `model` names an OpenCLIP model (else a transformers one)."""
    return model.startswith(PREFIX)


@dataclass(frozen=True)
class Name:
    """An `open_clip:` value, as open_clip's create_model_from_pretrained takes it."""
    model_name: str                 # an architecture (RN50-quickgelu), or `local-dir:FOLDER` / `hf-hub:ORG/REPO`
    pretrained: str | None = None   # the architecture's tag (openai); None with a schema
    folder: Path | None = None      # local-dir: the folder
    repo: str | None = None         # hf-hub: the repository


def _bad(model: str, key: str, reason: str) -> UserError:
    return UserError(f"{key} = {model!r}: {reason}; write {SPELLINGS}")


def parse(model: str, key: str) -> Name:
    """The spelling read, without importing open_clip; UserError (one line) for one that names nothing."""
    rest = model[len(PREFIX):]
    if rest.startswith(LOCAL_DIR):
        if not rest[len(LOCAL_DIR):]:
            raise _bad(model, key, "no folder after local-dir:")
        folder = hub.local_path(rest[len(LOCAL_DIR):])
        return Name(f"{LOCAL_DIR}{folder}", folder=folder)
    if rest.startswith(HF_HUB):
        repo = rest[len(HF_HUB):]
        if not hub.looks_like_hub_id(repo):
            raise _bad(model, key, f"{repo!r} is not a Hugging Face id (ORG/REPO)")
        return Name(rest, repo=repo)
    arch, _, tag = rest.partition("/")
    if rest and hub.local_path(rest).is_dir():
        raise UserError(f"{key} = {model!r}: an OpenCLIP folder is spelled with open_clip's local-dir schema: "
                        f"{PREFIX}{LOCAL_DIR}{rest}")
    if not arch or not tag or "/" in tag or ":" in rest:
        hint = " (OpenCLIP spells OpenAI's ViT-B/32 ViT-B-32)" if rest.count("/") > 1 else ""
        raise _bad(model, key, f"not an architecture and its pretrained tag{hint}")
    return Name(arch, pretrained=tag)


def _check_pretrained(name: Name, model: str, key: str) -> dict:
    """The pretrained config of an ARCH/TAG spelling (open_clip's); UserError for an unknown one, or for
    weights whose activation (QuickGELU or GELU) is not the architecture's, which open_clip only warns of."""
    from open_clip import factory, pretrained
    arch, tag = name.model_name, name.pretrained
    known = factory.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"{key} = {model!r}: {arch!r} is not an OpenCLIP architecture{hint}; "
                        "python -c 'import open_clip; print(open_clip.list_pretrained())' lists them with their tags")
    if not pretrained.is_pretrained_cfg(arch, tag):
        tags = ", ".join(pretrained.list_pretrained_tags_by_model(arch)) or "none"
        raise UserError(f"{key} = {model!r}: {arch} has no pretrained tag {tag!r}; its tags: {tags}")
    cfg = pretrained.get_pretrained_cfg(arch, tag)
    trained, built = cfg.get("quick_gelu", False), factory.get_model_config(arch).get("quick_gelu", False)
    if trained != built:
        base = arch.removesuffix("-quickgelu")
        fix = f"{base}-quickgelu" if trained else base
        raise UserError(f"{key} = {model!r}: the {tag} weights were trained with {'QuickGELU' if trained else 'GELU'} "
                        f"and {arch} is built with {'QuickGELU' if built else 'GELU'}; write {PREFIX}{fix}/{tag}")
    return cfg


def _pretrained_file(name: Name, model: str, key: str) -> tuple[str, str]:
    """(Hub repository, cached weights file) of an ARCH/TAG spelling, found as open_clip finds it: its tag's
    `hf_hub` repository, the .safetensors before the .bin; only the cache when offline (HF_HUB_OFFLINE)."""
    from open_clip import pretrained
    cfg = _check_pretrained(name, model, key)
    repo, filename = os.path.split(cfg.get("hf_hub", ""))
    fetch = f"python -c \"import open_clip; open_clip.create_model('{name.model_name}', pretrained='{name.pretrained}')\""
    if repo and hub.offline():
        from huggingface_hub import try_to_load_from_cache
        filename = filename or pretrained.HF_WEIGHTS_NAME
        for candidate in (*pretrained._get_safe_alternatives(filename), filename):
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str):
                return repo, found
        raise UserError(f"{key} = {model!r}: its weights ({repo}) are not in the Hugging Face cache, and "
                        f"HF_HUB_OFFLINE is set; fetch them once online: {fetch}")
    try:
        return repo, pretrained.download_pretrained(cfg)
    except Exception as exc:  # noqa: BLE001  (huggingface_hub and urllib raise many kinds for "not there")
        raise UserError(f"{key} = {model!r}: its weights could not be fetched ({hub.short_reason(exc)}); "
                        f"fetch them once online: {fetch}") from None


def _folder(name: Name, model: str, key: str) -> Path:
    folder = name.folder
    if not folder.is_dir():
        built = "; the embedded tiny OpenCLIP is built by: dvc repro embedded-assets" if model == EMBEDDED else ""
        raise UserError(f"{key} = {model!r}: no such folder {str(folder.resolve())!r}{built}")
    if not (folder / CONFIG).is_file():
        raise UserError(f"{key} = {model!r}: not an OpenCLIP model folder (no {CONFIG}); save the model there "
                        f"as open_clip saves one (its {CONFIG} and weights), or write {SPELLINGS}")
    return folder


def _hub_config(name: Name, model: str, key: str) -> str:
    """The hf-hub repository's open_clip_config.json (fetched online, from the cache offline)."""
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(name.repo, CONFIG, local_files_only=hub.offline())
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{key} = {model!r}: {name.repo}'s {CONFIG} is not in the Hugging Face cache "
                        f"({hub.short_reason(exc)}); download it (hf download {name.repo}) or write another "
                        "OpenCLIP model") from None


def locate(model: str, key: str) -> Name:
    """The model's Name, once its files are known to be there (the cache only when offline): a cheap
    check the stages run before any work, so a wrong or missing model is one line."""
    name = parse(model, key)
    if name.folder is not None:
        _folder(name, model, key)
    elif name.repo is not None:
        _hub_config(name, model, key)
    else:
        _pretrained_file(name, model, key)
    return name


def weights(model: str, key: str) -> str:
    """What identifies the weights (clip_model.weights): a folder's files (hub.fingerprint), or the
    Hub repository and snapshot commit its weights were read from."""
    name = parse(model, key)
    if name.folder is not None:
        return hub.fingerprint(model, key, str(_folder(name, model, key)), CONFIG)
    if name.repo is not None:
        return f"{name.repo}@{Path(_hub_config(name, model, key)).parent.name}"
    repo, file = _pretrained_file(name, model, key)
    if repo and "snapshots" in Path(file).parts:
        return f"{repo}@{Path(file).parent.name}"
    return _file_digest(Path(file))        # a tag without a Hub repository: open_clip's download folder


def _file_digest(path: Path) -> str:
    """sha256 of a weights file's name, size and first and last MiB (as hub.fingerprint reads a folder's)."""
    digest, size = hashlib.sha256(f"{path.name}\0{path.stat().st_size}\0".encode()), path.stat().st_size
    with open(path, "rb") as f:
        digest.update(f.read(hub.MIB))
        f.seek(max(0, size - hub.MIB))
        digest.update(f.read(hub.MIB))
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- the surface the keyed code reads
# clip_model's text_features and score_batch, and clip-tune's ImageTower, Preprocess and ShardImages, read a
# CLIP as transformers' CLIPModel, CLIPTokenizer and CLIPImageProcessor; their source keys every user's
# caches, so an OpenCLIP model is given that surface rather than the code another. code_identity() hashes
# these classes and `load`: an OpenCLIP model's cache keys change with them.

@dataclass
class Output:
    pooler_output: torch.Tensor     # a tower's embedding, already projected


class Projected(nn.Identity):
    """The identity: an OpenCLIP tower ends in its projection (a ResNet's attention pool projects).
    `out_features`: the embedding's width, which clip-tune's feature cache reads."""

    def __init__(self, width: int):
        super().__init__()
        self.in_features = self.out_features = width


class ImageSide(nn.Module):
    """open_clip's encode_image, called as CLIPModel's vision_model (pixel_values=...)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.visual = net.visual            # its weights, for what counts them (probes.threads_for)
        self.encode = net.encode_image

    def forward(self, pixel_values: torch.Tensor) -> Output:
        return Output(self.encode(pixel_values))


class Model(nn.Module):
    """An OpenCLIP model with CLIPModel's vision_model, visual_projection, text_model, text_projection
    and logit_scale: the embeddings are open_clip's encode_image and encode_text, unnormalised."""

    def __init__(self, net: nn.Module, width: int):
        super().__init__()
        self.net = net
        self.vision_model = ImageSide(net)
        self.visual_projection = Projected(width)
        self.text_projection = Projected(width)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.net.logit_scale

    def text_model(self, input_ids: torch.Tensor, attention_mask=None) -> Output:
        # Its text tower is causal and pools at the end-of-text token: padding after it changes nothing.
        return Output(self.net.encode_text(input_ids))


@dataclass
class Tokens:
    input_ids: torch.Tensor
    attention_mask: None = None     # OpenCLIP's text tower reads no mask

    def to(self, device) -> Tokens:
        return Tokens(self.input_ids.to(device))


class Tokenizer:
    """open_clip's tokenizer, called as CLIPTokenizer: every text padded (or cut, its end-of-text
    token kept) to the model's context length, as open_clip tokenizes."""

    def __init__(self, tokenize):
        self.tokenize = tokenize
        self.model_max_length = tokenize.context_length

    def __call__(self, texts: list[str], **_options) -> Tokens:
        return Tokens(self.tokenize(texts))


class Processor:
    """open_clip's inference transform (resize, centre crop, normalise, as its preprocess_cfg says),
    called as CLIPImageProcessor: `size` and `crop_size` tell ShardImages the input side for its JPEG
    draft, `to_json_string` the configuration that keys clip-tune's features."""

    def __init__(self, transform, config: dict):
        self.transform, self.config = transform, dict(config)
        size = config["size"]
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shortest = config.get("resize_mode") == "shortest" and height == width
        self.size = {"shortest_edge": height} if shortest else {"height": height, "width": width}
        self.crop_size = {"height": height, "width": width}

    def __call__(self, images, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        images = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": torch.stack([self.transform(image) for image in images])}

    def to_json_string(self) -> str:
        return json.dumps({"open_clip_preprocess": self.config}, sort_keys=True)


def load(model: str, key: str, device: torch.device) -> tuple[Model, Tokenizer, Processor]:
    """(model, tokenizer, processor) by open_clip's create_model_from_pretrained and get_tokenizer."""
    name = locate(model, key)
    import open_clip
    if name.folder is not None and (name.folder / tiny_open_clip.MARKER).is_file():
        # Said, not hidden: the embedded OpenCLIP has random weights, so its scores and choices are chance.
        print(f"note: {key} = {model!r} is the embedded tiny OpenCLIP, random weights that have seen no image: "
              "its scores are chance-level and say nothing about the images (a real CLIP: docs/he2023.md)",
              file=sys.stderr)
    try:
        net, transform = open_clip.create_model_from_pretrained(name.model_name, pretrained=name.pretrained)
        tokenize = open_clip.get_tokenizer(name.model_name)
        width = open_clip.get_model_config(name.model_name)["embed_dim"]
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"{key} = {model!r}: OpenCLIP could not load it ({hub.short_reason(exc)})") from None
    net = net.float().eval()
    return Model(net, width).eval().to(device), Tokenizer(tokenize), Processor(transform, net.visual.preprocess_cfg)


def code_identity() -> str:
    """The code here that decides an OpenCLIP model's features and scores (it keys their caches)."""
    parts = (Output, Projected, ImageSide, Model, Tokens, Tokenizer, Processor, load)
    return hashlib.sha256("".join(inspect.getsource(p) for p in parts).encode()).hexdigest()[:16]
