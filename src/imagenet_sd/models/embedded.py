"""The embedded default generator: a tiny Stable Diffusion v1, built here with random weights.

It has SD v1's architecture and pipeline (CLIP text encoder -> cross-attention
UNet -> KL autoencoder that downsamples by 8, the real SD v1.4 PNDM scheduler
config, and SD's safety checker on a tiny CLIP image encoder) at a size that loads in a second and draws 64x64 images on two CPU
cores, so the whole pipeline runs anywhere without downloads. Its images are
not pictures of the class; they only exercise the same code path as SD v1.4
(`sd_model.load_pipeline` loads both the same way).

Weights are drawn from fixed seeds, so every build gives identical weights and
the embedded profile's results are reproducible across machines.

Tokenizer: CLIP's byte-level BPE with the 256 byte symbols (plain and with the
end-of-word mark "</w>") and no merges, so every non-space character is one
token. Prompts longer than ~75 characters (not 75 BPE tokens, as in SD) are
truncated by the pipeline, as SD truncates at 77 tokens.

Build: `python -m imagenet_sd.models.embedded models/tiny-sd` (setup runs it; it does
nothing when the folder already holds the current VERSION).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from imagenet_sd.core.paths import DATA

VERSION = 3
MARKER = "embedded.json"
SD_V14_DIR = DATA / "sd-v1-4"
DEFAULT_DIR = Path("models/tiny-sd")

MAX_TOKENS = 77                       # CLIP's context length, as in SD v1
TEXT_HIDDEN = 32
UNET_CHANNELS = (16, 16, 32, 32)
VAE_CHANNELS = (16, 16, 32, 32)
LATENT_CHANNELS = 4
VAE_SCALING = 0.18215                 # SD v1's latent scaling factor
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# One seed per component, so changing one component leaves the others' weights as they were.
SEEDS = {"text_encoder": 1, "unet": 2, "vae": 3, "safety_checker": 4}
SAFETY_IMAGE_SIZE = 32


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2/CLIP table)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def vocabulary() -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def _tokenizer(workdir: Path):
    from transformers import CLIPTokenizer
    files = workdir / "tokenizer-source"
    files.mkdir()
    (files / "vocab.json").write_text(json.dumps(vocabulary(), ensure_ascii=False))
    (files / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(files, model_max_length=MAX_TOKENS)


def _text_encoder(vocab_size: int, tokenizer):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu", projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEEDS["text_encoder"])
    return CLIPTextModel(config).eval()


def _unet():
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(SEEDS["unet"])
    # attention_head_dim is the number of heads here (diffusers keeps SD v1's naming): 2 heads.
    return UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=UNET_CHANNELS, layers_per_block=1, attention_head_dim=2,
        norm_num_groups=8, cross_attention_dim=TEXT_HIDDEN,
    ).eval()


def _vae():
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(SEEDS["vae"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS, layers_per_block=1, norm_num_groups=8,
        sample_size=64, scaling_factor=VAE_SCALING,
    ).eval()


def _safety_checker():
    """SD's safety checker (a CLIP image encoder + concept thresholds), tiny and random.

    diffusers initialises every concept embedding and threshold to 1, so a cosine
    score never exceeds its threshold: this checker flags nothing until a test
    lowers `concept_embeds_weights`. It is there so that `safety_checker: keep |
    regenerate` runs the same code as with SD v1.4.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    torch.manual_seed(SEEDS["safety_checker"])
    return StableDiffusionSafetyChecker(clip_config()).eval()


def clip_config(**text):
    """The tiny CLIP of the safety checker (a 32 px vision tower); `text` overrides the text
    tower's settings (vocabulary, special tokens) for a CLIP that also reads text (tiny_clip)."""
    from transformers import CLIPConfig
    return CLIPConfig(
        text_config=dict(hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=MAX_TOKENS, **text),
        vision_config=dict(hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=2,
                           num_attention_heads=4, image_size=SAFETY_IMAGE_SIZE, patch_size=8),
        projection_dim=TEXT_HIDDEN)


def _feature_extractor():
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(size={"shortest_edge": SAFETY_IMAGE_SIZE},
                              crop_size={"height": SAFETY_IMAGE_SIZE, "width": SAFETY_IMAGE_SIZE})


def assemble(workdir: Path):
    """The tiny StableDiffusionPipeline (random weights, fixed seeds), not yet saved."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    tokenizer = _tokenizer(workdir)
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=_text_encoder(len(tokenizer), tokenizer), tokenizer=tokenizer,
        unet=_unet(), scheduler=PNDMScheduler.from_pretrained(SD_V14_DIR / "scheduler"),
        safety_checker=_safety_checker(), feature_extractor=_feature_extractor(), requires_safety_checker=True)


def is_current(out_dir: Path, marker: str = MARKER, version: int = VERSION) -> bool:
    try:
        return json.loads((Path(out_dir) / marker).read_text()).get("version") == version
    except (OSError, ValueError):
        return False


def build_folder(out_dir: Path, save: Callable[[Path, Path], None], marker: str, version: int) -> bool:
    """Build a model folder with `save(workdir, folder)` unless `out_dir` holds `version`; True if built.

    It is built in a temporary folder beside `out_dir` and renamed into place, and the
    marker is written last, so an interrupted build never looks complete.
    """
    out_dir = Path(out_dir)
    if is_current(out_dir, marker, version):
        return False
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        model_dir = tmp / "model"
        save(tmp, model_dir)
        (model_dir / marker).write_text(json.dumps({"version": version}) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        model_dir.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def build(out_dir: Path) -> bool:
    """Build the tiny Stable Diffusion into `out_dir` unless it is there and current; True if built."""
    return build_folder(out_dir, lambda work, folder: assemble(work).save_pretrained(folder, safe_serialization=True),
                        MARKER, VERSION)


def build_command(argv: list[str], default_dir: Path, build_into, what: str, version: int) -> None:
    """`python -m imagenet_sd.<component> [folder]`: build an embedded component unless it is current."""
    out_dir = Path(argv[0]) if argv else default_dir
    if build_into(out_dir):
        print(f"built the embedded {what} (version {version}) -> {out_dir}")
    else:
        print(f"{out_dir}: embedded {what} version {version} already built")


def main(argv: list[str]) -> None:
    build_command(argv, DEFAULT_DIR, build, "tiny Stable Diffusion", VERSION)


if __name__ == "__main__":
    main(sys.argv[1:])
