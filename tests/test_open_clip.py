"""CLIP through OpenCLIP (`open_clip:...`, models/open_clip_model.py): the embedded tiny OpenCLIP with a
ResNet image tower, its features and scores against open_clip's own forward, its spellings, and He et
al.'s RN50 found in the Hugging Face cache offline."""
import ast
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import noise_jpeg
from imagenet_sd.clip_tune import features, tuning
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import shard_images
from imagenet_sd.models import clip_model, open_clip_model, tiny_open_clip

ROOT = Path(__file__).resolve().parents[1]
KEY = "profiles.embedded.filter.model"
CPU = torch.device("cpu")
TEXTS = ["a photo of a goldfish.", "a photo of a pirate, pirate ship.", "itap of a papillon " * 30]


def spelled(folder: Path) -> str:
    return f"open_clip:local-dir:{folder}"


def test_the_tiny_open_clip_is_a_resnet_built_to_the_same_bytes(tmp_path, open_clip_dir):
    import open_clip  # here, not at the top: collecting the suite does not pay its import
    tiny_open_clip.build(tmp_path / "again")
    for name in (tiny_open_clip.WEIGHTS, open_clip_model.CONFIG):
        assert (tmp_path / "again" / name).read_bytes() == (open_clip_dir / name).read_bytes(), name
    net, _ = open_clip.create_model_from_pretrained(f"local-dir:{open_clip_dir}")
    assert type(net.visual).__name__ == "ModifiedResNet"       # RN50's kind of image tower, at toy size


def test_its_features_and_scores_are_open_clips_own(open_clip_dir):
    """Through the interface both stages read (clip_model's text_features, class_directions and score_batch,
    clip-tune's ImageTower and Preprocess), an OpenCLIP model gives what open_clip itself computes."""
    import open_clip
    clip = clip_model.load(spelled(open_clip_dir), KEY, CPU)
    net, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{open_clip_dir}")
    net.eval()
    tokenize = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")
    images = [Image.open(io.BytesIO(noise_jpeg(9, i))).convert("RGB") for i in range(3)]
    with torch.no_grad():
        texts = F.normalize(net.encode_text(tokenize(TEXTS)), dim=-1)            # the long text is cut, EOT kept
        pixels = torch.stack([preprocess(image) for image in images])
        image = F.normalize(net.encode_image(pixels), dim=-1)
        logits, _ = net.get_logits(pixels, tokenize(TEXTS))
    ours = clip_model.text_features(clip, TEXTS, CPU)
    assert torch.allclose(ours, texts, atol=1e-6)
    assert torch.allclose(clip_model.class_directions(clip, TEXTS, ("{}",), CPU), texts, atol=1e-6)
    assert torch.equal(clip.processor(images=images, return_tensors="pt")["pixel_values"], pixels)
    assert torch.equal(features.Preprocess(clip.processor)(images[0]), pixels[0])
    with torch.no_grad():
        assert torch.allclose(features.ImageTower(clip)(pixels), image, atol=1e-6)
    head = tuning.zero_shot_head(ours, tuning.logit_scale(clip))      # the zero-shot head is open_clip's logits
    with torch.no_grad():
        assert torch.allclose(head(features.ImageTower(clip)(pixels)), logits, atol=1e-4)
    own, best = clip_model.score_batch(clip, pixels, ours, torch.tensor([0, 1, 2]))
    probability = logits.softmax(dim=-1)
    assert np.allclose(own, probability.diagonal().numpy(), atol=1e-5)
    assert best.tolist() == probability.argmax(dim=-1).tolist()
    # The shards' reader decodes JPEGs at a reduced scale no smaller than the model's 64 px input.
    assert shard_images.input_size(clip.processor) == tiny_open_clip.IMAGE_SIZE
    assert features.ImageTower(clip).model.visual_projection.out_features == tiny_open_clip.MODEL_CFG["embed_dim"]


@pytest.mark.parametrize("model, says", [
    ("open_clip:", "not an architecture and its pretrained tag"),
    ("open_clip:RN50", "not an architecture and its pretrained tag"),
    ("open_clip:ViT-B/32/openai", "OpenCLIP spells OpenAI's ViT-B/32 ViT-B-32"),
    ("open_clip:RN51/openai", "'RN51' is not an OpenCLIP architecture (did you mean RN50"),
    ("open_clip:RN50-quickgelu/laion", "RN50-quickgelu has no pretrained tag 'laion'; its tags: openai"),
    ("open_clip:RN50/openai", "trained with QuickGELU and RN50 is built with GELU; write open_clip:RN50-quickgelu/openai"),
    ("open_clip:local-dir:", "no folder after local-dir:"),
    ("open_clip:local-dir:/no/such/folder", "no such folder '/no/such/folder'"),
    ("open_clip:hf-hub:no such repo", "'no such repo' is not a Hugging Face id"),
])
def test_a_bad_open_clip_name_is_one_line_saying_how_to_write_it(model, says):
    with pytest.raises(UserError) as error:
        clip_model.weights(model, KEY)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{KEY} = {model!r}: ") and says in message, message


def test_a_folder_is_spelled_local_dir_and_must_be_an_open_clip_one(tmp_path, monkeypatch, clip_dir):
    with pytest.raises(UserError, match=rf"spelled with open_clip's local-dir schema: open_clip:local-dir:{tmp_path}$"):
        clip_model.load(f"open_clip:{tmp_path}", KEY, CPU)
    with pytest.raises(UserError, match=r"not an OpenCLIP model folder \(no open_clip_config.json\)"):
        clip_model.load(spelled(clip_dir), KEY, CPU)              # a transformers folder
    monkeypatch.chdir(tmp_path)                                   # where the embedded one is not built
    with pytest.raises(UserError, match=r"no such folder .*; the embedded tiny OpenCLIP is built by: dvc repro "
                                        r"embedded-assets$"):
        clip_model.weights(open_clip_model.EMBEDDED, KEY)


def test_he_et_al_s_rn50_is_read_from_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    """open_clip:RN50-quickgelu/openai: OpenAI's RN50 as open_clip fetches it (its tag's Hub repository,
    timm/resnet50_clip.openai), from the cache alone under HF_HUB_OFFLINE, fingerprinted by its commit."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = "open_clip:RN50-quickgelu/openai"
    with pytest.raises(UserError) as error:
        clip_model.weights(model, KEY)
    assert "not in the Hugging Face cache, and HF_HUB_OFFLINE is set; fetch them once online: python -c" \
        in str(error.value) and "\n" not in str(error.value)
    repo = tmp_path / "hub" / "models--timm--resnet50_clip.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "snapshots" / "0123abc" / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    assert clip_model.weights(model, KEY) == "timm/resnet50_clip.openai@0123abc"
    assert clip_model.backbone(model, "w") == {"model": model, "backend": "open_clip", "weights": "w"}


def test_only_the_open_clip_path_imports_open_clip():
    """open_clip costs seconds to import: no module imports it at its top, so a transformers model never does."""
    eager = []
    for path in sorted((ROOT / "src/imagenet_sd").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            eager += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "open_clip"]
    assert not eager, eager
