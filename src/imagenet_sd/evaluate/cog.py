"""ImageNet-CoG's five levels, and ImageNet-1K, as transfer sets for eval-transfer.

ImageNet-CoG (Sariyildiz et al., "Concept Generalization in Visual Representation Learning",
ICCV 2021; github.com/naver/cog): five levels of 1,000 ImageNet-21K concepts each, none in
ImageNet-1K, L1 semantically closest to ImageNet-1K and L5 farthest. Its three parts, named by
`profiles.<profile>.transfer.cog`:

- `images`: the full ImageNet, one folder per concept: <images>/<wnid>/*.JPEG;
- `levels_file`: cog_levels_mapping_file.pkl, a pickled sequence of five lists of
  1,000 wnids, L1 first (a mapping is read in the order of its sorted keys);
- `splits_file`: cog_concepts_split_file.pkl, a pickled dict
  wnid -> {"train": [paths], "test": [paths]} (numpy arrays in the official file),
  paths relative to `images`, some with a leading '/'.

Level k is the transfer set `cog_lk`: its classes are the level's wnids sorted (label =
position) and its splits the official lists, which is how the authors' loader orders them.
`transfer.in1k: true` adds the transfer set `in1k`: a probe fitted on `data.train` (<wnid>/
class folders, which are its classes) and scored on `data.val` (either layout eval-imagenet
reads), val images of other classes left out (the protocol string says how many). The levels
are reported apart (`cog_average_top1`); neither they nor `in1k` count in `average_top1`. They
get eval-transfer's probe and eval-imagenet's preprocessing, not CoG's own protocol.

Docs (how to get the files, where this differs from CoG's protocol): docs/evaluation.md#imagenet-cog
"""
from __future__ import annotations

import pickle
from pathlib import Path

from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets.imagenet_scan import scan_val
from imagenet_sd.datasets.readers import image_files
from imagenet_sd.datasets.transfer_sets import COG_PREFIX, IN1K, Malformed, TransferSet, harmonise
from imagenet_sd.prompts import classes

LEVELS = 5
NAMES = tuple(f"{COG_PREFIX}l{k}" for k in range(1, LEVELS + 1))
APART = (*NAMES, IN1K)      # reported beside the transfer datasets, not in their average_top1
SPLITS = ("train", "test")
README = "docs/evaluation.md#imagenet-cog"     # where the manual says how to get the files


def read_pickle(key: str, path: Path) -> object:
    if not path.is_file():
        raise UserError(f"params.yaml: {key} = {str(path)!r}: no such file; download it as {README} says")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as exc:    # unpickling can raise almost anything on a wrong file
        raise UserError(f"params.yaml: {key} = {str(path)!r}: not a readable pickle file "
                        f"({type(exc).__name__}); download it again as {README} says") from None


def level_wnids(raw: object) -> list[list[str]]:
    """The five levels' concept lists from the levels file's content."""
    levels = [raw[k] for k in sorted(raw)] if isinstance(raw, dict) else raw
    if not isinstance(levels, (list, tuple)) or len(levels) != LEVELS:
        raise Malformed(f"expected a sequence of {LEVELS} concept lists (L1..L5), found {type(raw).__name__}"
                        + (f" of {len(levels)}" if isinstance(levels, (list, tuple)) else ""))
    wnids = []
    for k, level in enumerate(levels, 1):
        names = [str(w) for w in level] if not isinstance(level, (str, bytes)) else []
        if not names:
            raise Malformed(f"level {k} lists no concepts")
        wnids.append(names)
    return wnids


def level_set(k: int, wnids: list[str], concepts: dict, images: Path) -> TransferSet:
    """Level k (1-based) with the official train and test images of each of its concepts."""
    classes = sorted(wnids)
    parts = {}
    for split in SPLITS:
        samples = []
        for label, wnid in enumerate(classes):
            entry = concepts.get(wnid)
            if not isinstance(entry, dict) or split not in entry:
                raise Malformed(f"concept {wnid} of level {k} has no {split!r} list in the splits file")
            # The official file names some images '/n01234567/x.JPEG': relative all the same.
            files = sorted(str(f).lstrip("/\\") for f in entry[split])
            samples += [(images / f, label) for f in files]
        parts[split] = (classes, samples)
    return TransferSet(harmonise(parts), f"ImageNet-CoG L{k}: official train/test lists of its "
                                         f"{len(classes)} concepts", "top1")


def validate(params) -> dict[str, TransferSet]:
    """{cog_l1..cog_l5: TransferSet} when `transfer.cog` is configured, else {}; UserError if malformed."""
    cog = params.transfer.cog
    if cog is None:
        return {}
    key = f"profiles.{params.profile}.transfer.cog"
    if not cog.images.is_dir():
        raise UserError(f"params.yaml: {key}.images = {str(cog.images)!r}: no such folder; expected the full "
                        f"ImageNet with one folder per concept, <images>/<wnid>/*.JPEG ({README})")
    try:
        wnids = level_wnids(read_pickle(f"{key}.levels_file", cog.levels_file))
    except Malformed as exc:
        raise UserError(f"params.yaml: {key}.levels_file = {str(cog.levels_file)!r}: {exc}; "
                        f"expected cog_levels_mapping_file.pkl ({README})") from None
    concepts = read_pickle(f"{key}.splits_file", cog.splits_file)
    if not isinstance(concepts, dict):
        raise UserError(f"params.yaml: {key}.splits_file = {str(cog.splits_file)!r}: expected a dict of concept "
                        f"-> train/test lists, found {type(concepts).__name__}; expected "
                        f"cog_concepts_split_file.pkl ({README})")
    levels = {}
    for k, (name, level) in enumerate(zip(NAMES, wnids), 1):
        try:
            levels[name] = level_set(k, level, concepts, cog.images)
        except Malformed as exc:
            raise UserError(f"params.yaml: {key}: {exc}; check that levels_file, splits_file and images "
                            f"({str(cog.images)!r}) belong together ({README})") from None
    return levels


def in1k_set(params) -> TransferSet:
    """ImageNet-1K as CoG probes it: fitted on data.train, scored on data.val."""
    key = f"profiles.{params.profile}.data"
    if params.data.train is None or params.data.val is None:
        raise UserError(f"params.yaml: profiles.{params.profile}.transfer.in1k is true but {key}.train or "
                        f"{key}.val is ''; set both to ImageNet's folders, or set transfer.in1k: false")
    root = params.data.train
    folders = image_files(root) if root.is_dir() else {}
    wrong = next((name for name in folders if not classes.WNID.match(name)), None)
    if not folders or wrong:
        found = f"class folder {wrong!r} is not a wnid" if wrong else "no class folders with images"
        raise UserError(f"params.yaml: {key}.train = {str(root)!r}: {found}; expected ImageNet's train "
                        f"images as <root>/<wnid>/*.JPEG (transfer.in1k probes on them)")
    names = sorted(folders)
    label = {wnid: i for i, wnid in enumerate(names)}
    val = scan_val(params)
    test = [(p, label[wnid]) for wnid, paths in sorted(val.items()) if wnid in label for p in paths]
    left_out = sum(len(paths) for wnid, paths in val.items() if wnid not in label)
    parts = {"train": (names, [(p, label[w]) for w, paths in folders.items() for p in paths]),
             "test": (names, test)}
    try:
        splits = harmonise(parts)
    except Malformed as exc:
        raise UserError(f"params.yaml: {key}.train / {key}.val: {exc}; transfer.in1k needs val images of "
                        f"the train classes") from None
    return TransferSet(splits, f"ImageNet-1K as in CoG: data.train ({len(names)} classes) / data.val"
                               f"{f' ({left_out} images of other classes left out)' if left_out else ''}", "top1")


def validate_all(params) -> dict[str, TransferSet]:
    """The CoG levels (if transfer.cog is set) and in1k (if transfer.in1k), read and checked."""
    sets = validate(params)
    if params.transfer.in1k:
        sets[IN1K] = in1k_set(params)
    return sets
