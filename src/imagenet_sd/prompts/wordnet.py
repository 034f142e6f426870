"""WordNet 3.0 through NLTK: install it once, then look classes up.

NLTK only reads corpora found under one of its data paths. Setup puts WordNet in
`<venv>/nltk_data/corpora/wordnet`, which NLTK searches by default, from one of:
1. Debian's `wordnet-base` + `wordnet-sense-index` packages (/usr/share/wordnet).
   They lack the `lexnames` file NLTK's reader needs; that fixed list of the 45
   lexicographer files is kept in `data/wordnet/lexnames` (from lexnames(5WN)).
2. `nltk.download('wordnet')` where Debian's files are not there.

Run `python -m imagenet_sd.prompts.wordnet install` (setup does).
"""
from __future__ import annotations

import shutil
import sys
from functools import cache
from pathlib import Path

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.paths import DATA

DEBIAN_WORDNET = Path("/usr/share/wordnet")
LEXNAMES = DATA / "wordnet" / "lexnames"
# The database files NLTK's WordNetCorpusReader opens.
DATABASE_FILES = [f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")] + \
    [f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")] + ["index.sense", "cntlist.rev"]


def venv_data_dir() -> Path:
    return Path(sys.prefix) / "nltk_data"


@cache
def reader():
    """The NLTK WordNet reader, or a UserError saying how to install WordNet."""
    import warnings

    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    from nltk.corpus.util import LazyCorpusLoader

    class Reader(WordNetCorpusReader):
        # NLTK's reader maps the loaded WordNet onto WordNet 3.0 for its multilingual (OMW) data on every
        # load, and compares the version ("3.0") with the corpus name ("wordnet") to skip it, so it always
        # reads index.sense twice: 4 of the 7 s a load takes here. Nothing here reads OMW data, which is
        # all that map serves.
        def map_wn(self, version="wordnet"):
            return None

    # NLTK's own loader (it finds the corpus folder or zip on NLTK's data path), without its OMW reader.
    wordnet = LazyCorpusLoader("wordnet", Reader, None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # "multilingual functions are not available": none are used
            wordnet.ensure_loaded()
    except LookupError:
        raise UserError("WordNet 3.0 is not installed for NLTK; run scripts/setup.sh "
                        "(or: python -m imagenet_sd.prompts.wordnet install)") from None
    if wordnet.get_version() != "3.0":
        raise UserError(f"NLTK found WordNet {wordnet.get_version()}, ImageNet ids need 3.0; "
                        "remove it and run: python -m imagenet_sd.prompts.wordnet install")
    return wordnet


def synset(wnid: str):
    """The noun synset of an ImageNet-style id such as n02086910."""
    import warnings
    found = None
    if len(wnid) == 9 and wnid[0] == "n" and wnid[1:].isdigit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # NLTK warns before returning None; we raise instead
            found = reader().synset_from_pos_and_offset("n", int(wnid[1:]))
    if found is None:
        raise UserError(f"{wnid}: not a WordNet 3.0 noun id; check the class list")
    return found


def _copy_debian(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in DATABASE_FILES:
        shutil.copyfile(DEBIAN_WORDNET / name, target / name)
    shutil.copyfile(LEXNAMES, target / "lexnames")


def install() -> str:
    """Make WordNet 3.0 loadable by NLTK; return how. Idempotent."""
    target = venv_data_dir() / "corpora" / "wordnet"
    try:
        reader()
        return "WordNet 3.0 already available to NLTK"
    except UserError:
        reader.cache_clear()
    if all((DEBIAN_WORDNET / name).is_file() for name in DATABASE_FILES):
        _copy_debian(target)
        how = f"copied Debian's WordNet from {DEBIAN_WORDNET} to {target}"
    else:
        import nltk
        if not nltk.download("wordnet", download_dir=str(venv_data_dir()), quiet=True, raise_on_error=False):
            raise UserError("could not install WordNet 3.0: Debian's wordnet-base and wordnet-sense-index "
                            "are not installed and nltk.download('wordnet') failed (no network?); "
                            "install either, then run setup again")
        how = f"downloaded WordNet with nltk.download into {venv_data_dir()}"
    reader.cache_clear()
    reader()
    return how


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m imagenet_sd.prompts.wordnet install")
    try:
        print(install())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
