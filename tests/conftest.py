"""Fixtures shared by the test modules."""
from pathlib import Path

import pytest

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
