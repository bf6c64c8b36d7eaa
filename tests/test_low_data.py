"""Low-data linear probes (issue 25): class-balanced subsets drawn from a seed, the same at any world size, mean ± std
over them in probe.json; and the one-class validation split refused before fitting."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_support import check, run_entry, synthetic_features

from igpt_ds.config import ConfigError
from igpt_ds.eval.feature_store import FeatureSplit
from igpt_ds.eval.low_data import SubsetSplit, balanced_subset, summarise


def test_subsets_are_class_balanced_and_reproducible():
    labels = np.repeat(np.arange(10), 50)[np.random.default_rng(1).permutation(500)]
    classes = np.arange(10)
    for budget in (10, 40, 250, 43):
        rows = balanced_subset(labels, classes, budget, seed=3, repeat=0)
        counts = np.bincount(labels[rows], minlength=10)
        assert len(rows) == len(set(rows.tolist())) == budget and (np.diff(rows) > 0).all()
        assert counts.max() - counts.min() <= (1 if budget % 10 else 0) and counts.min() == budget // 10
        np.testing.assert_array_equal(rows, balanced_subset(labels, classes, budget, seed=3, repeat=0))
    others = [balanced_subset(labels, classes, 40, seed=3, repeat=r) for r in range(5)]
    assert len({tuple(r) for r in others}) == 5  # each repeat its own subset
    assert not np.array_equal(others[0], balanced_subset(labels, classes, 40, seed=4, repeat=0))
    with pytest.raises(ConfigError, match="fewer than"):
        balanced_subset(labels, classes, 600, seed=0, repeat=0)
    with pytest.raises(ConfigError, match="without a label"):
        balanced_subset(labels, classes, 5, seed=0, repeat=0)


def test_mean_and_std_over_subsets_by_hand():
    # 70, 75, 80: mean 75, sample std sqrt(((-5)^2 + 0 + 5^2) / 2) = 5
    assert summarise([70.0, 75.0, 80.0]) == {"mean": 75.0, "std": 5.0, "n": 3}
    assert summarise([90.0]) == {"mean": 90.0, "std": 0.0, "n": 1}


def test_a_subset_split_reads_exactly_its_rows(tmp_path):
    split = FeatureSplit(synthetic_features(tmp_path / "f") / "train")
    rows = np.array([0, 1, 2, 127, 128, 300, 599])  # runs across the 128-row parts
    sub = SubsetSplit(split, rows)
    full = split.read(1, range(split.n))
    np.testing.assert_array_equal(sub.read(1, range(sub.n)), full[rows])
    np.testing.assert_array_equal(sub.read(0, range(2, 6)), split.read(0, range(split.n))[rows[2:6]])
    np.testing.assert_array_equal(sub.labels, split.labels[rows])


@pytest.mark.multiproc
def test_low_data_probes_are_the_same_at_one_and_two_ranks(tmp_path):
    root = synthetic_features(tmp_path / "f", separation=0.5)
    args = ["--features", str(root), "--label_budgets", "[8, 40]", "--repeats", "3", "--c_grid", "[0.1, 1.0]",
            "--concat_k", "0"]  # fmt: skip
    out = check(run_entry("linear_probe", *args, "--out", str(tmp_path / "one")))
    assert "low-data test % (mean ± std over the subsets)" in out
    check(run_entry("linear_probe", *args, "--out", str(tmp_path / "two"), nprocs=2))
    one, two = (json.loads((tmp_path / k / "probe.json").read_text()) for k in ("one", "two"))
    assert one["low_data"] == two["low_data"] and set(one["low_data"]) == {"8", "40"}
    cell = one["low_data"]["40"]["layer 0"]
    assert cell["n"] == 3 and cell["mean"] == pytest.approx(np.mean(cell["test_acc"]))
    assert cell["std"] == pytest.approx(np.std(cell["test_acc"], ddof=1))
    assert set(one["low_data"]["8"]) == {"layer 0", "final norm (1)", "pixels"}
    subsets = json.loads((tmp_path / "one" / "subsets.json").read_text())
    assert subsets == json.loads((tmp_path / "two" / "subsets.json").read_text())
    labels = FeatureSplit(root / "train").labels
    for entry in subsets["subsets"]["40"]:
        assert np.bincount(labels[entry["rows"]], minlength=4).tolist() == [10, 10, 10, 10]
    # Fewer labels, lower accuracy: 8 labels (2 a class) against 40 on the same features.
    assert one["low_data"]["8"]["layer 0"]["mean"] < one["low_data"]["40"]["layer 0"]["mean"]
    assert (tmp_path / "one" / "low_data.png").stat().st_size > 0


def test_a_validation_split_of_one_class_is_refused_before_fitting(tmp_path):
    root = synthetic_features(tmp_path / "f", labels={"val": np.full(200, 2)}, class_names=list("abcd"))
    result = run_entry("linear_probe", "--features", str(root))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "the val split" in result.stderr and "holds one class (c)" in result.stderr
    assert not (root / "probe").exists()
