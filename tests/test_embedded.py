"""The embedded tiny Stable Diffusion: deterministic, idempotent, SD v1's architecture."""
import hashlib
import json
from pathlib import Path

import pytest

from imagenet_sd.models import embedded

SD = Path(__file__).resolve().parents[1] / "data" / "sd-v1-4"


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "tiny-sd"
    assert embedded.build(out) is True
    return out


def test_two_builds_give_identical_files(built, tmp_path):
    again = tmp_path / "again"
    embedded.build(again)
    first, second = digests(built), digests(again)
    assert any(name.endswith(".safetensors") for name in first)
    assert first == second


def test_build_is_skipped_when_current_and_redone_when_not(built, tmp_path):
    assert embedded.build(built) is False
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / embedded.MARKER).write_text(json.dumps({"version": embedded.VERSION - 1}))
    assert not embedded.is_current(stale)
    assert embedded.build(stale) is True
    assert embedded.is_current(stale) and (stale / "unet" / "config.json").is_file()
    # No temporary build folders are left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale"]


def test_architecture_follows_sd_v14(built):
    unet = json.loads((built / "unet" / "config.json").read_text())
    sd_unet = json.loads((SD / "unet" / "config.json").read_text())
    for key in ("down_block_types", "up_block_types", "in_channels", "out_channels"):
        assert unet[key] == sd_unet[key], key
    text = json.loads((built / "text_encoder" / "config.json").read_text())
    assert unet["cross_attention_dim"] == text["hidden_size"]
    assert text["max_position_embeddings"] == 77
    vae = json.loads((built / "vae" / "config.json").read_text())
    assert len(vae["block_out_channels"]) == 4          # 3 downsamplings: latents are 1/8 of the image
    assert vae["latent_channels"] == 4 and vae["scaling_factor"] == pytest.approx(0.18215)
    scheduler = json.loads((built / "scheduler" / "scheduler_config.json").read_text())
    sd_scheduler = json.loads((SD / "scheduler" / "scheduler_config.json").read_text())
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "skip_prk_steps",
                "steps_offset", "set_alpha_to_one"):
        assert scheduler[key] == sd_scheduler[key], key
    index = json.loads((built / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_tokenizer_is_bytewise_and_truncates_at_77_tokens(built):
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(built / "tokenizer")
    assert len(tokenizer) == 514 and tokenizer.model_max_length == 77
    ids = tokenizer("tench, fish").input_ids
    # start, one token per non-space character, end
    assert len(ids) == 2 + len("tench,fish")
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    long = tokenizer("x" * 100, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[-1] == tokenizer.eos_token_id
    # Any text encodes without unknown tokens: every byte has a symbol.
    assert tokenizer.unk_token_id not in tokenizer("café Zürich ü").input_ids[1:-1]
