"""The paper's numbers as data (data/paper): complete, and consistent as the paper states them."""
import pytest

from imagenet_sd.report import paper


def test_table1_has_its_17_rows_and_top5_is_never_below_top1():
    rows = paper.table(1)
    assert [r["row"] for r in rows] == list(range(1, 18))
    for r in rows:
        for test_set in ("val", "v2", "sketch", "r", "a"):
            assert 0 <= r[f"{test_set}_top1"] <= r[f"{test_set}_top5"] <= 100, (r["row"], test_set)
    assert rows[0]["training_data"] == "ImageNet-100 (real)" and rows[0]["val_top1"] == 87.4
    assert (rows[11]["relative_size"], rows[11]["guidance"], rows[11]["prompt_or_model"]) == ("50x", "2.0", "c, d_c")


def test_table2_averages_are_the_means_of_the_ten_datasets():
    rows = paper.table(2)
    datasets = ["aircraft", "cars", "dtd", "eurosat", "flowers", "pets", "food", "sun397", "inat2018", "inat2019"]
    assert [r["row"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert r["average"] == pytest.approx(sum(r[d] for d in datasets) / 10, abs=0.051), r["row"]
