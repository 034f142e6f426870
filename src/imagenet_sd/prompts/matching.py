"""Class-matched backgrounds for prompt c_hc_bm: each class's top-k Places365 scenes.

The paper's c_hc_b gives every class every one of the 365 scenes, plausible or not
("goldfish inside a baseball stadium"); its Sec. 4.3 names matching class names to
scenes with a text encoder's features as future work. This is that, beyond the paper:
the places-backgrounds stage ranks, for each class, the 365 scenes by the cosine
similarity of their embeddings under the generator's OWN CLIP text encoder (the
`text_encoder` and `tokenizer` of `profiles.<profile>.generate.model`), and keeps the
best `background_top_k` (`backgrounds.write_matched` -> data/backgrounds/matched.tsv).

- Class text: "c, h_c" (all lemmas, then the hypernyms), i.e. the c_hc_bm prompt without
  " inside b": what the generator is told about the class, so the scenes are ranked against
  the same words that condition the image. The hypernym also picks the sense of an
  ambiguous name ("crane, wading bird" vs "crane, lifting device"), which the first lemma
  alone cannot. A class without a hypernym (free-form) uses c alone.
- Scene text: the scene's phrase ("baseball stadium").
- Embedding: the text encoder's pooled output, the final-layer-norm state at the first
  end-of-text token. It is the vector CLIP's contrastive training made summarise the
  whole text (up to the projection into the joint space, which SD checkpoints do not ship);
  a mean of the last hidden states would mix in earlier tokens, which under CLIP's causal
  attention see only a prefix of the text, plus padding. Texts longer than the encoder's
  limit are truncated there, as the generator truncates its prompts.
- Each text is encoded alone (a batch of one, no padding), in fp32 on the CPU: its
  embedding depends on the text and the weights only, not on which other classes are in
  the set, the batch or a GPU. SD v1.4's encoder does ~1,400 short texts (1,000 classes +
  365 scenes) in a minute or two on a few CPU cores.
- Similarity: cosine, in float64. Ranking: best first, ties broken by the lower scene
  index, so the result is deterministic.

The random-weights text encoder of the embedded profile gives a deterministic but
meaningless ranking: only SD v1.4's (the paper profile) can make "goldfish" prefer
"aquarium"; nothing here or in the tests claims that offline.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.params import Params
from imagenet_sd.models import rehearsal
from imagenet_sd.prompts import backgrounds, prompts
from imagenet_sd.prompts.prompts import MATCHED, ClassPrompt


@dataclass(frozen=True)
class Match:
    """Scene `scene` (index into the 365) is the `rank`-th best (from 1) for class `key`."""
    key: str
    name: str           # the class's first lemma, for a person reading matched.tsv
    rank: int
    scene: int
    phrase: str
    similarity: float

    def row(self) -> tuple[str, str, int, int, str, float]:
        return self.key, self.name, self.rank, self.scene, self.phrase, self.similarity


def class_text(row: ClassPrompt) -> str:
    """What a class is matched on: "c, h_c" (see the module doc), or c when it has no hypernym."""
    return f"{row.c}, {row.h_c}" if row.h_c else row.c


def embed(texts: list[str], tokenizer, encoder) -> np.ndarray:
    """The pooled output of each text (one a row, float64), each encoded alone (module doc)."""
    import torch
    vectors = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids
            vectors.append(encoder(input_ids=ids).pooler_output[0].double().numpy())
    return np.stack(vectors)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of `a` with every row of `b`."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def top_k(similarity: np.ndarray, k: int) -> np.ndarray:
    """Per row, the column indices of the k highest values, best first, ties by lower index."""
    columns = np.arange(similarity.shape[1])
    # lexsort sorts by its last key (-similarity: best first), then by the one before (the index).
    best = [np.lexsort((columns, -row))[:k] for row in similarity]
    return np.array(best, dtype=np.int64).reshape(len(similarity), k)


def rank(rows: list[ClassPrompt], phrases: list[str], k: int, tokenizer, encoder) -> list[Match]:
    """Each class's k best scenes under `encoder`, best first; classes in index order."""
    if not 1 <= k <= len(phrases):
        raise ValueError(f"k = {k} is not within 1..{len(phrases)}")
    ordered = sorted(rows, key=lambda r: r.index)
    classes = embed([class_text(r) for r in ordered], tokenizer, encoder)
    scenes = embed(phrases, tokenizer, encoder)
    similarity = cosine(classes, scenes)
    best = top_k(similarity, k)
    return [Match(key=r.key, name=r.c.split(",")[0].strip(), rank=j + 1, scene=int(s), phrase=phrases[s],
                  similarity=float(similarity[i, s]))
            for i, r in enumerate(ordered) for j, s in enumerate(best[i])]


def text_encoder(params: Params):
    """(tokenizer, text encoder) of the configured generator; a UserError if it has none."""
    from imagenet_sd.models import sd_model
    key = f"profiles.{params.profile}.generate.model"
    if rehearsal.is_rehearsal(params.generate.model):
        raise UserError(f"prompt = {MATCHED} ranks scenes with the generator's text encoder, and {key} = "
                        f"{params.generate.model!r} (the stand-in generator) has none; choose another prompt, "
                        f"or set {key} to a Stable Diffusion checkpoint")
    return sd_model.load_text_encoder(params.generate.model, key)


def match(params: Params, rows: list[ClassPrompt], phrases: list[str]) -> list[Match]:
    """The matched.tsv rows for `params`: each class's `background_top_k` scenes under the generator's encoder."""
    if not rows:
        raise UserError("the prompt table is empty; run the wordnet-prompts stage (dvc repro wordnet-prompts)")
    tokenizer, encoder = text_encoder(params)
    return rank(rows, phrases, params.background_top_k, tokenizer, encoder)


def write_table(params: Params, prompts_path: Path, phrases: list[str], path: Path) -> str:
    """matched.tsv: for prompt c_hc_bm each class's top-k scenes; for any other prompt the header
    alone, without loading a model (sd-generate depends on the file either way). Returns a log line."""
    if params.prompt != MATCHED:
        backgrounds.write_matched(path, [])
        return f"prompt = {params.prompt}: no matched scenes (header only) -> {path}"
    classes = prompts.read(prompts_path)
    backgrounds.write_matched(path, [m.row() for m in match(params, classes, phrases)])
    return (f"top {params.background_top_k} scenes of each of {len(classes)} classes under the text encoder of "
            f"{params.generate.model} -> {path}")
