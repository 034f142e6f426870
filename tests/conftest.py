"""Fixtures shared by the test modules."""
import os
from pathlib import Path

import pytest
import torch
import torchvision

from imagenet_sd.models import embedded, tiny_clip, tiny_t5

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Under pytest-xdist (README: `pytest -n 2`) the workers share the cores: one thread each, in
    # this process and in the stages it starts, or two workers' torch threads spin-wait for each other.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    # The slow whole-pipeline tests first: under `-n 2 --dist loadfile` one worker starts on them while
    # the other works through the rest, instead of one worker finishing them alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def set_param(raw: dict, dotted: str, value) -> None:
    """raw params (params.yaml as loaded) with the key `a.b.c` set to `value`."""
    *parents, last = dotted.split(".")
    for part in parents:
        raw = raw[part]
    raw[last] = value


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
