"""Any diffusers text-to-image family through sd-generate (issue 23): every registered family but SD
(models/families/; tiny random-weight versions built by models/tiny_families.py) beside the tiny SD, their settings checked at
the edge, their prices counted from the real configs in data/, the add-ons (LoRA, DeepCache, ToMe),
and records that name everything that decides the pixels."""
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from imagenet_sd.core.errors import UserError
from imagenet_sd.core.paths import DATA
from imagenet_sd.datasets import shards
from imagenet_sd.experiments import catalog
from imagenet_sd.generate import adopt, estimates, generation, regenerate
from imagenet_sd.models import families, sd_model, tiny_families
from imagenet_sd.train import loop, training
from test_generation import WNIDS, make_params, republish, rows, run_generate

# Every registered family with a tiny model; the tiny SD's own tests (test_generation and the rest) cover sd.
FAMILIES = tuple(name for name in tiny_families.FOLDERS if name != "sd")


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """{family: its tiny model folder}: the ones setup built when current, else fresh builds."""
    found = {}
    for name in FAMILIES:
        folder = tiny_families.FOLDERS[name]
        path = ROOT / "models" / folder
        if not tiny_families.is_current(name, path):
            path = tmp_path_factory.mktemp("families") / folder
            tiny_families.build(name, path)
        found[name] = path
    return found


def pixels(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB"), dtype=int)


def family_params(tmp_path, model: Path, **top):
    kind = sd_model.family(str(model), "model")
    guidance = 4.0 if kind.classifier_free else 0.0      # FLUX.1 schnell: no classifier-free guidance
    return make_params(tmp_path, model, **{**dict(steps=2, guidance=guidance), **top})


# --------------------------------------------------------------------------- through the pipeline

@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_makes_shards_whose_records_name_it_and_trains_on_them(tmp_path, family_models, family):
    model = family_models[family]
    p = family_params(tmp_path, model)
    out = tmp_path / "synthetic"
    out.mkdir()
    metrics = run_generate(p, out)
    kind = families.FAMILIES[family]
    samples = [s for path in shards.list_shards(out) for s in shards.iter_shard(path)]
    assert len(samples) == metrics["images"] == 6 and metrics["tflop_per_image"] > 0
    for key, jpeg, record in samples:
        assert record["pipeline"] == kind.pipeline and record["split"] == "train"
        assert record["weights"] == sd_model.fingerprint(str(model), "model")
        assert record["scheduler_class"] == json.loads((model / "scheduler/scheduler_config.json").read_text())[
            "_class_name"]
        assert ("max_sequence_length" in record) == kind.has_sequence_length
        assert pixels(jpeg).shape == (64, 64, 3)
    index = json.loads((out / "index.json").read_text())
    assert index["generator"]["pipeline"] == kind.pipeline and index["device"] == "cpu"
    assert index["splits"] == {"holdout": 0, "train": 6, "overgenerated": 0}

    # Resume: a lost shard is drawn again to the same bytes; finished ones are kept.
    before = {path.name: path.read_bytes() for path in shards.list_shards(out)}
    plan = generation.make_plan(p, rows(), [])
    lost = next(plan.folder.glob("shard-000001*.tar"))
    lost.unlink()
    again = run_generate(p, out)
    assert again["generated"] == 3 and {path.name: path.read_bytes() for path in shards.list_shards(out)} == before

    # The shards train a ResNet-50 like any other (one epoch at toy size).
    train = dataclasses.replace(p.train, epochs=1, batch_size=6, global_crop_size=32, local_crops=0, workers=0,
                                device="cpu", work_dir=tmp_path / "train")
    dataset, _ = training.open_training_set(dataclasses.replace(p, train=train), WNIDS, out)
    result = loop.train(dataset, len(WNIDS), train, seed=0, device=torch.device("cpu"))
    assert result.history[-1].images == 6 and np.isfinite(result.history[-1].loss)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_image_is_its_seeds_whatever_the_batch(family_models, family):
    model = family_models[family]
    kind = sd_model.family(str(model), "model")
    pipe = sd_model.load_pipeline(str(model), torch.device("cpu"), torch.float32)
    settings = families.settings_for(kind, "", 0, "k", str(model), 4.0)
    guidance = 4.0 if kind.classifier_free else 0.0
    draw = dict(guidance=guidance, steps=2, resolution=64)
    prompts, seeds = ["tench", "goldfish"], [5, 6]
    both, _ = sd_model.draw(pipe, prompts, seeds, **draw, **settings.options(kind, 2))
    twice, _ = sd_model.draw(pipe, prompts, seeds, **draw, **settings.options(kind, 2))
    alone, _ = sd_model.draw(pipe, prompts[1:], seeds[1:], **draw, **settings.options(kind, 1))
    other, _ = sd_model.draw(pipe, prompts[1:], [7], **draw, **settings.options(kind, 1))
    as_array = [np.asarray(i, dtype=int) for i in both]
    assert all((a == np.asarray(b, dtype=int)).all() for a, b in zip(as_array, twice))
    assert np.abs(as_array[1] - np.asarray(alone[0], dtype=int)).max() <= 2        # float rounding at most
    assert np.abs(as_array[1] - np.asarray(other[0], dtype=int)).mean() > 5      # another seed, another image


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_real_guidance_uses_the_familys_img2img_at_the_run_size(family_models, family):
    model = family_models[family]
    kind = sd_model.family(str(model), "model")
    pipe = sd_model.load_pipeline(str(model), torch.device("cpu"), torch.float32)
    guided = sd_model.img2img(pipe)
    assert type(guided).__name__ == kind.img2img
    start = Image.new("RGB", (64, 64), (200, 30, 30))
    settings = families.settings_for(kind, "", 0, "k", str(model), 4.0)
    images, _ = sd_model.draw_from(guided, ["tench"], [3], [start], strength=0.5, guidance=4.0, steps=4,
                                   resolution=64, **settings.options(kind, 1))
    assert images[0].size == (64, 64)


@pytest.mark.slow
def test_a_shard_of_another_family_is_drawn_again_byte_for_byte(tmp_path, family_models):
    p = family_params(tmp_path, family_models["flux"])
    run_generate(p, tmp_path / "synthetic")
    shard = tmp_path / "synthetic" / "shard-000000.tar"
    summary = regenerate.regenerate(shard, p, batch_size=p.generate.batch_size, out=tmp_path / "again")
    assert summary["images"] == summary["identical"] == 3 and summary["same_sha256"] is True


@pytest.mark.slow
def test_regenerate_refuses_records_of_other_weights(tmp_path, family_models, tiny_model):
    p = family_params(tmp_path, family_models["sdxl"])
    run_generate(p, tmp_path / "synthetic")
    shard = tmp_path / "synthetic" / "shard-000000.tar"
    samples = list(shards.iter_shard(shard))
    # published so (index.json lists these bytes): an edited shard is refused before loading anything
    republish(shard, [(k, j, r | {"weights": "0123456789abcdef"}) for k, j, r in samples])
    with pytest.raises(UserError, match="the records say weights '0123456789abcdef'"):
        regenerate.regenerate(shard, p, batch_size=2)


# --------------------------------------------------------------------------- keys and checks at the edge

def test_work_keys_differ_by_family_and_family_settings_only_key_their_family(tmp_path, family_models, tiny_model):
    keys = {name: generation.make_plan(family_params(tmp_path, path), rows(), []).folder.name
            for name, path in {**family_models, "sd": tiny_model}.items()}
    assert len(set(keys.values())) == len(family_models) + 1
    sd3 = family_params(tmp_path, family_models["sd3"])
    longer = dataclasses.replace(sd3, generate=dataclasses.replace(sd3.generate, max_sequence_length=77))
    plan = generation.make_plan(longer, rows(), [])
    assert plan.folder.name != keys["sd3"] and plan.recipe["max_sequence_length"] == 77
    sd = family_params(tmp_path, tiny_model)
    assert "max_sequence_length" not in generation.make_plan(sd, rows(), []).recipe       # not a setting of SD
    negative = generation.make_plan(dataclasses.replace(sd, negative_prompt="blurry"), rows(), [])
    assert negative.recipe["negative_prompt"] == "blurry" and negative.folder.name != keys["sd"]


@pytest.mark.parametrize("family, change, message", [
    ("flux", dict(negative_prompt="blurry"), "no unconditional branch"),
    ("sdxl", dict(generate=dict(max_sequence_length=300)), "CLIP text encoders read 77 tokens"),
    ("flux", dict(generate=dict(resolution=72)), "use a multiple of 16"),
    ("sd3", dict(scheduler="ddim"), "flow-matching model; use scheduler: model"),
    ("pixart-sigma", dict(shots=1, init_strength=0.5), "has none in diffusers"),
    ("sd3", dict(generate=dict(deepcache_interval=3)), "works on UNets"),
    ("sdxl", dict(safety_checker="keep"), "ships no safety checker"),
    ("sdxl", dict(negative_prompt="blurry", guidance=1.0), "off at guidance 1"),
])
def test_a_setting_the_familys_pipeline_lacks_is_one_line_before_any_drawing(tmp_path, family_models, family,
                                                                              change, message):
    p = family_params(tmp_path, family_models[family])
    generate = change.pop("generate", {})
    p = dataclasses.replace(p, generate=dataclasses.replace(p.generate, **generate), **change)
    with pytest.raises(UserError, match=message) as info:
        generation.generator_facts(p, "weights")      # what make_plan asks before the work folder's key
    assert "\n" not in str(info.value)


def test_a_pipeline_of_no_known_family_is_refused_by_name(tmp_path, tiny_model):
    folder = tmp_path / "video"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "TextToVideoSDPipeline"}))
    with pytest.raises(UserError, match="is a TextToVideoSDPipeline; sd-generate runs the text-to-image pipelines"):
        sd_model.family(str(folder), "profiles.embedded.generate.model")


# --------------------------------------------------------------------------- prices from the real configs

@pytest.mark.slow
@pytest.mark.parametrize("folder, resolution, steps, guidance, calls, low, high", [
    ("sdxl-base-1.0", 1024, 50, 5.0, 50, 600, 760),
    ("sdxl-turbo", 512, 1, 0.0, 1, 3, 6),
    ("sd-turbo", 512, 1, 0.0, 1, 2, 5),
    ("sd3-medium", 1024, 28, 7.0, 28, 450, 580),
    ("pixart-sigma-xl-2-1024-ms", 1024, 20, 4.5, 20, 240, 320),
    ("flux1-schnell", 1024, 4, 0.0, 4, 270, 360),
])
def test_each_familys_price_is_counted_from_its_shipped_configs(folder, resolution, steps, guidance, calls, low, high):
    flops = estimates.count_flops(str(DATA / folder), resolution, steps, guidance, local_files_only=True)
    assert flops.unet_calls == calls and low < flops.per_image / 1e12 < high


@pytest.mark.slow
# At the resolutions of the prices above: a process counts a configuration once (estimates._PER_CALL), so
# the shapes the prices counted are not counted again (a few seconds each).
def test_guidance_doubles_the_denoiser_only_where_the_family_has_an_unconditional_branch():
    def call(folder, guidance):
        return estimates.count_flops(str(DATA / folder), 1024, 1, guidance, local_files_only=True).unet_call
    assert call("sd3-medium", 7.0) == pytest.approx(2 * call("sd3-medium", 1.0), rel=1e-6)
    assert call("flux1-schnell", 7.0) == call("flux1-schnell", 1.0)


@pytest.mark.slow
def test_a_longer_t5_sequence_costs_more_text_encoding():
    short, long = (estimates.count_flops(str(DATA / "flux1-schnell"), 1024, 4, 0.0, local_files_only=True,
                                         max_sequence_length=n) for n in (256, 512))   # 512: the price's
    assert long.text_encoder > 1.9 * short.text_encoder - 1e12 and long.unet_call > short.unet_call


def test_sana_prices_its_gemma_at_max_sequence_length_on_its_dc_ae_latents(family_models):
    """SANA, the family docs/layout.md#a-generator-family adds: its own module and registry line only."""
    model = str(family_models["sana"])
    assert sd_model.vae_scale_factor(model) == 4            # the tiny DC-AE's 3 blocks (SANA's own: 6, 32 px)
    with pytest.raises(UserError, match="use a multiple of 4"):
        families.check_resolution(families.FAMILIES["sana"], 66, "k", model, 4)
    short, long = (estimates.count_flops(model, 64, 2, 4.5, max_sequence_length=n) for n in (100, 300))
    assert long.text_encoder > 2.5 * short.text_encoder and long.unet_call > short.unet_call
    by_name = {s.name: s for s in catalog.groups()["generators"]}
    assert by_name["generator-sana"].per_profile["embedded"] == {"generate.model": "models/tiny-sana"}


# --------------------------------------------------------------------------- add-ons

@pytest.mark.slow
def test_deepcache_and_token_merging_change_the_pixels_keep_the_seeds_and_cost_less(tmp_path, tiny_model):
    plain = make_params(tmp_path, tiny_model, steps=6)
    out = {}
    for name, generate in (("plain", {}), ("deepcache", dict(deepcache_interval=3)),
                           ("tome", dict(token_merging=0.5))):
        p = dataclasses.replace(plain, generate=dataclasses.replace(plain.generate, **generate))
        plan = generation.make_plan(p, rows(), [])
        run_generate(p, tmp_path / name)
        out[name] = (plan, {k: j for path in shards.list_shards(tmp_path / name) for k, j, _ in shards.iter_shard(path)})
    assert len({plan.folder.name for plan, _ in out.values()}) == 3
    assert out["deepcache"][0].recipe["deepcache_interval"] == 3 and "DeepCache" in out["deepcache"][0].recipe["libraries"]
    for name in ("deepcache", "tome"):
        assert out[name][1].keys() == out["plain"][1].keys() and out[name][1] != out["plain"][1]
    sd14 = dict(resolution=512, steps=50, guidance=7.5, local_files_only=True)
    base = estimates.count_flops(str(DATA / "sd-v1-4"), **sd14).per_image
    cached = estimates.count_flops(str(DATA / "sd-v1-4"), deepcache_interval=3, **sd14)
    merged = estimates.count_flops(str(DATA / "sd-v1-4"), token_merging=0.5, **sd14).per_image
    assert cached.unet_calls == 17 and cached.cached_calls == 34 and cached.per_image < 0.5 * base
    assert merged < 0.95 * base


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_model) -> Path:
    """A LoRA of rank 2 on the tiny SD's attention projections, with random (non-zero) weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    torch.manual_seed(0)
    layers = {k: torch.randn_like(v) * 0.5 for k, v in get_peft_model_state_dict(pipe.unet).items()}
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / sd_model.LORA_FILE


@pytest.mark.slow
def test_a_lora_is_fused_at_its_scale_and_keyed_by_its_weights(tmp_path, tiny_model, lora_file):
    plain = make_params(tmp_path, tiny_model)

    def images(**generate):
        p = dataclasses.replace(plain, generate=dataclasses.replace(plain.generate, **generate))
        out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
        run_generate(p, out)
        plan = generation.make_plan(p, rows(), [])
        return plan, {k: j for path in shards.list_shards(out) for k, j, _ in shards.iter_shard(path)}

    base_plan, base = images()
    lora_plan, with_lora = images(lora=str(lora_file))
    zero_plan, at_zero = images(lora=str(lora_file), lora_scale=0.0)
    assert with_lora != base and at_zero == base                  # scale 0 fuses nothing in
    assert lora_plan.recipe["lora_weights"] == sd_model.lora_fingerprint(str(lora_file), "k")
    assert len({base_plan.folder, lora_plan.folder, zero_plan.folder}) == 3
    with pytest.raises(UserError, match="no such file or folder, and not a Hugging Face id"):
        sd_model.lora_source(str(tmp_path / "missing.safetensors"), "profiles.embedded.generate.lora")


def test_a_lora_that_fails_to_load_leaves_no_work_folder_behind(tmp_path, tiny_model):
    """A LoRA that is no safetensors file fails in one line when the pipeline loads, and no empty key folder
    is left in generate.work_dir: a new work folder appears only once the model and its LoRA have loaded."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file" * 64)
    p = make_params(tmp_path, tiny_model, generate={"lora": str(junk)})
    plan = generation.make_plan(p, rows(), [])          # the LoRA's sha256 is in the key: it is read, not loaded
    generation.check(p, plan)                           # the launcher's check makes no key folder either
    with pytest.raises(UserError) as info:
        generation.generate(p, plan, tmp_path / "out", tmp_path / "metrics.json")
    message = str(info.value)
    assert message.startswith(f"profiles.embedded.generate.lora = {str(junk)!r}: not a LoRA this pipeline can "
                              "load (") and "\n" not in message, message
    assert not plan.folder.exists() and not (tmp_path / "out").exists() and not (tmp_path / "metrics.json").exists()
    assert sorted(e.name for e in p.generate.work_dir.iterdir()) == ["real-counts"]     # the real folder's listing


# --------------------------------------------------------------------------- upgrading

OLD_RECORD = ("wnid", "class", "label", "image_index", "prompt", "seed", "attempt", "guidance", "steps", "scheduler",
              "model", "resolution", "flagged")      # a record before issue 23


@pytest.mark.slow
def test_shards_made_before_records_named_their_generator_are_adopted_not_drawn(tmp_path, tiny_model):
    p = make_params(tmp_path, tiny_model)
    out = tmp_path / "synthetic"
    run_generate(p, out)
    published = {path.name: path.read_bytes() for path in shards.list_shards(out)}
    plan = generation.make_plan(p, rows(), [])
    # The folder the same run had before issue 23: old records, under the old key.
    old_folder = plan.folder.parent / generation.work_key(adopt.previous_recipe(plan.recipe))
    old_folder.mkdir()
    for name in shards.finished_in(plan.folder):
        samples = [(k, j, {f: r[f] for f in OLD_RECORD}) for k, j, r in shards.iter_shard(plan.folder / name)]
        size, sha256 = shards.write_shard(old_folder / name, samples)
        shards.write_manifest(old_folder / name, {"bytes": size, "sha256": sha256, "images": len(samples)})
    for path in plan.folder.iterdir():
        path.unlink() if path.is_file() else None
    metrics = run_generate(p, out)
    assert metrics["generated"] == 0                               # nothing drawn again
    assert {path.name: path.read_bytes() for path in shards.list_shards(out)} == published
    # Another family, or a setting that did not exist then, never had an old folder.
    assert adopt.previous_recipe({**plan.recipe, "pipeline": "FluxPipeline"}) is None
    assert adopt.previous_recipe({**plan.recipe, "negative_prompt": "blurry"}) is None
