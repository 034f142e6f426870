"""Prompts of the paper's Table 1, built from WordNet.

For a class c (a WordNet synset):
- `c`   = the synset's lemmas, comma separated, underscores as spaces
          ("pirate, pirate ship");
- `h_c` = the direct hypernyms (instance hypernyms included), each written as its
          first lemma, comma separated in alphabetical order ("toy spaniel"; 38 of
          the 1000 ImageNet classes have two, e.g. accordion: "free-reed instrument,
          keyboard instrument");
- `d_c` = the synset's definition.

Variants (param `prompt`): c -> "c", c_hc -> "c, h_c", c_dc -> "c, d_c",
c_hc_b -> "c, h_c inside b" where b is a Places365 scene chosen per image by
`backgrounds.scene_for`; c_hc_bm -> the same text, with b chosen only among the
class's `background_top_k` scenes closest to it under the generator's own text
encoder (`matching`; beyond the paper: its Sec. 4.3 future work). The table holds
the same rows for c_hc_b and c_hc_bm: which scenes fill "{b}" is decided at
generation (`plan.prompt_for`).
le -> "s", a sentence a T5 wrote from the class name, a different one for every image
(language enhancement, He et al., ICLR 2023; module `language`): the table's prompt is "{s}",
and image i's sentence is row i of the class in data/prompts/sentences (`plan.prompt_for`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.io import read_tsv, write_tsv
from imagenet_sd.prompts.classes import ClassSpec

TEMPLATES = {
    "c": "{c}",
    "c_hc": "{c}, {h_c}",
    "c_dc": "{c}, {d_c}",
    "c_hc_b": "{c}, {h_c} inside {b}",
    "c_hc_bm": "{c}, {h_c} inside {b}",
    "le": "{s}",
}
MATCHED = "c_hc_bm"     # the variant whose b comes from the class's matched scenes (data/backgrounds/matched.tsv)
BACKGROUND_SLOT = "{b}"
SENTENCES = "le"        # the variant whose text is a sentence per image (language enhancement)
SENTENCE_SLOT = "{s}"
COLUMNS = ["wnid", "index", "c", "h_c", "d_c", "prompt"]


@dataclass(frozen=True)
class ClassPrompt:
    wnid: str           # '' for a free-form class
    index: int
    c: str
    h_c: str
    d_c: str
    prompt: str         # the prompt, with "{b}" where the background goes

    @property
    def key(self) -> str:
        return self.wnid or self.c

    @property
    def name(self) -> str:
        """The class's first lemma: "pirate" of "pirate, pirate ship"."""
        return self.c.split(",")[0].strip()

    def text(self, background: str | None = None, sentence: str | None = None) -> str:
        """The prompt given to the generator for one image."""
        text = self.prompt
        for slot, value in ((BACKGROUND_SLOT, background), (SENTENCE_SLOT, sentence)):
            if slot in text:
                if value is None:
                    raise ValueError(f"prompt of {self.key} needs a value for {slot}: {self.prompt!r}")
                text = text.replace(slot, value)
        return text


def _lemma_text(lemma_name: str) -> str:
    return lemma_name.replace("_", " ")


def wordnet_fields(wnid: str) -> tuple[str, str, str]:
    """(c, h_c, d_c) of a WordNet noun id."""
    from imagenet_sd.prompts.wordnet import synset
    s = synset(wnid)
    c = ", ".join(_lemma_text(name) for name in s.lemma_names())
    parents = s.hypernyms() + s.instance_hypernyms()
    # NLTK does not keep a fixed order of several hypernyms: sort them so prompts are stable.
    h_c = ", ".join(sorted(_lemma_text(p.lemma_names()[0]) for p in parents))
    return c, h_c, s.definition()


def class_prompt(spec: ClassSpec, variant: str) -> ClassPrompt:
    if spec.wnid:
        c, h_c, d_c = wordnet_fields(spec.wnid)
    else:
        c, h_c, d_c = spec.name, spec.hypernym or "", spec.description
    if "{h_c}" in TEMPLATES[variant] and not h_c:
        raise UserError(f"class {spec.key!r} has no hypernym, which prompt = {variant!r} needs; "
                        "add a third column (hypernym) to the custom class file or choose prompt c or c_dc")
    prompt = TEMPLATES[variant].format(c=c, h_c=h_c, d_c=d_c, b=BACKGROUND_SLOT, s=SENTENCE_SLOT)
    return ClassPrompt(wnid=spec.wnid or "", index=spec.index, c=c, h_c=h_c, d_c=d_c, prompt=prompt)


def build(specs: list[ClassSpec], variant: str) -> list[ClassPrompt]:
    if variant not in TEMPLATES:
        raise UserError(f"params.yaml: prompt = {variant!r} is not valid; allowed: {' | '.join(TEMPLATES)}")
    return [class_prompt(spec, variant) for spec in specs]


def write(path: Path, rows: list[ClassPrompt]) -> None:
    write_tsv(path, COLUMNS, [[r.wnid, r.index, r.c, r.h_c, r.d_c, r.prompt] for r in rows])


def read(path: Path) -> list[ClassPrompt]:
    if not path.is_file():
        raise UserError(f"{path}: prompt table not found; run: dvc repro wordnet-prompts")
    return [ClassPrompt(wnid=r["wnid"], index=int(r["index"]), c=r["c"], h_c=r["h_c"], d_c=r["d_c"],
                        prompt=r["prompt"]) for r in read_tsv(path)]
