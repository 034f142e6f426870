"""The paper's experiments as DVC experiments: row -> params, reading `dvc exp show --json`, what gets queued.

The queue and the report run end to end on DVC in tests/test_pipeline.py.
"""

from pathlib import Path

import pytest
import yaml

from imagenet_sd.core.errors import UserError
from imagenet_sd.experiments import catalog, queue
from imagenet_sd.experiments.catalog import TABLE1
from imagenet_sd.report import paper


def test_table1_rows_are_the_papers_trained_rows_with_their_params():
    assert sorted(TABLE1) == [*range(1, 13), 15, 16, 17]        # 13-14 are reference models
    paper_rows = {r["row"]: r for r in paper.table(1)}
    labels = {"c": "c", "c_hc": "c, h_c", "c_dc": "c, d_c", "c_hc_b": "c, h_c inside b"}
    for row, setting in TABLE1.items():
        p = paper_rows[row]
        if row == 1:
            assert setting.params == {"classes": "imagenet100", "source": "real"}
            continue
        assert setting.params["guidance"] == float(p["guidance"])
        assert labels[setting.params["prompt"]] == p["prompt_or_model"]
        assert setting.params["scale"] == (int(p["relative_size"].rstrip("x")))
        assert setting.params["classes"] == ("imagenet1k" if "1K" in p["training_data"] else "imagenet100")


def test_a_setting_shared_by_groups_has_one_name():
    groups = catalog.groups()
    by_scale = {s.params["scale"]: s.name for s in groups["scaling"]}
    assert by_scale[1] == "table1-row08" and by_scale[50] == "table1-row12" and by_scale[0.1] == "scale-0p1x"
    assert {s.name for s in groups["table2"]} == {"table1-row01", "table1-row12", "table1-row15",
                                                  "table1-row16", "table1-row17"}
    names = [s.name for g in groups.values() for s in g]
    params = {s.name: catalog._key(s) for g in groups.values() for s in g}     # params and models per profile
    assert len(set(params.values())) == len(set(names))          # one name per set of params


def test_matching_compares_numbers_by_value_and_ignores_other_params():
    row8 = TABLE1[8]
    run = dict(row8.params, guidance="2.0", scale=1.0, seed=3, profile="paper")
    assert row8.matches(run)
    assert not row8.matches(dict(run, prompt="c"))
    assert not TABLE1[1].matches(dict(run))                        # synthetic run is not row 1
    assert TABLE1[1].matches(dict(run, source="real"))               # a real run's prompt does not matter


def test_overrides_name_the_profile_and_every_defining_param():
    args = TABLE1[5].overrides("paper")
    pairs = dict(a.split("=", 1) for a in args[1::2])
    assert args[0::2] == ["-S"] * len(pairs)
    assert pairs == {"profile": "paper", "classes": "imagenet100", "prompt": "c_hc_b", "guidance": "7.5",
                     "scale": "1", "steps": "50", "scheduler": "model", "source": "synthetic",
                     "filter": "none", "init_strength": "0", "train_recipe": "base",
                     "clip_tune": "False"}   # clip_tune: cost only


def test_generator_settings_name_their_model_per_profile_and_others_keep_the_profiles_own():
    by_name = {s.name: s for s in catalog.groups()["generators"]}
    sdxl = by_name["generator-sdxl"]
    assert "profiles.embedded.generate.model=models/tiny-sdxl" in sdxl.overrides("embedded")
    paper_args = sdxl.overrides("paper")
    assert "profiles.paper.generate.model=stabilityai/stable-diffusion-xl-base-1.0" in paper_args
    assert "profiles.paper.generate.stored_size=512" in paper_args and "guidance=5.0" in paper_args
    assert not by_name["generator-sd-turbo"].defined_for("embedded")    # no tiny turbo model
    todo, skipped = queue.plan_queue([by_name["generator-sd-turbo"]], [], "embedded")
    assert todo == [] and "no model of it for profile embedded" in skipped[0]

    def run(model, **top):
        return {"profile": "embedded", **sdxl.params, **top,
                "profiles": {"embedded": {"generate": {"model": model, "lora": "", "deepcache_interval": 0,
                                                       "token_merging": 0, "max_sequence_length": 0}}}}
    assert sdxl.matches(run("models/tiny-sdxl")) and not sdxl.matches(run("models/tiny-sd"))
    # The guidance sweep's c, d_c at 5.0 has the same top-level params: only the profile's own model is it.
    sweep = next(s for s in catalog.groups()["guidance"] if s.params["guidance"] == 5.0)
    assert sweep.matches(run("models/tiny-sd")) and not sweep.matches(run("models/tiny-sdxl"))
    assert not sweep.matches(run("models/tiny-sd") | {"profiles": {"embedded": {"generate": {
        "model": "models/tiny-sd", "deepcache_interval": 3}}}})


def test_he2023_settings_run_to_clip_tune_with_their_he_et_al_params():
    groups = catalog.groups()
    zero = {s.name: s for s in groups["he2023"]}
    assert {(s.params["prompt"], s.params["filter"]) for s in zero.values()} == \
        {("c", "none"), ("le", "none"), ("c", "clip"), ("le", "clip")}
    # Their LE: 10 consecutive images a sentence, from CLIP's class names (docs/he2023.md#language-enhancement).
    for name in ("he2023-le", "he2023-le-cf"):
        assert {k: zero[name].params[k] for k in ("le_class_names", "le_images_per_sentence", "le_sentences_per_class")} \
            == {"le_class_names": "clip", "le_images_per_sentence": 10, "le_sentences_per_class": 0}
    few = {s.params["shots"]: s.params["init_strength"] for s in groups["he2023-fewshot"]}
    assert few == {1: 0.5, 2: 0.4, 4: 0.35, 8: 0.2, 16: 0.15}      # their refer_img_iters / 100 steps
    for s in groups["he2023"] + groups["he2023-fewshot"]:
        assert s.target == "clip-tune" and s.needs == ("metrics/clip.json",) and s.params["clip_tune"] is True
        assert not s.matches(dict(TABLE1[2].params, clip_tune=False, shots=0))
    # A pipeline run of the commit (clip_tune on, shots 0) is setting B's run and Table 1 row 2's.
    commit = dict(TABLE1[2].params, clip_tune=True, shots=0, clip_class_names="openai", clip_templates="he2023",
                  le_sentences_per_class=200)
    assert zero["he2023-b"].matches(commit) and TABLE1[2].matches(commit)


def test_he2023_clip_filter_settings_filter_with_rn50_through_open_clip():
    """Their CF rows filter with OpenAI's RN50 as their select_glide_ims_by_clip.py does (OpenCLIP's
    RN50-quickgelu/openai; embedded: the tiny OpenCLIP ResNet); rows that do not filter name no CLIP."""
    zero = {s.name: s for s in catalog.groups()["he2023"]}
    for name in ("he2023-cf", "he2023-le-cf"):
        assert "profiles.paper.filter.model=open_clip:RN50-quickgelu/openai" in zero[name].overrides("paper")
        assert "profiles.embedded.filter.model=open_clip:local-dir:models/tiny-open-clip" in zero[name].overrides("embedded")
    assert not [arg for arg in zero["he2023-b"].overrides("paper") if arg.startswith("profiles.")]

    def run(model):
        return {"profile": "paper", **zero["he2023-cf"].params, "profiles": {"paper": {"filter": {"model": model}}}}
    assert zero["he2023-cf"].matches(run("open_clip:RN50-quickgelu/openai"))
    assert not zero["he2023-cf"].matches(run("openai/clip-vit-base-patch32"))      # a ViT-B/32 filter is not theirs


def test_he2023_settings_share_one_guidance_and_setting_b_is_swept():
    groups = catalog.groups()
    # Stable Diffusion's own default, as He et al. sampled GLIDE at its own (docs/he2023.md#guidance).
    assert {s.params["guidance"] for s in groups["he2023"] + groups["he2023-fewshot"]} == {7.5}
    sweep = groups["he2023-guidance"]
    assert sorted(s.params["guidance"] for s in sweep) == [1.5, 2.0, 3.0, 5.0, 7.5]
    assert all((s.params["prompt"], s.params["filter"], s.params["shots"], s.target) == ("c", "none", 0, "clip-tune")
               for s in sweep)
    # The sweep's 7.5 point is setting B itself, under its first name: queued once, reported once.
    assert [s.name for s in sweep if s.params["guidance"] == 7.5] == ["he2023-b"]


def test_he2023_fewshot_settings_also_run_at_the_guidance_their_strengths_were_chosen_with():
    groups = catalog.groups()
    guided = groups["he2023-fewshot-guidance"]
    # GLIDE's 3.0, at which their refer_img_iters were chosen, for every K (docs/he2023.md#guidance).
    at3 = {s.params["shots"]: s.params["init_strength"] for s in guided if s.params["guidance"] == 3.0}
    assert at3 == {1: 0.5, 2: 0.4, 4: 0.35, 8: 0.2, 16: 0.15}
    # 4-shot over the zero-shot sweep's scales, with the he2023-fewshot row as its 7.5 point.
    four = sorted(s.params["guidance"] for s in guided + groups["he2023-fewshot"] if s.params["shots"] == 4)
    assert four == [1.5, 2.0, 3.0, 5.0, 7.5]
    names = [s.name for s in guided]
    assert len(set(names)) == len(names) and not set(names) & {s.name for s in groups["he2023-fewshot"]}
    assert "he2023-4shot-guidance-1p5" in names and "he2023-16shot-guidance-3" in names
    assert all(s.target == "clip-tune" and s.params["clip_tune"] is True for s in guided)


def _entry(rev, name, params, metrics, executor=None):
    entry = {"rev": rev, "name": name, "error": None, "experiments": None,
             "data": {"rev": rev, "params": {"params.yaml": {"data": params}},
                      "metrics": {path: {"data": data} for path, data in metrics.items()}}}
    return entry, {"executor": executor, "name": name, "revs": [entry]}


def exp_show(*experiment_entries, baseline_params=None, baseline_metrics=None):
    """The shape of `dvc exp show --json` (DVC 3)."""
    workspace, _ = _entry("workspace", None, {"profile": "embedded"}, {})
    base, _ = _entry("a" * 40, "main", baseline_params or {}, baseline_metrics or {})
    base["experiments"] = list(experiment_entries)
    return [workspace, base]


DONE = {"metrics/imagenet.json": {"val": {"top1": 1.0}}, "metrics/transfer.json": {"average_top1": 2.0}}


def test_exp_show_is_read_into_runs_with_their_state():
    row6 = dict(TABLE1[6].params, profile="embedded")
    _, done = _entry("b" * 40, "table1-row06-embedded", row6, DONE)
    _, queued = _entry("c" * 40, "table1-row03-embedded", dict(TABLE1[3].params, profile="embedded"), {},
                       executor={"state": "queued"})
    _, failed = _entry("d" * 40, "x", dict(TABLE1[4].params, profile="embedded"), {},
                       executor={"state": "failed"})
    runs = queue.parse_exp_show(exp_show(done, queued, failed, baseline_params=dict(
        TABLE1[2].params, profile="embedded"), baseline_metrics=DONE))
    by_name = {r.name: r for r in runs}
    assert "workspace" not in by_name                           # its metrics may be older than its params
    assert by_name["main"].kind == "baseline" and by_name["main"].done
    assert by_name["table1-row06-embedded"].done
    assert by_name["table1-row03-embedded"].state == "queued" and not by_name["table1-row03-embedded"].done
    assert by_name["x"].state == "failed"

    todo, skipped = queue.plan_queue([TABLE1[r] for r in (1, 2, 3, 4, 6)], runs, "embedded")
    assert [s.name for s in todo] == ["table1-row01", "table1-row04"]          # failed ones are queued again
    assert skipped == ["table1-row02: computed in main (IN-100-SD, c, 7.5)",
                       "table1-row03: already queued as table1-row03-embedded",
                       "table1-row06: computed in table1-row06-embedded (IN-100-SD, c, 2.0)"]
    todo, _ = queue.plan_queue([TABLE1[6]], runs, "paper")          # another profile's run does not count
    assert [s.name for s in todo] == ["table1-row06"]


def test_a_run_without_both_evaluations_is_not_done():
    _, partial = _entry("b" * 40, "p", dict(TABLE1[6].params, profile="embedded"),
                        {"metrics/imagenet.json": {"val": {"top1": 1.0}}})
    runs = queue.parse_exp_show(exp_show(partial))
    assert not next(r for r in runs if r.name == "p").done


@pytest.mark.parametrize("groups, rows, message", [
    (["table9"], None, "unknown group 'table9'"),
    (["table1", "scaling"], [1], "--rows picks rows of Table 1"),
    (["table1"], [13], "Table 1 has no trained row 13"),
])
def test_bad_selections_are_one_line_errors(groups, rows, message):
    with pytest.raises(UserError, match=message):
        queue.select(groups, rows)


def test_bad_command_line_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("profiles:\n  embedded: {}\n")
    assert queue.main(["queue", "table1", "--profile", "gpu", "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such profile" in err and "embedded" in err


def test_the_digits_group_runs_on_the_digits_profile_only_and_imagenet_rows_not_there():
    digits = catalog.groups()["digits"]
    assert [s.name for s in digits][:2] == ["digits-real", "digits-c-7p5"] and len(digits) == 10
    assert all(s.defined_for("digits") and not s.defined_for("embedded") for s in digits)
    todo, skipped = queue.plan_queue([TABLE1[2], digits[1]], [], "digits")
    assert todo == [digits[1]]
    assert skipped == ["table1-row02: profile digits's generator knows the digits classes only"]
    # The committed params are the digits group's c at 7.5: the main job is that row.
    committed = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert digits[1].matches(committed) and not digits[0].matches(committed)


def test_every_queued_setting_is_a_valid_params_yaml():
    """A setting's `-S` overrides over params.yaml parse: no queued run fails at its first stage's params."""
    import json

    from imagenet_sd.core import params
    base = yaml.safe_load(Path("params.yaml").read_text())
    for group, settings in catalog.groups().items():
        for setting in settings:
            for profile in ("paper", "digits"):
                if not setting.defined_for(profile):
                    continue
                raw = json.loads(json.dumps(base))
                args = setting.overrides(profile)
                for pair in args[1::2]:
                    key, value = pair.split("=", 1)
                    *parents, last = key.split(".")
                    node = raw
                    for part in parents:
                        node = node.setdefault(part, {})
                    node[last] = yaml.safe_load(value) if value not in ("True", "False") else value == "True"
                parsed = params.parse(raw)
                if setting.params.get("train_recipe") == "vit_b":
                    assert parsed.train.arch == "timm:vit_base_patch16_224" and parsed.train.max_steps > 0
