"""Fixtures shared by the test modules."""
from pathlib import Path

import pytest
import torch
import torchvision

from imagenet_sd import embedded

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The embedded tiny SD: models/tiny-sd when setup built the current version, else a fresh build."""
    if embedded.is_current(ROOT / "models" / "tiny-sd"):
        return ROOT / "models" / "tiny-sd"
    out = tmp_path_factory.mktemp("model") / "tiny-sd"
    embedded.build(out)
    return out


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
