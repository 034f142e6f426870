"""Params are validated once at the start of each stage: bad input exits 2 with one line."""
import copy
import hashlib
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_script
from imagenet_sd.core import params
from imagenet_sd.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((ROOT / "params.yaml").read_text())
DEFAULT = dict(SHIPPED, profile="embedded", classes="imagenet100")   # the keys below are the embedded block's


def with_value(dotted_key: str, value) -> dict:
    raw = copy.deepcopy(DEFAULT)
    *parents, last = dotted_key.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


def test_the_shipped_params_are_valid_for_every_profile():
    shipped = params.parse(SHIPPED)       # the main job: the digits profile and class set (docs/digits.md)
    assert (shipped.profile, shipped.classes, shipped.generate.model) == ("digits", "digits", "models/digits-sd")
    assert params.parse(with_value("profile", "rehearsal")).generate.model == "rehearsal"
    paper = params.parse(with_value("profile", "paper"))
    assert paper.generate.model == "CompVis/stable-diffusion-v1-4" and paper.generate.resolution == 512
    assert paper.data.train == Path("/datasets/imagenet/train")
    speed = paper.generate.attention, paper.generate.channels_last, paper.generate.compile
    assert speed == ("sdpa", True, True)           # expected fastest on a GPU (docs/benchmarks.md: unmeasured)
    embedded = params.parse(DEFAULT).generate
    assert (embedded.attention, embedded.channels_last, embedded.compile) == ("sdpa", False, False)


BAD = [
    ("prompt", "c_hd", "c | c_hc | c_dc | c_hc_b | c_hc_bm"),
    ("background_top_k", 0, "an integer >= 1 and <= 365"),
    ("classes", "imagenet21k", "imagenet100 | imagenet1k | digits | custom"),
    ("guidance", -1, ">= 0"),
    ("guidance", -2.0, ">= 0"),
    ("steps", 0, ">= 1"),
    ("steps", 2.5, "an integer"),
    ("scale", 0, ">= 0.1"),
    ("scale", 51, "<= 50"),
    ("scale", "big", "a number"),
    ("scheduler", "heun", "model | ddim | dpm-solver++ | unipc | euler | lcm"),
    ("safety_checker", False, "none | keep | regenerate"),
    ("profiles.embedded.generate.dtype", "fp8", "auto | fp32 | fp16 | bf16"),
    ("profiles.embedded.generate.processes", 0, ">= 1"),
    ("profiles.embedded.generate.stored_size", 128, "size <= resolution"),
    ("profiles.embedded.generate.attention", "flash", "sdpa | math | classic"),
    ("profiles.embedded.generate.channels_last", "yes", "true or false"),
    ("profiles.embedded.generate.compile", "reduce-overhead", "true or false"),
    ("profiles.embedded.generate.work_dir", "", "a folder kept between runs"),
    ("profiles.embedded.train.work_dir", " ", "a folder kept between runs"),
    ("profiles.embedded.evaluate.work_dir", "", "a folder kept between runs"),
    ("profiles.embedded.transfer.work_dir", "", "a folder kept between runs"),
    ("profiles.embedded.train.processes", 3, "a divisor of batch_size (32)"),
    ("seed", -1, ">= 0"),
    ("source", "imagenet", "synthetic | real"),
    ("profile", "laptop", "digits | embedded | paper"),
    ("profiles.embedded.generate.resolution", 4, ">= 8"),
    ("profiles.embedded.train.global_crop_scale", [0.5, 0.2], "low <= high"),
    ("profiles.embedded.evaluate.resize", 32, ">= crop"),
    ("profiles.embedded.train.amp", "fp8", "auto | bf16 | fp16 | none"),
    ("profiles.embedded.train.channels_last", "yes", "true or false"),
    ("profiles.embedded.train.compile", 1, "true or false"),
    ("profiles.embedded.train.holdout_per_class", -1, ">= 0"),
    ("profiles.embedded.train.checkpoint_every_steps", 0.5, "an integer"),
    ("profiles.embedded.train.min_lr", 0.5, "below the peak lr"),
    ("profiles.embedded.train.global_crop_style", "swav", "trex | dino"),
    ("profiles.embedded.train.augment_device", "tpu", "auto | cpu | cuda"),
    ("profiles.embedded.train.max_steps", -1, ">= 0"),
    ("profiles.embedded.transfer.c_range", [1.0, 0.1], "0 < low <= high"),
    ("profiles.embedded.transfer.c_points", 0, ">= 1"),
]


def test_check_params_reads_every_profiles_block_not_only_the_chosen_one(tmp_path):
    """The check-params stage (its DVC params: the whole file): a bad value where no stage reads it is one line."""
    import yaml
    raw = copy.deepcopy(SHIPPED)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert params.check_every_profile(path) == ["digits", "embedded", "paper", "rehearsal"]
    raw["profiles"]["paper"]["slurm"]["nodes"] = 0          # the digits profile is the chosen one
    path.write_text(yaml.safe_dump(raw))
    params.load(path)
    with pytest.raises(UserError, match=r"^params.yaml: profiles.paper.slurm.nodes = 0 is not valid"):
        params.check_every_profile(path)


@pytest.mark.parametrize("key, value, allowed", BAD)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(UserError) as info:
        params.parse(with_value(key, value))
    message = str(info.value)
    assert key in message and repr(value) in message and allowed in message
    assert "\n" not in message


def test_unknown_and_missing_keys_are_named():
    raw = with_value("guidence", 2.0)
    with pytest.raises(UserError, match="unknown key guidence"):
        params.parse(raw)
    raw = copy.deepcopy(DEFAULT)
    del raw["profiles"]["embedded"]["train"]["epochs"]
    with pytest.raises(UserError, match="missing key profiles.embedded.train.epochs"):
        params.parse(raw)


def test_home_and_variables_expand_in_every_path_param(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("DATASETS", "/mnt/datasets")
    raw = with_value("custom_classes", "/home/someone/classes.tsv")     # DVC's dependency: see below
    block = raw["profiles"]["embedded"]
    block["data"] = {name: f"$DATASETS/{name}" for name in block["data"]}
    block["evaluate"]["reference_models"]["timm-resnet50-a1"] = "~/a1.safetensors"
    block["transfer"]["datasets"] = {"dtd": "${DATASETS}/dtd", "pets": ""}
    block["transfer"]["cog"] = {name: f"~/cog/{name}" for name in block["transfer"]["cog"]}
    for section in ("generate", "train", "evaluate", "transfer"):
        block[section]["work_dir"] = f"$DATASETS/work/{section}"
    p = params.parse(raw)
    assert p.custom_classes == Path("/home/someone/classes.tsv")
    roots = {name: Path(f"/mnt/datasets/{name}") for name in block["data"]}
    assert p.data == params.DataParams(train=roots.pop("train"), val_labels=roots.pop("val_labels"), test_sets=roots)
    assert p.evaluate.reference_models == {"torchvision-resnet50": None,
                                           "timm-resnet50-a1": Path("/home/someone/a1.safetensors")}
    assert p.transfer.datasets == {"dtd": Path("/mnt/datasets/dtd"), "pets": None}
    assert p.transfer.cog == params.CogParams(**{name: Path(f"/home/someone/cog/{name}")
                                                 for name in block["transfer"]["cog"]})
    assert [getattr(p, section).work_dir for section in ("generate", "train", "evaluate", "transfer")] == \
        [Path(f"/mnt/datasets/work/{section}") for section in ("generate", "train", "evaluate", "transfer")]


@pytest.mark.parametrize("value", ["~/classes.tsv", "$DATASETS/classes.tsv"])
def test_custom_classes_is_written_as_dvc_reads_it(monkeypatch, value):
    # dvc.yaml depends on ${custom_classes} as written, and DVC expands neither ~ nor $VARS: the stage
    # would read one file and DVC watch another, so the path must be written out.
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("DATASETS", "/home/someone")
    with pytest.raises(UserError, match="DVC watches this file as written.*write '/home/someone/classes.tsv'"):
        params.parse(with_value("custom_classes", value))


def test_a_model_folder_expands_variables_as_well_as_home(monkeypatch, tmp_path):
    from imagenet_sd.models import sd_model
    folder = tmp_path / "models" / "mine"
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    monkeypatch.setenv("MODELS", str(tmp_path / "models"))
    assert sd_model.locate("$MODELS/mine", "profiles.paper.generate.model") == str(folder)
    assert sd_model.locate("${MODELS}/mine", "profiles.paper.generate.model") == str(folder)


def run_stage(script: str, params_file: Path, out: Path):
    return run_script([sys.executable, f"stages/{script}", "--params", str(params_file), "--out", str(out)], cwd=ROOT)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def good_output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    good = folder / "good.yaml"
    good.write_text(yaml.safe_dump(DEFAULT))
    result = run_stage("wordnet_prompts.py", good, folder / "prompts.tsv")
    assert result.returncode == 0, result.stderr
    return (folder / "prompts.tsv").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("key, value, expected", [
    ("prompt", "c_hd", "prompt = 'c_hd'"),
    ("classes", "imagenet21k", "classes = 'imagenet21k'"),
    ("guidance", -1, "guidance = -1"),
    ("steps", 0, "steps = 0"),
    ("scale", 0, "scale = 0"),
    ("custom_classes", "no/such/file.tsv", "custom_classes = 'no/such/file.tsv': no such file"),
])
def test_stage_exits_2_with_one_line_and_leaves_outputs_alone(tmp_path, good_output, key, value, expected):
    out = tmp_path / "prompts.tsv"
    out.write_bytes(good_output)
    before = digest(out)

    raw = with_value(key, value)
    if key == "custom_classes":
        raw["classes"] = "custom"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    result = run_stage("wordnet_prompts.py", bad, out)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert expected in result.stderr
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "prompts.tsv"]


def test_unreadable_params_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("guidance: [1,\n")
    result = run_stage("places_backgrounds.py", bad, tmp_path / "b.tsv")
    assert result.returncode == 2 and "not valid YAML at line" in result.stderr
    assert not (tmp_path / "b.tsv").exists()


def test_a_number_yaml_reads_as_text_says_so_and_how_to_write_it(tmp_path):
    """PyYAML (YAML 1.1) reads 1e1 and 1e-06 as strings (a float needs a dot and a signed exponent), and
    `dvc exp run -S key=0.000001` writes 1e-06 (DVC's YAML 1.2 writer): the error says why and how."""
    from dvc.utils.hydra import apply_overrides
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(DEFAULT).replace("\nscale: 1\n", "\nscale: 1e1\n"))
    with pytest.raises(UserError) as info:
        params.load(path)
    assert str(info.value) == (
        "params.yaml: scale = '1e1' is not valid; allowed: a number >= 0.1 and <= 50; YAML read it as text, not a "
        "number (YAML 1.1 needs a dot and a signed exponent): write it as 10 or 1.0e+1 in params.yaml itself "
        "(dvc exp run -S writes such values, 1e-06, too)")
    key = "profiles.embedded.train.weight_decay"
    path.write_text(yaml.safe_dump(DEFAULT))
    apply_overrides(str(path), [f"{key}=0.000001"])         # what dvc exp run -S does to params.yaml
    assert "weight_decay: 1e-06" in path.read_text()
    with pytest.raises(UserError, match=rf"{key} = '1e-06' is not valid; allowed: a number >= 0; YAML read it as "
                                        r"text.*write it as 0.000001 or 1.0e-06 in params.yaml"):
        params.load(path)
    for suggested in ("10", "1.0e+1"):                   # what the message suggests is a number to YAML 1.1
        assert yaml.safe_load(f"scale: {suggested}")["scale"] == 10
    assert params.parse(with_value("scale", yaml.safe_load("v: 1.0e+1")["v"])).scale == 10
