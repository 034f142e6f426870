"""The embedded profile's language model for prompt `le`: a tiny T5 with random weights.

It is a transformers `T5ForConditionalGeneration` (T5 v1.0's layout: relu feed-forward, tied
embeddings, decoder starting at <pad>), two layers each side, 32-d, saved as the real
checkpoint of the paper profile (mrm8488/t5-base-finetuned-common_gen) is: `config.json`, the
weights, and the tokenizer as a SentencePiece model `spiece.model` with no `tokenizer.json`. So
`AutoTokenizer` and `T5ForConditionalGeneration.from_pretrained` load it through the very code
that loads the real one (SentencePiece -> tokenizers conversion, 100 sentinel tokens added).

The SentencePiece model is written, not trained: a unigram model whose pieces are the printable
ASCII characters and "▁" + each lower-case letter (a word start), with fixed scores, so every
build is the same bytes and nothing is downloaded. Its sentences are strings of random
characters: they exercise language enhancement's path (sampling, dedup, files), not its meaning.

Build: `python -m imagenet_sd.models.tiny_t5 models/tiny-t5` (the embedded-assets stage runs it; it
does nothing when the folder already holds the current VERSION).
"""
from __future__ import annotations

import string
import sys
from pathlib import Path

from imagenet_sd.models import embedded

VERSION = 1
MARKER = "tiny-t5.json"
DEFAULT_DIR = Path("models/tiny-t5")
SEED = 6                    # next to embedded.SEEDS and tiny_clip.SEED: a component of its own
SPECIALS = ("<pad>", "</s>", "<unk>")    # ids 0, 1, 2, as in T5's own vocabulary


def pieces() -> list[tuple[str, float]]:
    """(piece, log-probability score) in id order after the specials; a word start outscores a lone "▁"."""
    starts = [("▁" + c, -3.0) for c in string.ascii_lowercase]
    chars = [(c, -4.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return [("▁", -2.0)] + starts + chars


def sentencepiece_model() -> bytes:
    """A serialized SentencePiece unigram ModelProto of `pieces()` (no normalisation rule table)."""
    from transformers.convert_slow_tokenizer import import_protobuf
    proto = import_protobuf().ModelProto()
    normal, unknown, control = 1, 2, 3          # SentencePiece's piece types
    for piece, kind in zip(SPECIALS, (control, control, unknown)):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, 0.0, kind
    for piece, score in pieces():
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, normal
    proto.trainer_spec.model_type = 1           # unigram, T5's
    proto.trainer_spec.pad_id, proto.trainer_spec.eos_id, proto.trainer_spec.unk_id = 0, 1, 2
    proto.trainer_spec.bos_id = -1              # T5 has none
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    return proto.SerializeToString()


def load_tokenizer(workdir: Path):
    """The tokenizer of `sentencepiece_model()`, through AutoTokenizer as a real T5's loads (files in workdir)."""
    import json

    from transformers import AutoTokenizer
    source = workdir / "t5-tokenizer-source"
    source.mkdir()
    (source / "spiece.model").write_bytes(sentencepiece_model())
    (source / "config.json").write_text(json.dumps({"model_type": "t5"}))
    return AutoTokenizer.from_pretrained(source)


def assemble(workdir: Path):
    """(T5ForConditionalGeneration, tokenizer) with random weights from SEED, not yet saved."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    tokenizer = load_tokenizer(workdir)
    config = T5Config(vocab_size=len(tokenizer), d_model=embedded.TEXT_HIDDEN, d_kv=8,
                      d_ff=2 * embedded.TEXT_HIDDEN, num_layers=2, num_decoder_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                      feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    torch.manual_seed(SEED)
    return T5ForConditionalGeneration(config).eval(), tokenizer


def _save(workdir: Path, folder: Path) -> None:
    model, _ = assemble(workdir)
    model.save_pretrained(folder, safe_serialization=True)
    # The tokenizer as the real checkpoint ships it: the SentencePiece model alone.
    (folder / "spiece.model").write_bytes(sentencepiece_model())


def is_current(out_dir: Path) -> bool:
    return embedded.is_current(out_dir, MARKER, VERSION)


def build(out_dir: Path) -> bool:
    """Build into `out_dir` unless it is there and current; True if built (embedded.build_folder:
    an interrupted build never looks complete)."""
    return embedded.build_folder(out_dir, _save, MARKER, VERSION)


def main(argv: list[str]) -> None:
    embedded.build_command(argv, DEFAULT_DIR, build, "tiny T5", VERSION)


if __name__ == "__main__":
    main(sys.argv[1:])
