"""Every registered generator family, filter and test set is documented and tested (docs/layout.md#extending): a
registry entry this manual or the tests do not mention fails here, naming what to add."""
import re
from pathlib import Path

import pytest

from imagenet_sd.datasets.imagenet_sets import TEST_SETS
from imagenet_sd.filter.registry import FILTERS
from imagenet_sd.models.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]


def section(page: str, heading: str) -> str:
    """The text of a Markdown section (up to the next heading of any level)."""
    text = (ROOT / "docs" / page).read_text()
    start = text.index(heading)
    following = re.search(r"^#", text[start + len(heading):], re.MULTILINE)
    return text[start:start + len(heading) + following.start()] if following else text[start:]


def mentioned_in_tests(name: str) -> list[str]:
    """The test files (this one aside) that name `name` as a string literal."""
    return [p.name for p in sorted((ROOT / "tests").glob("test_*.py"))
            if p.name != Path(__file__).name and re.search(rf"""["']{re.escape(name)}["']""", p.read_text())]


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_every_filter_is_documented_and_tested(name):
    row = next(line for line in section("parameters.md", "## Top level").splitlines() if line.startswith("| `filter` |"))
    assert f"`{name}`" in row, f"docs/parameters.md: name and describe `{name}` in the `filter` row"
    assert mentioned_in_tests(name), f"no test runs filter {name!r}: add one (docs/layout.md#a-dataset-filter)"


@pytest.mark.parametrize("name", sorted(TEST_SETS))
def test_every_test_set_is_documented_and_tested(name):
    table = section("evaluation.md", "### Test sets")
    assert re.search(rf"^\| [^|]*`{re.escape(name)}`", table, re.MULTILINE), \
        f"docs/evaluation.md#test-sets: add a row for `{name}` (its layout and where it comes from)"
    assert mentioned_in_tests(name), f"no test scans test set {name!r}: add one (docs/layout.md#an-imagenet-style-test-set)"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_generator_family_is_documented_and_tested(name):
    table = section("generating.md", "## Generators")
    assert re.search(rf"^\| `{re.escape(name)}` \| `{FAMILIES[name].pipeline}`", table, re.MULTILINE), \
        f"docs/generating.md#generators: add a row for `{name}` (its pipeline, checkpoints, what it takes)"
    assert FAMILIES[name].tiny is not None, (f"family {name!r} has no tiny model: tests/test_families.py runs "
                                             "every family's through sd-generate (docs/layout.md#a-generator-family)")
