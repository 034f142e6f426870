"""The paper's experiments as data: which params make each table row and figure point.

One source for "row 5 of Table 1 is prompt c_hc_b at guidance 7.5": the queue command
(module queue) turns these settings into `dvc exp run --queue -n <name> -S ...`, and the report
(imagenet_sd.report) finds each row's runs by the same params, whatever they were named.

Groups: `table1` (rows 1-12 and 15-17; rows 13-14 are reference models every eval-imagenet
run scores), `table2` (its rows trained here are Table 1's rows 1, 12, 15, 16, 17; rows 1, 4
and 5 are eval-transfer's baselines), `scaling` (Fig. 4: 1/10x to 50x, prompt c_dc,
guidance 2.0), `steps` and `guidance` (the supplementary's sweeps; its exact grids are not
in the text we have, so these are our choice), `beyond` (class-matched backgrounds, the
paper's Sec. 4.3 future work), `generators` (SD v1.4 beside SDXL, SD3, PixArt-Sigma, FLUX.1 schnell and
the distilled SD-/SDXL-Turbo, each at its own setting and priced), `digits` (Table 1 at digit scale on the
digits profile: the real baseline, the four prompts at guidance 7.5 and 2.0, and c at 4x), `he2023`, `he2023-fewshot`, `he2023-guidance` and `he2023-fewshot-guidance` (He et al., ICLR 2023: CLIP
tuned on synthetic images with and without language enhancement and CLIP filtering, and
K-shot real guidance; these run the pipeline up to the clip-tune stage only), `vit-b` (ViT-B/16 with DeiT's
recipe at Fan et al.'s and Deliberate Practice's settings, paper profile). A setting
already computed in this commit's experiments (or in the commit itself) is skipped, as is
one already queued.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from imagenet_sd.models import families

# Every param that decides a row. A setting names all of them (source: real needs only two),
# so a row is the same experiment whatever the workspace's params.yaml holds.
SYNTHETIC = {"classes": "imagenet100", "prompt": "c", "guidance": 7.5, "scale": 1, "steps": 50,
             "scheduler": "model", "source": "synthetic", "filter": "none", "init_strength": 0}
REAL = {"classes": "imagenet100", "source": "real"}
METRICS_NEEDED = ("metrics/imagenet.json", "metrics/transfer.json")   # a run without them is not done
# Each profile's generator (params.yaml), which every setting without a model of its own runs.
DEFAULT_MODELS = {"paper": "CompVis/stable-diffusion-v1-4", "embedded": "models/tiny-sd", "rehearsal": "rehearsal",
                  "digits": "models/digits-sd"}
# Profiles whose generator was trained on one class set (its trained_classes.json): only settings of
# that class set are defined there.
PROFILE_CLASSES = {"digits": "digits"}
# What every setting has unless it says otherwise (a run from before one of these params existed had
# its value): the profile's generator with no add-on, and the papers' ResNet-50.
PROFILE_DEFAULTS = {"generate.lora": "", "generate.deepcache_interval": 0, "generate.token_merging": 0,
                    "generate.max_sequence_length": 0, "train.arch": "resnet50"}
# Top-level params every setting has unless it says otherwise (a run from before one existed had this value):
# the profile's own train block, the papers' ResNet-50 recipe.
TOP_DEFAULTS = {"train_recipe": "base"}
# Sariyildiz et al.'s rows do not need He et al.'s CLIP tuning: it changes none of their numbers,
# only their cost (a CLIP pass over every synthetic image), so their queued runs switch it off.
NO_CLIP_TUNE = {"clip_tune": False}


@dataclass(frozen=True)
class Setting:
    name: str          # the experiment's name, before the profile: table1-row05
    params: dict       # the params that define it
    label: str         # what a reader calls it
    switches: dict = field(default_factory=lambda: dict(NO_CLIP_TUNE))  # set when queued; decide no number of it
    target: str | None = None      # the stage `dvc exp run` stops at (None: the whole pipeline)
    needs: tuple = METRICS_NEEDED  # metrics files a finished run of it has
    # Params under profiles.<profile> that define it, per profile (the generator's model differs by
    # machine: a Hub id on the paper profile, a tiny model on the embedded one); {} for none.
    per_profile: dict = field(default_factory=dict)

    def matches(self, run_params: dict) -> bool:
        profile = run_params.get("profile", "")
        if self.per_profile and profile not in self.per_profile:
            return False
        # The generator and the network are part of every setting (PROFILE_DEFAULTS).
        defaults = {**PROFILE_DEFAULTS, **({"generate.model": DEFAULT_MODELS[profile]}
                                           if profile in DEFAULT_MODELS else {})}
        for key, value in {**defaults, **self.per_profile.get(profile, {})}.items():
            found = _lookup(run_params, f"profiles.{profile}.{key}")
            if not (_same(found, value) or (found is None and key in defaults and _same(defaults[key], value))):
                return False
        return all(_same(found := _lookup(run_params, key), value)
                   or (found is None and key in TOP_DEFAULTS and _same(TOP_DEFAULTS[key], value))
                   for key, value in {**TOP_DEFAULTS, **self.params}.items())

    def defined_for(self, profile: str) -> bool:
        only = PROFILE_CLASSES.get(profile)
        if only is not None and self.params.get("classes") != only:
            return False
        return not self.per_profile or profile in self.per_profile

    def overrides(self, profile: str) -> list[str]:
        """`-S key=value` arguments of `dvc exp run`."""
        own = {f"profiles.{profile}.{k}": v for k, v in self.per_profile.get(profile, {}).items()}
        pairs = {"profile": profile, **TOP_DEFAULTS, **self.params, **own, **self.switches}
        return [arg for key, value in pairs.items() for arg in ("-S", f"{key}={value}")]


def _lookup(params: dict, dotted: str):
    """params["a"]["b"] for "a.b" (None where a key is missing)."""
    for part in dotted.split("."):
        if not isinstance(params, dict):
            return None
        params = params.get(part)
    return params


def _same(a, b) -> bool:
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        try:
            return abs(float(a) - float(b)) < 1e-9
        except (TypeError, ValueError):
            return False
    return a == b


def synthetic(name: str, label: str, **changes) -> Setting:
    return Setting(name, {**SYNTHETIC, **changes}, label)


PROMPT_LABELS = {"c": "c", "c_hc": "c, h_c", "c_dc": "c, d_c", "c_hc_b": "c, h_c inside b",
                 "c_hc_bm": "c, h_c inside b (class-matched b)"}


def _table1() -> dict[int, Setting]:
    rows = {1: Setting("table1-row01", dict(REAL), "ImageNet-100 (real)")}
    for first, guidance in ((2, 7.5), (6, 2.0)):
        for offset, prompt in enumerate(("c", "c_hc", "c_dc", "c_hc_b")):
            row = first + offset
            rows[row] = synthetic(f"table1-row{row:02d}", f"IN-100-SD, {PROMPT_LABELS[prompt]}, {guidance}",
                                  prompt=prompt, guidance=guidance)
    for row, scale in ((10, 10), (11, 20), (12, 50)):
        rows[row] = synthetic(f"table1-row{row:02d}", f"IN-100-SD {scale}x, c, d_c, 2.0",
                              prompt="c_dc", guidance=2.0, scale=scale)
    for row, prompt, guidance in ((15, "c_dc", 7.5), (16, "c_hc_b", 7.5), (17, "c_dc", 2.0)):
        rows[row] = synthetic(f"table1-row{row:02d}", f"IN-1K-SD, {PROMPT_LABELS[prompt]}, {guidance}",
                              classes="imagenet1k", prompt=prompt, guidance=guidance)
    return rows


TABLE1 = _table1()
# Table 2's trained rows are Table 1's: its row -> Table 1's row (1, 4, 5: baselines of eval-transfer).
TABLE2_FROM_TABLE1 = {2: 1, 3: 12, 6: 15, 7: 16, 8: 17}
SCALES = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)        # Fig. 4's range, 1/10x to 50x
STEPS = (10, 20, 25, 50, 100)
# The sampler axis, priced (metrics/generate.json's tflop_per_image; the report's price.png):
# two few-step samplers at 10, 25 and 50 steps, beside the checkpoint's own (PNDM) at 50.
SAMPLERS, SAMPLER_STEPS = ("dpm-solver++", "unipc"), (10, 25, 50)
GUIDANCES = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5)
# The generator axis (docs/generating.md#generators), each at its model card's setting: SD v1.4 (the
# paper's) beside the other families and the distilled few-step models, all at prompt c, d_c. Paper
# profile: the Hub checkpoints, drawn at their native size and stored at 512 px; embedded: the tiny
# random-weight versions (models/tiny-<family>), which exercise the path, not the question. Each
# family's module (models/families/) lists its rows: (name, label, top params, paper profile's
# generate params, tiny model folder or None).
GENERATORS = tuple((g.name, g.label, g.settings, g.paper, family.tiny.folder if g.tiny else None)
                   for family in families.FAMILIES.values() for g in family.generators)
MATCHED_K = 10


# He et al. (ICLR 2023): the clip-tune stage's study. Zero-shot: the class name alone ("B", prompt c),
# + language enhancement (LE), + CLIP filter (CF); few-shot: K real shots a class, each synthetic
# image started from one of them (real guidance) at the strength their code uses for that K.
# He et al.'s settings name CLIP's texts too: they decide clip-tune's (and clip-filter's) numbers.
# Their language enhancement's count likewise: 200 sentences a class (docs/he2023.md#language-enhancement).
CLIP_TUNE = {"clip_tune": True, "shots": 0, "clip_class_names": "openai", "clip_templates": "he2023",
             "le_sentences_per_class": 200}
HE2023_ZERO_SHOT = (("b", "c", "none", "B (class name)"), ("le", "le", "none", "B + LE"),
                    ("cf", "c", "clip", "B + CF"), ("le-cf", "le", "clip", "B + LE + CF"))
# Their LE: 10 consecutive images a sentence (2,000 a class from 200 sentences), written from CLIP's class
# names, as their LE and CLIP filter read one label list (an inference for ImageNet:
# docs/he2023.md#what-le-does-and-why-it-differs). A run from before these params wrote from WordNet's.
HE2023_LE = {"le_class_names": "clip", "le_images_per_sentence": 10, "le_sentences_per_class": 0}
HE2023_SHOTS = (1, 2, 4, 8, 16)
# CVMI-Lab/SyntheticData's few-shot GLIDE script: refer_img_iters 50, 40, 35, 20, 15 of its 100
# steps for K = 1, 2, 4, 8, 16, i.e. img2img strengths 0.5 ... 0.15
# (docs/he2023.md#what-their-real-guidance-does).
HE2023_INIT_STRENGTH = {1: 0.5, 2: 0.4, 4: 0.35, 8: 0.2, 16: 0.15}
# He et al. sample GLIDE at its own default guidance, 3.0; a scale is the generator's own, so their
# settings here sample Stable Diffusion at its default, 7.5 (SYNTHETIC's), and the he2023-guidance
# group sweeps it for the zero-shot setting B (docs/he2023.md#guidance).
HE2023_GUIDANCES = (1.5, 2.0, 3.0, 5.0, 7.5)
# Their few-shot strengths were chosen with GLIDE at 3.0 (glide_fsl.py's guidance_scale), where ours sample
# at 7.5: the he2023-fewshot-guidance group has every K at 3.0 too, and K = 4 at the sweep's other
# scales, so a user can see which guidance the strengths fit (docs/he2023.md#guidance).
HE2023_FEWSHOT_GUIDANCE = 3.0
HE2023_FEWSHOT_SWEPT_K = 4
CLIP_METRICS = ("metrics/clip.json",)
# Their CLIP filter is OpenAI's RN50 (select_glide_ims_by_clip.py), here through OpenCLIP, in the settings that
# filter (CF); the embedded profile runs the same path on its tiny OpenCLIP ResNet (docs/he2023.md#clip-filtering).
HE2023_FILTER_MODEL = {"paper": {"filter.model": "open_clip:RN50-quickgelu/openai"},
                       "embedded": {"filter.model": "open_clip:local-dir:models/tiny-open-clip"}}


def he2023(name: str, label: str, **changes) -> Setting:
    """A setting of He et al.'s study: run to clip-tune, not train-resnet50, which it does not read."""
    return Setting(name, {**SYNTHETIC, **CLIP_TUNE, **changes}, label, switches={}, target="clip-tune",
                   needs=CLIP_METRICS, per_profile=HE2023_FILTER_MODEL if changes.get("filter") == "clip" else {})


def _he2023() -> dict[str, list[Setting]]:
    zero = [he2023(f"he2023-{short}", label, prompt=prompt, filter=filter_, **(HE2023_LE if prompt == "le" else {}))
            for short, prompt, filter_, label in HE2023_ZERO_SHOT]
    few = [he2023(f"he2023-{k}shot", f"{k}-shot, real guidance {HE2023_INIT_STRENGTH[k]}", shots=k,
                  init_strength=HE2023_INIT_STRENGTH[k]) for k in HE2023_SHOTS]
    sweep = [he2023(f"he2023-b-guidance-{g:g}".replace(".", "p"), f"B (class name), guidance {g:g}", guidance=g)
             for g in HE2023_GUIDANCES]
    few_guided = [_few_shot(k, HE2023_FEWSHOT_GUIDANCE) for k in HE2023_SHOTS]
    few_guided += [_few_shot(HE2023_FEWSHOT_SWEPT_K, g) for g in HE2023_GUIDANCES
                   if g not in (HE2023_FEWSHOT_GUIDANCE, SYNTHETIC["guidance"])]     # those two: rows already
    return {"he2023": zero, "he2023-fewshot": few, "he2023-guidance": sweep, "he2023-fewshot-guidance": few_guided}


def _few_shot(shots: int, guidance: float) -> Setting:
    strength = HE2023_INIT_STRENGTH[shots]
    return he2023(f"he2023-{shots}shot-guidance-{guidance:g}".replace(".", "p"),
                  f"{shots}-shot, real guidance {strength}, guidance {guidance:g}", shots=shots,
                  init_strength=strength, guidance=guidance)


def _generator(name: str, label: str, top: dict, paper: dict, tiny: str | None) -> Setting:
    per_profile = {"paper": {(k if k.startswith("generate.") else f"generate.{k}"): v for k, v in paper.items()}}
    if tiny is not None:
        per_profile["embedded"] = {"generate.model": f"models/{tiny}"}
    return Setting(name, {**SYNTHETIC, "prompt": "c_dc", **top}, label, per_profile=per_profile)


# Table 1 at digit scale (docs/digits.md#the-digits-queue-group): row -> the paper's Table 1 row it mirrors.
# The digits profile only: its generator knows no other classes, and no other profile has the digits.
DIGITS_ONLY = {"digits": {}}
DIGITS_PROMPTS = ("c", "c_hc", "c_dc", "c_hc_b")
DIGITS_SCALE = 4


def _digits() -> list[Setting]:
    rows = [Setting("digits-real", {"classes": "digits", "source": "real"}, "digits (real)", per_profile=DIGITS_ONLY)]
    for guidance in (7.5, 2.0):
        rows += [Setting(f"digits-{prompt}-{guidance:g}".replace(".", "p"),
                         {**SYNTHETIC, "classes": "digits", "prompt": prompt, "guidance": guidance},
                         f"digits-SD, {PROMPT_LABELS[prompt]}, {guidance}", per_profile=DIGITS_ONLY)
                 for prompt in DIGITS_PROMPTS]
    rows.append(Setting(f"digits-c-7p5-{DIGITS_SCALE}x", {**SYNTHETIC, "classes": "digits", "scale": DIGITS_SCALE},
                        f"digits-SD {DIGITS_SCALE}x, c, 7.5", per_profile=DIGITS_ONLY))
    return rows


# The digits group's rows -> the paper's Table 1 row of the same setting on ImageNet-100 (None: none).
DIGITS_PAPER_ROWS = {"digits-real": 1, "digits-c-7p5": 2, "digits-c_hc-7p5": 3, "digits-c_dc-7p5": 4,
                     "digits-c_hc_b-7p5": 5, "digits-c-2": 6, "digits-c_hc-2": 7, "digits-c_dc-2": 8,
                     "digits-c_hc_b-2": 9, f"digits-c-7p5-{DIGITS_SCALE}x": None}


# ViT-B/16 rows (train_recipe vit_b, DeiT's recipe) at the settings of the best class-names-only ImageNet-1K
# results since the paper: Fan et al. (CVPR 2024; class-name prompts at guidance 2, 2M and 64M images) and
# Deliberate Practice (Askari-Hemmat et al., ICML 2025, Table 1: 6.5M and 9.1M images, 200k iterations);
# data/paper/vit_b.tsv has their numbers, as DP's Table 1 reports them, and says which rows match ours.
# Each row trains a fixed number of steps (the papers' iterations), whatever its image count: rows are
# (name, prompt, images / ImageNet-1K's 1,281,167, steps). Paper profile only: 200k steps of ViT-B.
VIT_B = (("vit-b-c-2p0-1x", "c", 1, 200_000), ("vit-b-c-2p0-2m", "c", 1.5611, 210_000),
         ("vit-b-c-2p0-5x", "c", 5, 200_000), ("vit-b-c-2p0-7x", "c", 7.1, 200_000),
         ("vit-b-c-2p0-50x", "c", 50, 315_000), ("vit-b-c_dc-2p0-1x", "c_dc", 1, 200_000))
IMAGENET_1K_TRAIN = 1_281_167


def _vit_b() -> list[Setting]:
    return [Setting(name, {**SYNTHETIC, "classes": "imagenet1k", "prompt": prompt, "guidance": 2.0, "scale": scale,
                           "train_recipe": "vit_b", "train_recipes.vit_b.max_steps": steps},
                    f"ViT-B/16, IN-1K-SD {scale * IMAGENET_1K_TRAIN / 1e6:.1f}M, {PROMPT_LABELS[prompt]}, 2.0, "
                    f"{steps // 1000}k steps", per_profile={"paper": {}})
            for name, prompt, scale, steps in VIT_B]


def _scale_name(scale: float) -> str:
    return f"scale-{scale:g}x".replace(".", "p")


def groups() -> dict[str, list[Setting]]:
    """Every group's settings, in order; a setting shared by groups has its first group's name."""
    fig4 = synthetic("", "", prompt="c_dc", guidance=2.0)
    made = {
        "table1": [TABLE1[row] for row in sorted(TABLE1)],
        "table2": [TABLE1[row] for row in TABLE2_FROM_TABLE1.values()],
        "scaling": [synthetic(_scale_name(s), f"IN-100-SD {s:g}x, c, d_c, 2.0", **{**fig4.params, "scale": s})
                    for s in SCALES],
        "steps": [synthetic(f"steps-{n}", f"IN-100-SD, c, d_c, 2.0, {n} steps", **{**fig4.params, "steps": n})
                  for n in STEPS],
        "guidance": [synthetic(f"guidance-{g:g}".replace(".", "p"), f"IN-100-SD, c, d_c, guidance {g:g}",
                               prompt="c_dc", guidance=g) for g in GUIDANCES],
        "samplers": [synthetic("steps-50", "IN-100-SD, c, d_c, 2.0, 50 steps", **{**fig4.params, "steps": 50})]
                    + [synthetic(f"sampler-{name}-{n}", f"IN-100-SD, c, d_c, 2.0, {name}, {n} steps",
                                 **{**fig4.params, "scheduler": name, "steps": n})
                       for name in SAMPLERS for n in SAMPLER_STEPS],
        "generators": [synthetic("generator-sd-v1-4", "SD v1.4, PNDM 50, cfg 7.5", prompt="c_dc")]
                      + [_generator(*g) for g in GENERATORS],
        "beyond": [synthetic(f"beyond-matched-{g:g}".replace(".", "p"),
                             f"IN-100-SD, {PROMPT_LABELS['c_hc_bm']}, {g}, k={MATCHED_K}",
                             prompt="c_hc_bm", guidance=g, background_top_k=MATCHED_K) for g in (7.5, 2.0)],
        "digits": _digits(),
        "vit-b": _vit_b(),
        **_he2023(),
    }
    named: list[Setting] = [s for group in made.values() for s in group]
    canonical = {}
    for s in named:                      # the first name of a set of params is its name everywhere
        canonical.setdefault(_key(s), s)
    return {g: [canonical[_key(s)] for s in group] for g, group in made.items()}


def _key(setting: Setting) -> str:
    """What makes two settings the same experiment: their params and their models per profile."""
    return json.dumps({**{k: float(v) if isinstance(v, (int, float)) else v for k, v in setting.params.items()},
                       "per_profile": setting.per_profile}, sort_keys=True)


def experiment_name(setting: Setting, profile: str) -> str:
    return f"{setting.name}-{profile}"
