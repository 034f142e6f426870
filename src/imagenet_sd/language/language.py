"""Language enhancement (LE), prompt `le`: a T5 writes each image's prompt from its class name,
after He et al., "Is synthetic data from generative models ready for image recognition?" (ICLR
2023).

Image i of class c gets sentence i mod N of c (N = `le_sentences_per_class`, 200 by default;
0: sentence i, one an image), or with `le_images_per_sentence` k > 0 sentence i // k, He et al.'s
10 consecutive images a sentence (ceil(images / k) sentences a class, so a scale-up keeps every
image's sentence), and its prompt is that sentence alone. The model's
input is the class's name as "<name> </s>" (`input_names`: with `le_class_names: clip`, the
default, the name clip-filter and clip-tune give it, `clip_class_names`; with `wordnet`, its first
WordNet lemma, `ClassPrompt.name`). Candidate j of
class c is a sample (top-k 50, temperature 1, 20 tokens) drawn with its own seed
`seeds.derive(seed, "le", class key, j)`: at decoder step t the token is the top-50 token
maximising logit + Gumbel noise (the Gumbel-max trick), the noise drawn on the CPU from that
seed alone, so candidate j does not depend on the batch, the device (up to float rounding) or a
resume. A class's sentences are its distinct, non-empty candidates in candidate order (first
occurrence wins, whitespace collapsed): a stream whose first n do not depend on n. Candidates
come in windows of WINDOW; a complete window adding fewer than MIN_NEW new sentences ends the
stream, and images beyond its m sentences reuse sentence i mod m (the class name when m = 0),
counted in index.json (`reused`, `short_classes`). A class's N sentences are the first N of its
stream, so N does not change the cache below, only which images share a sentence.

Files (the language-enhancement stage, `write`): `<out>/sentences.tsv` (class, image_index,
sentence; one row an image, class-major in logit order), `<out>/offsets.npy` (the byte offset of
every row and of the end, uint64), `<out>/index.json` (model, key, counts, reuse). sd-generate
reads image i's sentence through the offsets (`Sentences`), memory-mapped.

Cache: each class's stream is `generate.work_dir/language/<key>/<class digest>.json`, written
atomically under a lock when the class is done. The key (`recipe`) hashes the model's
fingerprint, the seed, SETTINGS, the library versions and `code_identity()`.

Docs (what He et al.'s code does, where this differs and why): docs/he2023.md#language-enhancement
"""
from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import importlib.util
import inspect
import json
import mmap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from imagenet_sd.core import seeds
from imagenet_sd.core.device import resolve
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import replacing, write_json
from imagenet_sd.core.locks import locked
from imagenet_sd.core.params import Params, writable_dir
from imagenet_sd.datasets.plan import counts_for
from imagenet_sd.models import hub, tiny_t5
from imagenet_sd.prompts import clip_texts
from imagenet_sd.prompts.prompts import SENTENCES, ClassPrompt

TOP_K = 50              # transformers' default top_k, which He et al.'s do_sample=True used
MAX_LENGTH = 20         # transformers' default max_length: the decoder's start token and 19 more
WINDOW = 1024           # candidates a window: a class's stream may only end at a window's end
MIN_NEW = WINDOW // 8   # a complete window adding fewer new sentences ends the stream
BATCH = 1024            # candidates a model call at most (speed only: candidates are seeded alone)
MIN_BATCH = 8           # candidates a call at least, so a class needing 2 more does not draw 2 at a time
SMALL_MODEL = 10_000_000   # parameters: below this a CPU samples on one thread (`_threads`)
CONFIG = "config.json"
LIBRARIES = ("torch", "transformers", "tokenizers", "sentencepiece", "protobuf")
TABLE, OFFSETS, INDEX = "sentences.tsv", "offsets.npy", "index.json"
COLUMNS = ("class", "image_index", "sentence")
SETTINGS = {"input": "{name} </s>", "top_k": TOP_K, "temperature": 1.0, "max_length": MAX_LENGTH,
            "window": WINDOW, "min_new": MIN_NEW, "seed_of_candidate": "derive(seed, 'le', class, j)"}
_RERUN = "run: dvc repro language-enhancement"


# --------------------------------------------------------------------------- one candidate

def model_input(name: str) -> str:
    """keytotext's input text: the words, then "</s>" (the tokenizer adds its own after it)."""
    return f"{name} </s>"


def clean(text: str) -> str:
    """Whitespace collapsed: a sentence is one TSV cell and one prompt."""
    return " ".join(text.split())


def gumbel(seed: int):
    """Candidate noise: one Gumbel(0, 1) value per decoder step and top-k rank, from `seed` alone."""
    uniform = torch.rand(MAX_LENGTH - 1, TOP_K, generator=torch.Generator().manual_seed(seed))
    return -torch.log(-torch.log(uniform))       # uniform 0 gives -inf: that rank is never drawn


class GumbelTopK:
    """A transformers logits processor that turns greedy decoding into top-k sampling with given noise.

    Row r's token at step t is the top-k token maximising logit + noise[r, t, rank]: a draw from
    the softmax over the top k (Gumbel-max), which greedy decoding then takes.
    """

    def __init__(self, noise):
        self.noise = noise          # (rows, MAX_LENGTH - 1, TOP_K), on the model's device

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - 1            # decoder tokens so far, the start token not counted
        values, tokens = scores.float().topk(min(TOP_K, scores.shape[-1]), dim=-1)
        pick = tokens.gather(1, (values + self.noise[:, step, :values.shape[1]]).argmax(1, keepdim=True))
        return torch.full_like(scores, float("-inf")).scatter_(1, pick, 0.0)


@contextlib.contextmanager
def _threads(net, device):
    """One torch thread for a small model on a CPU. Its calls are too small to gain from two, and
    threads spin-waiting for a core another process holds slow them down: the embedded tiny T5 drew
    499 sentences in 41 s on two busy cores with two threads, 5.9 s with one."""
    if device.type != "cpu" or net.num_parameters() >= SMALL_MODEL:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class T5:
    """A loaded T5ForConditionalGeneration and its tokenizer."""
    net: object
    tokenizer: object
    device: object

    def sample(self, name: str, seed: int, class_key: str, start: int, count: int) -> list[str]:
        """Candidates start .. start + count - 1 of the class (`clean` text; '' for an empty one)."""
        with _threads(self.net, self.device):
            return self._sample(name, seed, class_key, start, count)

    def _sample(self, name: str, seed: int, class_key: str, start: int, count: int) -> list[str]:
        from transformers import GenerationConfig, LogitsProcessorList
        ids = self.tokenizer(model_input(name), return_tensors="pt").input_ids.to(self.device).expand(count, -1)
        noise = torch.stack([gumbel(seeds.derive(seed, "le", class_key, j)) for j in range(start, start + count)])
        config = self.net.config
        # An explicit config: the checkpoint's own generation defaults (beams, lengths) must not apply.
        greedy = GenerationConfig(max_length=MAX_LENGTH, do_sample=False, num_beams=1,
                                  decoder_start_token_id=config.decoder_start_token_id,
                                  eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
        with torch.inference_mode():
            out = self.net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy,
                                    logits_processor=LogitsProcessorList([GumbelTopK(noise.to(self.device))]))
        return [clean(text) for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


# --------------------------------------------------------------------------- the model

def _incomplete(folder: Path, key: str, reason: str) -> UserError:
    return UserError(f"{key} = {str(folder)!r}: not a T5 model folder ({reason}); save a "
                     "T5ForConditionalGeneration and its tokenizer there with save_pretrained, or set "
                     f"{key} to a Hugging Face id such as mrm8488/t5-base-finetuned-common_gen")


EMBEDDED = (tiny_t5.DEFAULT_DIR, "tiny T5")


def _missing(model: str, key: str, reason: str) -> UserError:
    return hub.not_found(model, key, reason, embedded=EMBEDDED)


def locate(model: str, key: str) -> str:
    """hub.locate for a T5: a local folder with config.json, or a Hub id (the cache only when offline)."""
    return hub.locate(model, key, CONFIG, _incomplete, EMBEDDED)


def fingerprint(model: str, key: str) -> str:
    """The weights' identity (hub.fingerprint: the snapshot's commit, or a local folder's files)."""
    return hub.fingerprint(model, key, locate(model, key), CONFIG)


def load(model: str, key: str, device) -> T5:
    """T5ForConditionalGeneration (fp32: T5 overflows in fp16) and its tokenizer, from a folder or the cache."""
    from transformers import AutoConfig, AutoTokenizer, T5ForConditionalGeneration
    source = locate(model, key)
    options = {"local_files_only": True} if not Path(source).is_dir() and hub.offline() else {}
    try:
        kind = AutoConfig.from_pretrained(source, **options).model_type
        if kind != "t5":
            raise UserError(f"{key} = {model!r} is a {kind} model, not T5; language enhancement samples "
                            "sentences with T5ForConditionalGeneration (He et al.: mrm8488/t5-base-finetuned-common_gen)")
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        net = T5ForConditionalGeneration.from_pretrained(source, dtype="float32", **options)
    except (OSError, ValueError, ImportError) as exc:
        absent = [name for name in ("sentencepiece", "google.protobuf") if importlib.util.find_spec(name.split(".")[0])
                  is None]
        if absent:
            raise UserError(f"{key} = {model!r}: its tokenizer (spiece.model) needs the Python packages "
                            "sentencepiece and protobuf; install them: pip install -r requirements.txt") from None
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        if Path(source).is_dir():
            raise _incomplete(Path(source), key, reason) from None
        raise _missing(model, key, reason) from None
    return T5(net.eval().to(device), tokenizer, device)


# --------------------------------------------------------------------------- a class's stream

@dataclass
class Stream:
    """A class's distinct sentences in candidate order, and how far its candidates were drawn."""
    key: str                    # class key
    name: str                   # the model's input words
    candidates: int = 0         # candidates 0 .. candidates-1 are drawn
    exhausted: bool = False     # a complete window added fewer than MIN_NEW: no more sentences
    sentences: list[str] = field(default_factory=list)
    first: list[int] = field(default_factory=list)      # each sentence's candidate index

    def enough(self, need: int) -> bool:
        return self.exhausted or len(self.sentences) >= need

    def sentence(self, i: int) -> str:
        """Image i's sentence: the i-th distinct one, or once exhausted, sentence i mod m (module doc)."""
        if i < len(self.sentences):
            return self.sentences[i]
        if not self.exhausted:
            raise ValueError(f"class {self.key}: sentence {i} is not drawn yet")
        return self.sentences[i % len(self.sentences)] if self.sentences else self.name


def extend(stream: Stream, need: int, sample, batch_size: int = BATCH, on_new=lambda n: None) -> int:
    """Draw candidates until the stream has `need` sentences or is exhausted; return the candidates drawn.

    `sample(start, count)` returns candidates start .. start + count - 1. Calls never cross a
    window's end, so whether a window ends the stream is decided on the same candidates whatever
    `batch_size`; `on_new(n)` hears of the sentences added (up to `need`).
    """
    seen, drawn = set(stream.sentences), 0
    while not stream.enough(need):
        window_end = (stream.candidates // WINDOW + 1) * WINDOW
        count = min(batch_size, window_end - stream.candidates, max(MIN_BATCH, 2 * (need - len(stream.sentences))))
        before = len(stream.sentences)
        for j, text in enumerate(sample(stream.candidates, count), stream.candidates):
            if text and text not in seen:
                seen.add(text)
                stream.sentences.append(text)
                stream.first.append(j)
        stream.candidates += count
        drawn += count
        on_new(min(len(stream.sentences), need) - min(before, need))
        if stream.candidates == window_end:
            added = len(stream.sentences) - bisect.bisect_left(stream.first, window_end - WINDOW)
            stream.exhausted = added < MIN_NEW
    return drawn


# --------------------------------------------------------------------------- cache and key

def code_identity() -> str:
    """A hash of the source of what decides a candidate and the stream, not of the whole module."""
    functions = (model_input, clean, gumbel, GumbelTopK, T5._sample, extend, Stream.sentence)
    return hashlib.sha256("".join(inspect.getsource(f) for f in functions).encode()).hexdigest()[:16]


def recipe(params: Params, weights: str) -> dict:
    """What decides every class's stream: the cache folder's key (and part of sd-generate's work key)."""
    return {"model": params.generate.language_model, "weights": weights, "seed": params.seed,
            "settings": SETTINGS, "libraries": hub.library_versions(LIBRARIES), "code": code_identity()}


def key_of(recipe_: dict) -> str:
    return hashlib.sha256(json.dumps(recipe_, sort_keys=True).encode()).hexdigest()[:16]


def input_names(params: Params, ordered: list[ClassPrompt]) -> dict[str, str]:
    """Each class's input words by key: the name CLIP's texts give it (`le_class_names: clip`, with
    `clip_class_names` choosing which), or its first WordNet lemma (`wordnet`)."""
    if params.le_class_names == "wordnet":
        return {r.key: r.name for r in ordered}
    return dict(zip((r.key for r in ordered), clip_texts.names(ordered, params.clip_class_names)))


def stream_path(folder: Path, key: str, name: str) -> Path:
    """A class's file: named by its key and input words (any script, any length, one safe name), so
    a class keeps its stream whichever list gave it the same words."""
    digest = hashlib.sha256("\0".join((key, name)).encode()).hexdigest()[:16]
    return folder / f"{digest}.json"


def read_stream(path: Path, key: str, name: str) -> Stream:
    """The cached stream, or an empty one (none yet, or unreadable: it is drawn again)."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        stream = Stream(**json.loads(path.read_text()))
        if stream.key == key and stream.name == name and len(stream.first) == len(stream.sentences):
            return stream
    return Stream(key=key, name=name)


# --------------------------------------------------------------------------- the stage

class _Rows:
    """Rows appended to sentences.tsv, each one's byte offset stored in offsets.npy (memory-mapped)."""

    def __init__(self, file, offsets: np.ndarray):
        self.file, self.offsets, self.count = file, offsets, 0
        file.write(("\t".join(COLUMNS) + "\n").encode())

    def add(self, key: str, image_index: int, sentence: str) -> None:
        self.offsets[self.count] = self.file.tell()
        self.file.write(f"{key}\t{image_index}\t{sentence}\n".encode())
        self.count += 1

    def end(self) -> None:
        self.offsets[self.count] = self.file.tell()
        self.offsets.flush()


@contextlib.contextmanager
def _table(out_dir: Path, rows: int):
    """sentences.tsv and offsets.npy for `rows` rows, under temporary names until the block succeeds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with replacing(out_dir / TABLE) as table, replacing(out_dir / OFFSETS) as offsets, open(table, "wb") as file:
        written = _Rows(file, np.lib.format.open_memmap(offsets, mode="w+", dtype=np.uint64, shape=(rows + 1,)))
        yield written
        written.end()


class _LazyModel:
    """The T5, loaded at the first class that needs drawing: a run whose streams are all cached loads nothing."""

    def __init__(self, params: Params, key: str, model: T5 | None):
        self.params, self.key, self.model, self.seconds = params, key, model, 0.0

    def get(self) -> T5:
        if self.model is None:
            started, p = time.perf_counter(), self.params
            device = resolve(p.generate.device, f"profiles.{p.profile}.generate.device")
            self.model = load(p.generate.language_model, self.key, device)
            self.seconds = time.perf_counter() - started
        return self.model


def write(params: Params, rows: list[ClassPrompt], out_dir: Path, details_path: Path | None = None,
          batch_size: int = BATCH, model: T5 | None = None) -> str:
    """The stage: for prompt le, every image's sentence in `out_dir`; for any other prompt the header
    alone, without loading a model (sd-generate depends on the folder either way). Returns a log line.

    `model`: an already loaded T5 (tests); by default it is loaded when a class needs drawing.
    """
    (out_dir / INDEX).unlink(missing_ok=True)      # a failed run leaves no table that looks complete
    if params.prompt != SENTENCES:
        with _table(out_dir, 0):
            pass
        write_json(out_dir / INDEX, {"prompt": params.prompt})
        if details_path is not None:
            write_json(details_path, {"prompt": params.prompt, "sentences": 0})
        return f"prompt = {params.prompt}: no sentences (header only) -> {out_dir}"
    if not rows:
        raise UserError("the prompt table is empty; run the wordnet-prompts stage (dvc repro wordnet-prompts)")
    ordered = sorted(rows, key=lambda r: r.index)
    key = f"profiles.{params.profile}.generate.language_model"
    counts = counts_for(params, ordered)
    recipe_ = recipe(params, fingerprint(params.generate.language_model, key))
    folder = writable_dir(f"profiles.{params.profile}.generate.work_dir", params.generate.work_dir,
                          params.generate.work_dir / "language" / key_of(recipe_))
    with locked(folder / "recipe.json"):
        write_json(folder / "recipe.json", recipe_)
    lazy = _LazyModel(params, key, model)
    per_class, per_sentence = params.le_sentences_per_class, params.le_images_per_sentence
    with _table(out_dir, sum(counts.values())) as table:
        names = input_names(params, ordered)
        totals = _draw_and_write(params, ordered, names, counts, folder, lazy, table, batch_size)
    index = {"prompt": SENTENCES, "model": params.generate.language_model, "weights": recipe_["weights"],
             "key": key_of(recipe_), "seed": params.seed, "settings": SETTINGS,
             "classes": [r.key for r in ordered], "counts": {r.key: counts[r.key] for r in ordered},
             "sentences": sum(counts.values()), "reused": totals["reused"], "short_classes": totals["short"]}
    if per_class:                   # only then: a table of one sentence an image reads as it did
        index["sentences_per_class"] = per_class
    if per_sentence:
        index["images_per_sentence"] = per_sentence
    write_json(out_dir / INDEX, index)
    rate = round(totals["made"] / totals["seconds"], 1) if totals["made"] else None
    distinct = np.array(totals["distinct"], dtype=np.int64)
    details = {"sentences": index["sentences"], "sentences_per_class": per_class, "images_per_sentence": per_sentence,
               "class_names": (f"clip ({params.clip_class_names})" if params.le_class_names == "clip"
                               else "wordnet (first lemma)"),
               "names_other_than_first_lemma": {r.key: names[r.key] for r in ordered if names[r.key] != r.name},
               "distinct": int(distinct.sum()), "distinct_per_class_min": int(distinct.min()),
               "distinct_per_class_mean": round(float(distinct.mean()), 2), "distinct_per_class_max": int(distinct.max()),
               "images_per_sentence_max": max(-(-counts[r.key] // max(n, 1)) for r, n in zip(ordered, distinct.tolist())),
               "made": totals["made"], "candidates": totals["candidates"],
               "classes_drawn": totals["classes_drawn"], "reused": totals["reused"],
               "short_classes": len(totals["short"]), "draw_seconds": round(totals["seconds"], 3),
               "load_seconds": round(lazy.seconds, 3), "sentences_per_second": rate, "cache": str(folder)}
    if details_path is not None:
        write_json(details_path, details)
    return (f"{index['sentences']} sentences of {len(ordered)} classes ({totals['made']} drawn now from "
            f"{totals['candidates']} candidates, {rate} sentences/s; {totals['reused']} reused in "
            f"{len(totals['short'])} short classes) -> {out_dir}")


def _draw_and_write(params: Params, ordered: list[ClassPrompt], names: dict[str, str], counts: dict[str, int],
                    folder: Path, lazy: _LazyModel, table: _Rows, batch_size: int) -> dict:
    """Each class in logit order (`names`: its input words): extend its cached stream if it is short of
    the sentences it needs (its count, at most `le_sentences_per_class` when that is set, or its count /
    `le_images_per_sentence` rounded up), then write its rows: image i's sentence i mod that, or
    i // `le_images_per_sentence`."""
    per_class, per_sentence = params.le_sentences_per_class, params.le_images_per_sentence
    totals = {"made": 0, "candidates": 0, "classes_drawn": 0, "reused": 0, "short": {}, "seconds": 0.0,
              "distinct": []}
    needs = {key: -(-n // per_sentence) if per_sentence else min(n, per_class) if per_class else n
             for key, n in counts.items()}
    bar = tqdm(total=sum(needs.values()), unit="sentence", desc="language-enhancement", dynamic_ncols=True,
               smoothing=0.05)
    for row in ordered:
        need, name = needs[row.key], names[row.key]
        path = stream_path(folder, row.key, name)
        stream = read_stream(path, row.key, name)
        have = min(len(stream.sentences), need)
        if not stream.enough(need):
            with locked(path):
                stream = read_stream(path, row.key, name)   # another run may have drawn it meanwhile
                have = min(len(stream.sentences), need)
                if not stream.enough(need):
                    sample = functools.partial(lazy.get().sample, name, params.seed, row.key)
                    started = time.perf_counter()
                    totals["candidates"] += extend(stream, need, sample, batch_size, bar.update)
                    totals["seconds"] += time.perf_counter() - started
                    totals["classes_drawn"] += 1
                    write_json(path, asdict(stream))
        made = min(len(stream.sentences), need) - have
        totals["made"] += made
        bar.total -= need - made        # cached and reused sentences are no work: the rate is drawing's
        bar.refresh()
        for i in range(counts[row.key]):
            table.add(row.key, i, stream.sentence(i // per_sentence if per_sentence else i % need))
        if need > len(stream.sentences):
            totals["reused"] += need - len(stream.sentences)
            totals["short"][row.key] = len(stream.sentences)
        totals["distinct"].append(min(need, len(stream.sentences)) or 1)     # none drawn: the class name
    bar.close()
    return totals


# --------------------------------------------------------------------------- reading (sd-generate)

class Sentences:
    """Image i of class c's sentence from the published table, through its offsets, without loading it."""

    def __init__(self, folder: Path):
        index = self._index(folder)
        self.folder, self.key, self.model = folder, index["key"], index["model"]
        self.counts: dict[str, int] = index["counts"]
        self.per_class: int = index.get("sentences_per_class", 0)     # 0: one sentence an image
        self.per_sentence: int = index.get("images_per_sentence", 0)  # 0: not set
        starts = np.cumsum([0] + [self.counts[k] for k in index["classes"]])
        self.start = {k: int(s) for k, s in zip(index["classes"], starts)}
        self.offsets = np.load(folder / OFFSETS, mmap_mode="r")
        with open(folder / TABLE, "rb") as f:
            self.table = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(self.offsets) != int(starts[-1]) + 1 or int(self.offsets[-1]) != len(self.table):
            raise UserError(f"{folder}: {TABLE} and {OFFSETS} do not match each other; {_RERUN}")

    @staticmethod
    def _index(folder: Path) -> dict:
        try:
            index = json.loads((folder / INDEX).read_text())
        except (OSError, ValueError):
            raise UserError(f"{folder}: no sentence table (index.json), which prompt = {SENTENCES} needs; "
                            f"{_RERUN}") from None
        if index.get("prompt") != SENTENCES:
            raise UserError(f"{folder}: has no sentences (it was written for prompt = {index.get('prompt')!r}), "
                            f"which prompt = {SENTENCES} needs; {_RERUN}")
        return index

    def check(self, counts: dict[str, int]) -> None:
        """The table must hold exactly the images of the plan (classes, scale, held-out images)."""
        for key, n in counts.items():
            if self.counts.get(key) != n:
                raise UserError(f"{self.folder}: has {self.counts.get(key, 0)} sentences for class {key}, which "
                                f"has {n} images to make; it was made for other classes, scale or data.train; "
                                f"{_RERUN}")

    def text(self, row: ClassPrompt, image_index: int) -> str:
        j = self.start[row.key] + image_index
        line = self.table[int(self.offsets[j]):int(self.offsets[j + 1])].decode()
        key, index, sentence = line.rstrip("\n").split("\t", 2)
        if key != row.key or int(index) != image_index:
            raise UserError(f"{self.folder}: row {j} is ({key}, {index}), not ({row.key}, {image_index}); {_RERUN}")
        return sentence

    def close(self) -> None:
        self.table.close()
