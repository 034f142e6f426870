"""K-shot subsets (module fewshot, stage few-shot): reproducible, nested, stable, cached, checked."""
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import embedded_raw, run_script
from imagenet_sd.core import io, seeds
from imagenet_sd.core import params as params_module
from imagenet_sd.core.errors import UserError
from imagenet_sd.datasets import fewshot, fixtures
from imagenet_sd.prompts.prompts import ClassPrompt

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = embedded_raw()
NAMES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
KEY = "profiles.embedded.data.train"


def rows() -> list[ClassPrompt]:
    return [ClassPrompt(wnid=w, index=i, c=n, h_c="fish", d_c="", prompt=n) for i, (w, n) in enumerate(NAMES.items())]


def train_folder(root: Path, per_class: int = 20) -> Path:
    for wnid in NAMES:
        folder = root / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / f"{wnid}_{i:04d}.JPEG").write_bytes(f"{wnid} {i}".encode())
        (folder / "notes.txt").write_text("not an image")
    return root


def names(table: list[fewshot.Shot], key: str) -> list[str]:
    return [s.path.split("/")[1] for s in table if s.key == key]


# --------------------------------------------------------------------------- drawing

def test_the_k_shot_set_is_the_k_lowest_ranks_in_rank_order_with_size_and_sha256(tmp_path):
    root = train_folder(tmp_path)
    table = fewshot.draw(rows(), root, 4, seed=0, key=KEY)
    assert [(s.key, s.shot) for s in table] == [(w, i) for w in NAMES for i in range(4)]      # class order, shot order
    for wnid in NAMES:
        files = sorted(p.name for p in (root / wnid).glob("*.JPEG"))
        by_rank = sorted(files, key=lambda f: seeds.derive(0, "shots", wnid, f))
        assert names(table, wnid) == by_rank[:4]
    for s in table:
        assert s.bytes == (root / s.path).stat().st_size and s.sha256 == io.file_sha256(root / s.path)
    assert len({tuple(names(table, w)) for w in NAMES}) == 3        # each class its own draw


def test_draws_are_reproducible_nested_and_depend_on_the_seed(tmp_path):
    root = train_folder(tmp_path)
    by_k = {k: fewshot.draw(rows(), root, k, seed=0, key=KEY) for k in (1, 2, 4, 8, 16)}
    assert fewshot.draw(rows(), root, 8, seed=0, key=KEY) == by_k[8]
    for small, large in ((1, 2), (2, 4), (4, 8), (8, 16)):
        for wnid in NAMES:
            assert names(by_k[large], wnid)[:small] == names(by_k[small], wnid)        # a prefix
    other = fewshot.draw(rows(), root, 4, seed=1, key=KEY)
    assert [names(other, w) for w in NAMES] != [names(by_k[4], w) for w in NAMES]


def test_other_files_coming_or_going_do_not_change_a_set(tmp_path):
    root = train_folder(tmp_path)
    before = fewshot.draw(rows(), root, 2, seed=0, key=KEY)
    wnid = "n01443537"
    unchosen = sorted(set(p.name for p in (root / wnid).glob("*.JPEG")) - set(names(before, wnid)))
    (root / wnid / unchosen[0]).unlink()
    assert fewshot.draw(rows(), root, 2, seed=0, key=KEY) == before


def test_a_folder_of_exactly_k_images_gives_all_of_them(tmp_path):
    root = train_folder(tmp_path, per_class=4)
    table = fewshot.draw(rows(), root, 4, seed=3, key=KEY)
    for wnid in NAMES:
        assert sorted(names(table, wnid)) == sorted(p.name for p in (root / wnid).glob("*.JPEG"))


def test_zero_shots_is_empty_and_reads_no_folder():
    assert fewshot.draw(rows(), None, 0, seed=0, key=KEY) == []
    assert fewshot.draw(rows(), Path("/no/such/folder"), 0, seed=0, key=KEY) == []


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_class_with_too_few_images_is_one_line_naming_it_its_count_and_the_fix(tmp_path):
    root = train_folder(tmp_path, per_class=5)
    for extra in (root / "n01484850").glob("*_000[34].JPEG"):
        extra.unlink()
    with pytest.raises(UserError) as info:
        fewshot.draw(rows(), root, 4, seed=0, key=KEY)
    message = one_line(info)
    assert message.startswith(f"{KEY}: class n01484850 (great white shark) has 3 images in ")
    assert "fewer than shots = 4" in message and "set shots to 3 or less" in message


def test_missing_class_folder_or_root_is_one_line(tmp_path):
    root = train_folder(tmp_path)
    extra = ClassPrompt(wnid="n01491361", index=3, c="tiger shark", h_c="", d_c="", prompt="tiger shark")
    with pytest.raises(UserError) as info:
        fewshot.draw(rows() + [extra], root, 2, seed=0, key=KEY)
    assert "has no folder for class n01491361 (tiger shark)" in one_line(info)
    with pytest.raises(UserError) as info:
        fewshot.draw(rows(), None, 2, seed=0, key=KEY)
    assert f"shots = 2 needs real images, but {KEY} is ''" in one_line(info)
    with pytest.raises(UserError) as info:
        fewshot.draw(rows(), tmp_path / "absent", 2, seed=0, key=KEY)
    assert "no such folder" in one_line(info)


def test_free_form_classes_are_read_from_a_folder_named_by_their_key(tmp_path):
    (tmp_path / "my dog").mkdir()
    for i in range(3):
        (tmp_path / "my dog" / f"{i}.jpg").write_bytes(b"x" * i)
    row = ClassPrompt(wnid="", index=0, c="my dog", h_c="", d_c="", prompt="my dog")
    assert [s.path.split("/")[0] for s in fewshot.draw([row], tmp_path, 2, 0, KEY)] == ["my dog", "my dog"]


def test_draws_are_cached_until_a_class_folder_changes(tmp_path, monkeypatch):
    root, cache = train_folder(tmp_path / "train"), tmp_path / "cache"
    first = fewshot.draw(rows(), root, 2, seed=0, key=KEY, cache_dir=cache)
    assert len(list((cache / "real-shots").glob("*.json"))) == 1
    real_draw = fewshot._draw_class
    calls = []
    monkeypatch.setattr(fewshot, "_draw_class", lambda *a: calls.append(a[1].key) or real_draw(*a))
    assert fewshot.draw(rows(), root, 2, seed=0, key=KEY, cache_dir=cache) == first and calls == []
    # Another K is another cache entry, drawn afresh.
    fewshot.draw(rows(), root, 4, seed=0, key=KEY, cache_dir=cache)
    assert calls == list(NAMES)
    calls.clear()
    time.sleep(0.01)
    (root / "n01440764" / "n01440764_9999.JPEG").write_bytes(b"new")      # the folder's mtime moves
    again = fewshot.draw(rows(), root, 2, seed=0, key=KEY, cache_dir=cache)
    assert calls == list(NAMES)
    expected = sorted([*(p.name for p in (root / "n01440764").glob("*.JPEG"))],
                      key=lambda f: seeds.derive(0, "shots", "n01440764", f))[:2]
    assert names(again, "n01440764") == expected


# --------------------------------------------------------------------------- the table

def test_table_round_trips_and_read_gives_paths_in_shot_order(tmp_path):
    root = train_folder(tmp_path / "train")
    table = fewshot.draw(rows(), root, 3, seed=0, key=KEY)
    path = tmp_path / "shots.tsv"
    fewshot.write(path, table)
    assert path.read_text().splitlines()[0] == "class\tshot\tpath\tbytes\tsha256"
    assert fewshot._rows(path) == table
    relative = fewshot.read(path)
    assert list(relative) == list(NAMES)
    assert relative["n01443537"] == [Path(s.path) for s in table if s.key == "n01443537"]
    assert fewshot.read(path, root)["n01443537"] == [root / s.path for s in table if s.key == "n01443537"]
    loaded = fewshot.load(path, list(NAMES), 3)
    assert loaded.paths == {w: tuple(str(p) for p in relative[w]) for w in NAMES}
    assert loaded.digest == io.file_sha256(path)


def test_zero_shot_table_is_the_header_only(tmp_path):
    path = tmp_path / "shots.tsv"
    fewshot.write(path, [])
    assert path.read_text() == "class\tshot\tpath\tbytes\tsha256\n"
    assert fewshot.read(path) == {}


@pytest.mark.parametrize("keys, k, expected", [
    (list(NAMES)[:2], 2, "has shots of class n01484850, which the prompt table lacks"),
    (list(NAMES) + ["n01491361"], 2, "has 0 shots of class n01491361, but shots = 2"),
    (list(NAMES), 3, "has 2 shots of class n01440764, but shots = 3"),
])
def test_a_stale_table_is_one_line_saying_to_run_the_stage(tmp_path, keys, k, expected):
    path = tmp_path / "shots.tsv"
    fewshot.write(path, fewshot.draw(rows(), train_folder(tmp_path / "train"), 2, seed=0, key=KEY))
    with pytest.raises(UserError, match=expected) as info:
        fewshot.load(path, keys, k)
    assert one_line(info).endswith("run: dvc repro few-shot")


def test_missing_or_foreign_table_is_one_line(tmp_path):
    with pytest.raises(UserError, match="K-shot table not found; run: dvc repro few-shot"):
        fewshot.load(tmp_path / "shots.tsv", list(NAMES), 2)
    (tmp_path / "shots.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(UserError, match="not a K-shot table"):
        fewshot.read(tmp_path / "shots.tsv")


# --------------------------------------------------------------------------- params

def parse(**top) -> params_module.Params:
    raw = copy.deepcopy(DEFAULT)
    raw.update(top)
    return params_module.parse(raw)


def test_defaults_are_zero_shot_text_to_image():
    p = parse()
    assert p.shots == 0 and p.init_strength == 0


@pytest.mark.parametrize("top, expected", [
    ({"shots": -1}, "shots = -1 is not valid; allowed: an integer >= 0"),
    ({"shots": 1.5}, "shots = 1.5 is not valid; allowed: an integer >= 0"),
    ({"shots": "two"}, "shots = 'two' is not valid"),
    ({"shots": 2, "init_strength": 1.5}, "init_strength = 1.5 is not valid; allowed: a number >= 0 and <= 1"),
    ({"shots": 2, "init_strength": -0.1}, "init_strength = -0.1 is not valid"),
    ({"init_strength": 0.5}, "init_strength = 0.5 is not valid; allowed: 0 while shots = 0"),
    ({"shots": 2, "init_strength": 0.01, "steps": 50}, "steps x init_strength >= 1 (steps = 50: at least 0.02)"),
])
def test_bad_few_shot_params_are_one_line(top, expected):
    with pytest.raises(UserError) as info:
        parse(**top)
    assert expected in one_line(info)


def test_good_few_shot_params_parse():
    p = parse(shots=16, init_strength=0.15, steps=50)
    assert (p.shots, p.init_strength) == (16, 0.15)
    assert parse(shots=2, init_strength=1).init_strength == 1.0
    assert parse(shots=4, init_strength=0).shots == 4         # shots alone: the classifier's real images


# --------------------------------------------------------------------------- the stage

def environment() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def run_stage(folder: Path, train: Path | str, **top) -> subprocess.CompletedProcess:
    raw = copy.deepcopy(DEFAULT)
    raw.update(profile="embedded", **top)
    raw["profiles"]["embedded"]["data"]["train"] = str(train)
    raw["profiles"]["embedded"]["generate"]["work_dir"] = str(folder / "work")
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    from imagenet_sd.prompts import prompts
    prompts.write(folder / "prompts.tsv", rows())
    return run_script([sys.executable, str(ROOT / "stages" / "few_shot.py"), "--params", str(folder / "params.yaml"),
                       "--prompts", str(folder / "prompts.tsv"), "--out", str(folder / "out" / "shots.tsv")],
                      cwd=folder, env=environment())


def fixture_train(root: Path, per_class: int = 3) -> Path:
    """The embedded fixture's train layout: per_class deterministic JPEGs of each class."""
    for wnid in NAMES:
        fixtures._write_folder(root, wnid, wnid, per_class)
    return root


@pytest.mark.slow
def test_stage_writes_the_table_and_zero_shots_writes_the_header(tmp_path):
    train = fixture_train(tmp_path / "train")
    result = run_stage(tmp_path, train, shots=2, seed=5)
    assert result.returncode == 0, result.stderr
    table = tmp_path / "out" / "shots.tsv"
    assert fewshot._rows(table) == fewshot.draw(rows(), train, 2, seed=5, key=KEY)
    assert list((tmp_path / "work" / "real-shots").glob("*.json"))      # cached in the generate work folder
    result = run_stage(tmp_path, "", shots=0)
    assert result.returncode == 0, result.stderr
    assert table.read_text() == "class\tshot\tpath\tbytes\tsha256\n"


@pytest.mark.slow
def test_stage_with_more_shots_than_the_fixture_has_is_one_line(tmp_path):
    # The embedded fixture has 3 to 5 images a class: shots 1 and 2 (He et al.'s K up to 2) run, 4 does not.
    result = run_stage(tmp_path, fixture_train(tmp_path / "train"), shots=4)
    assert result.returncode == 2 and not (tmp_path / "out" / "shots.tsv").exists()
    assert result.stderr.startswith(f"error: {KEY}: class n01440764 (tench) has 3 images in ")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not fixtures.is_current(ROOT / "data" / "fixtures"), reason="setup has not built data/fixtures")
def test_the_embedded_fixture_allows_up_to_three_shots():
    train = ROOT / DEFAULT["profiles"]["embedded"]["data"]["train"]
    wnids = sorted(p.name for p in train.iterdir() if p.is_dir())
    every = [ClassPrompt(wnid=w, index=i, c=w, h_c="", d_c="", prompt=w) for i, w in enumerate(wnids)]
    assert len(fewshot.draw(every, train, 3, seed=0, key=KEY)) == 3 * len(wnids)
    with pytest.raises(UserError, match="has 3 images"):
        fewshot.draw(every, train, 4, seed=0, key=KEY)
