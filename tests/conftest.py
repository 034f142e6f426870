"""Fixtures shared by the test modules."""
from pathlib import Path

import pytest
import torch
import torchvision

from imagenet_sd import embedded, tiny_clip, tiny_t5

ROOT = Path(__file__).resolve().parents[1]


def built(component, tmp_path_factory) -> Path:
    """An embedded component's folder: the one setup built when it is current, else a fresh build."""
    if component.is_current(ROOT / component.DEFAULT_DIR):
        return ROOT / component.DEFAULT_DIR
    out = tmp_path_factory.mktemp("model") / component.DEFAULT_DIR.name
    component.build(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The embedded tiny SD (models/tiny-sd)."""
    return built(embedded, tmp_path_factory)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """The embedded tiny CLIP (models/tiny-clip)."""
    return built(tiny_clip, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """The embedded tiny T5 (models/tiny-t5)."""
    return built(tiny_t5, tmp_path_factory)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A train-resnet50 checkpoint of 10 classes with seeded random weights, for the evaluation stages."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    path = tmp_path_factory.mktemp("model") / "resnet50.pt"
    keys = [f"class{i}" for i in range(10)]
    torch.save({"arch": "resnet50", "classes": keys, "wnids": [""] * 10, "state_dict": model.state_dict(),
                "image_size": 32, "params": {}}, path)
    return path
