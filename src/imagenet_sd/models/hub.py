"""Finding a Hugging Face model: a local folder or the Hub cache, offline mode, and a fingerprint
of the weights for cache keys. Every model family (Stable Diffusion, CLIP, T5) loads through here."""
from __future__ import annotations

import contextlib
import hashlib
import os
from importlib import metadata
from pathlib import Path

from imagenet_sd.core.errors import UserError


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `names` ("absent" when not installed), for cache keys: a new
    library release may change the bytes a model produces."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


TRUE = ("1", "true", "yes", "on")
MIB = 1 << 20


def offline() -> bool:
    # Read the environment at call time as well: huggingface_hub reads it once, at import.
    from huggingface_hub import constants
    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE


_why_offline = ["HF_HUB_OFFLINE is set"]      # what an offline miss says; cache_only() says its own


@contextlib.contextmanager
def cache_only():
    """Inside, `offline()` is true: models are read from local folders and the Hub's cache, never the
    network. A dry run (a login node, often without internet) says what it could not find at once,
    where the Hub's client would retry for a minute or more."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    _why_offline.append("a dry run reads local folders and the cache only")
    try:
        yield
    finally:
        _why_offline.pop()
        if before is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def looks_like_hub_id(model: str) -> bool:
    """`org/name` as the Hub spells ids: exactly one slash, no leading dot or `~` (spelling only; see path_reason)."""
    parts = model.split("/")
    return (len(parts) == 2 and all(parts) and not model.startswith((".", "~"))
            and all(c.isalnum() or c in "-_." for part in parts for c in part))


def path_reason(model: str) -> str | None:
    """Why `model` is read as a local path and never looked up on the Hub, or None where it may be a Hub id.

    A path: it starts with `/`, `./`, `../` or `~`, has more than one `/`, or its first component is a
    local folder (`models/tiny-sd` where `models/` exists): such a value that names no folder is a
    typo or an unbuilt model, and the Hub would only be retried for half a minute before saying so.
    """
    start = next((p for p in ("/", "./", "../", "~") if model.startswith(p)), None)
    if start is not None:
        return f"it starts with {start!r}"
    parts = model.split("/")
    if len(parts) > 2:
        return "it has more than one '/'"
    if len(parts) == 2 and parts[0] and local_path(parts[0]).is_dir():
        return f"{parts[0]!r} is a local folder"
    return None


def short_reason(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def not_found(model: str, key: str, reason: str, embedded: tuple[Path, str] | None = None,
              local: bool = False) -> UserError:
    """`embedded`: (folder, name) of the embedded component `model` may be, named in the hint when it is.
    `local`: `model` was only looked for as a local folder (not a Hugging Face id), so the message
    neither names the Hub's cache nor suggests downloading it."""
    from huggingface_hub.constants import HF_HUB_CACHE

    from imagenet_sd.models.embedded import DEFAULT_DIR
    hint = ""
    if Path(model) == DEFAULT_DIR:
        hint = f"; the embedded default is built by: python -m imagenet_sd.models.embedded {DEFAULT_DIR}"
    elif embedded is not None and Path(model) == embedded[0]:
        hint = f"; the embedded {embedded[1]} is built by: dvc repro embedded-assets"
    folder = str(local_path(model).resolve())
    if local:
        return UserError(f"{key} = {model!r}: model not found ({reason}); no folder {folder!r}; set {key} to an "
                         f"existing model folder or to a Hugging Face id (org/name){hint}")
    return UserError(
        f"{key} = {model!r}: model not found ({reason}); looked for the local folder "
        f"{folder!r} and in the Hugging Face cache {HF_HUB_CACHE!r}; "
        f"download it into the cache (hf download {model}) or set {key} to a local folder{hint}")


def local_path(model: str) -> Path:
    """`model` read as a local folder: `~` and `$VARS` expand, as in every path param."""
    return Path(os.path.expandvars(model)).expanduser()


def locate(model: str, key: str, marker: str, incomplete, embedded: tuple[Path, str] | None = None) -> str:
    """Where the model's files are read from: a local folder, or the id for the HF cache.

    A cheap check (config files only) that the launcher runs before starting any
    worker, so a missing model is one line, not one traceback per process.
    `marker`: the file every folder of this kind of model has (a pipeline's model_index.json;
    config.json for a transformers model); `incomplete(folder, key, reason)`: the error for a
    local folder without it (sd_model.not_a_pipeline, for example); `embedded`: (folder, name) of
    the embedded component this kind of model has, which is never looked up on the Hub (its
    folder, "models/tiny-t5", also reads as a Hub id) and whose error says how to build it.
    """
    local = local_path(model)
    if local.is_dir():
        if not (local / marker).is_file():
            raise incomplete(local, key, f"no {marker}")
        return str(local)
    if embedded is not None and Path(model) == embedded[0]:
        raise not_found(model, key, "no such folder", embedded, local=True)
    # A value that reads as a path fails here, at once: the Hub would be retried for half a minute.
    reason = path_reason(model)
    if reason is not None:
        raise not_found(model, key, f"no such folder; read as a path, not a Hugging Face id, as {reason}", embedded,
                        local=True)
    if not looks_like_hub_id(model):
        raise not_found(model, key, "no such folder, and not a Hugging Face id", embedded, local=True)
    if offline():
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(model, marker), str):
            raise not_found(model, key, f"not in the cache, and {_why_offline[-1]}", embedded)
    return model


def fingerprint(model: str, key: str, source: str, marker: str) -> str:
    """What identifies the weights, so that finished images are never mixed across models.

    A Hugging Face id: the commit of its snapshot in the cache (fetching `marker`,
    model_index.json for a pipeline, first when online). A local folder: sha256 over every file's
    name and size, of configs in full and of weights' first and last MiB, which
    tells retrained weights apart without reading gigabytes on every run.
    `source`: where `locate` found it.
    """
    if not Path(source).is_dir():
        from huggingface_hub import hf_hub_download
        try:
            index = hf_hub_download(source, marker, local_files_only=offline())
        except Exception as exc:  # noqa: BLE001  (huggingface_hub raises many kinds for "not there")
            raise not_found(model, key, short_reason(exc)) from None
        return f"{source}@{Path(index).parent.name}"
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(source).rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(source)}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= 2 * MIB or path.suffix == ".json":
                digest.update(f.read())
            else:
                digest.update(f.read(MIB))
                f.seek(-MIB, os.SEEK_END)
                digest.update(f.read(MIB))
    return digest.hexdigest()[:16]
