"""sd_model.load_pipeline applies generate's speed params: attention, channels_last, compile."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import embedded_raw
from imagenet_sd.core import params as params_module
from imagenet_sd.generate import worker
from imagenet_sd.models import sd_model

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
DRAW = dict(guidance=7.5, steps=3, resolution=64)
PROCESSORS = {"sdpa": "AttnProcessor2_0", "math": "MathAttnProcessor", "classic": "AttnProcessor"}


def load(tiny_model, **settings):
    return sd_model.load_pipeline(str(tiny_model), CPU, torch.float32, **settings)


def pixels(pipe) -> np.ndarray:
    images, _ = sd_model.draw(pipe, ["tench", "goldfish"], [11, 12], **DRAW)
    return np.stack([np.asarray(image, dtype=int) for image in images])


def conv_weights(pipe) -> list[torch.Tensor]:
    """The 3x3 convolution weights of UNet and VAE (1x1 ones are contiguous in both layouts)."""
    return [m.weight for module in (pipe.unet, pipe.vae) for m in module.modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]


@pytest.mark.parametrize("attention", sorted(PROCESSORS))
def test_attention_sets_the_processor_of_unet_and_vae(tiny_model, attention):
    pipe = load(tiny_model, attention=attention)
    for module in (pipe.unet, pipe.vae):
        assert {type(p).__name__ for p in module.attn_processors.values()} == {PROCESSORS[attention]}


def test_math_attention_holds_sdpa_to_its_math_kernel(tiny_model, monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for attention, flags in (("math", (False, True)), ("sdpa", (True, True))):
        pipe, seen[:] = load(tiny_model, attention=attention), []
        latents = torch.randn(1, pipe.unet.config.in_channels, 8, 8)
        text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
        with torch.no_grad():          # UNet and VAE only: the text encoder's attention is not theirs
            pipe.unet(latents, 1, encoder_hidden_states=text)
            pipe.vae.decode(latents)
        assert seen and set(seen) == {flags}, attention
    assert torch.backends.cuda.flash_sdp_enabled()       # the math context ends with each call


def test_channels_last_lays_out_the_convolutions_nhwc(tiny_model):
    weights = conv_weights(load(tiny_model, channels_last=True))
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(load(tiny_model)))


@pytest.mark.slow
def test_speed_settings_give_the_same_images_up_to_rounding(tiny_model):
    plain = pixels(load(tiny_model))
    for settings in ({"attention": "math"}, {"attention": "classic"}, {"channels_last": True}):
        other = pixels(load(tiny_model, **settings))
        # Other kernels round the last float bit differently: a rare pixel moves one grey
        # level (measured: at most 0.01 % of them), which is why these params are not in
        # the work folder's key but can change the JPEG bytes.
        assert np.abs(plain - other).max() <= 1 and (plain != other).mean() < 0.01, settings
    assert np.abs(plain[0] - plain[1]).mean() > 1        # another seed: another image


def test_compile_is_wired_without_compiling(tiny_model, monkeypatch):
    # A real compile of the tiny UNet takes 45-95 s on two CPU cores, too slow for a test;
    # it was run by hand (same images up to one grey level) and on a GPU it is measured by
    # scripts/benchmark_generate.py. Here: load_pipeline hands the UNet to torch.compile
    # with the mode sd-generate uses, and draws with what comes back.
    calls = []

    def fake_compile(module, **options):
        calls.append((module, options))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    load(tiny_model)
    assert not calls
    pipe = load(tiny_model, compile=True)
    assert len(calls) == 1 and calls[0][0] is pipe.unet
    assert calls[0][1] == {"mode": "default", "fullgraph": True}
    assert sd_model.compile_mode(torch.device("cuda")) == "reduce-overhead"


def test_the_stage_loads_the_pipeline_with_the_speed_params(tiny_model, monkeypatch):
    p = params_module.parse(embedded_raw())
    p = dataclasses.replace(p, generate=dataclasses.replace(p.generate, model=str(tiny_model), attention="classic",
                                                            channels_last=True, compile=True))
    seen = {}
    monkeypatch.setattr(sd_model, "load_pipeline", lambda *args, **kwargs: seen.update(kwargs))
    worker.load_generator(p, CPU, torch.float32)
    assert {k: seen.get(k) for k in ("attention", "channels_last", "compile")} == \
        {"attention": "classic", "channels_last": True, "compile": True}


def test_a_model_path_that_names_no_folder_fails_at_once_without_asking_the_hub(tmp_path, monkeypatch):
    """`models/does-not-exist`, `./x`, `/abs/x`, `~/x`: a path, never a Hub id, so a missing one is one line at
    once instead of half a minute of Hub retries; an org/name id is still left to the Hub."""
    import socket
    import time

    import huggingface_hub
    from diffusers import DiffusionPipeline  # noqa: F401  (imported here, so that the timing below is the lookup's)
    from huggingface_hub import constants, file_download

    from imagenet_sd.core.errors import UserError
    from imagenet_sd.language import language
    from imagenet_sd.models import clip_model, hub

    def no_network(*args, **kwargs):
        pytest.fail(f"the Hub (or any host) was asked: {args}")

    for module, name in ((huggingface_hub, "hf_hub_download"), (huggingface_hub, "snapshot_download"),
                         (huggingface_hub, "try_to_load_from_cache"), (huggingface_hub, "model_info"),
                         (file_download, "hf_hub_download"), (socket, "getaddrinfo"), (socket, "create_connection")):
        monkeypatch.setattr(module, name, no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)       # online: the retries it used to make
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()                            # as in the repository: models/tiny-sd, ...
    key = "profiles.embedded.generate.model"
    for model, why in (("models/does-not-exist", "as 'models' is a local folder"),
                       ("./x", "as it starts with './'"), ("../x", "as it starts with '../'"),
                       (str(tmp_path / "abs" / "x"), "as it starts with '/'"), ("~/x", "as it starts with '~'"),
                       ("a/b/c", "as it has more than one '/'")):
        for load in (lambda: sd_model.load_pipeline(model, CPU, torch.float32, key=key),
                     lambda: sd_model.fingerprint(model, key), lambda: clip_model.locate(model, key),
                     lambda: language.locate(model, key)):
            started = time.monotonic()
            with pytest.raises(UserError) as info:
                load()
            assert time.monotonic() - started < 1
            message = str(info.value)
            assert message.startswith(f"{key} = {model!r}: model not found (no such folder; read as a path, not a "
                                      f"Hugging Face id, {why}); no folder ") and "\n" not in message, message
            assert "hf download" not in message and "Hugging Face cache" not in message
    with pytest.raises(UserError, match="'models/no-lora': no such file or folder, and not a Hugging Face id"):
        sd_model.lora_source("models/no-lora", "profiles.embedded.generate.lora")
    # Hub ids are still the Hub's (looked up when loaded; only offline mode checks the cache here).
    for model in ("CompVis/stable-diffusion-v1-4", "stabilityai/sd-turbo"):
        assert sd_model.locate(model, key) == model and hub.path_reason(model) is None
    assert sd_model.lora_source("latent-consistency/lcm-lora-sdv1-5", "k") == ("latent-consistency/lcm-lora-sdv1-5", {})
    (tmp_path / "models").rmdir()                            # no local folder models/: models/x may be an id
    assert hub.path_reason("models/x") is None and sd_model.locate("models/x", key) == "models/x"
