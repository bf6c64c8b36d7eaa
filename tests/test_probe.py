"""Linear probe: the torch L-BFGS path agrees with scikit-learn; C is chosen on validation; the window."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from igpt_ds.config import ConfigError
from igpt_ds.probe import format_table, probe, standardise, window

C_GRID = [1e-3, 1e-2, 1e-1, 1.0, 10.0]


@pytest.fixture(scope="module")
def digits_splits():
    """sklearn's embedded 8x8 digits (no download), noised so the probe is not trivially perfect."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    x = x + rng.normal(scale=4.0, size=x.shape)
    order = rng.permutation(len(y))
    x, y = x[order].astype(np.float32), y[order]
    return (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300]), (x[1300:], y[1300:])


def test_torch_agrees_with_sklearn(digits_splits):
    sk = probe("pixels", [], *digits_splits, c_grid=C_GRID, solver="sklearn")
    th = probe("pixels", [], *digits_splits, c_grid=C_GRID, solver="torch")
    assert sk.converged and th.converged
    assert sk.test_acc > 70  # well above the 10% chance
    assert abs(sk.test_acc - th.test_acc) <= 0.5, (sk, th)
    assert abs(sk.val_acc - th.val_acc) <= 0.5, (sk, th)


def test_c_is_chosen_on_validation(digits_splits):
    best = probe("pixels", [], *digits_splits, c_grid=C_GRID, solver="sklearn")
    for C in C_GRID:
        assert probe("pixels", [], *digits_splits, c_grid=[C], solver="sklearn").val_acc <= best.val_acc
    with pytest.raises(ConfigError):
        probe("pixels", [], *digits_splits, c_grid=C_GRID, solver="newton")


def test_standardise_uses_train_statistics():
    train = np.array([[0.0, 5.0], [2.0, 5.0]])
    tr, te = standardise(train, np.array([[1.0, 7.0]]))
    np.testing.assert_allclose(tr, [[-1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(te, [[0.0, 2.0]])  # the constant column keeps scale 1


def test_window_centres_and_clips():
    layers = [0, 1, 2, 3, 4, 5, 6]
    assert window(layers, 3, 5) == [1, 2, 3, 4, 5]
    assert window(layers, 0, 5) == [0, 1, 2, 3, 4]
    assert window(layers, 6, 3) == [4, 5, 6]
    assert window([2, 4], 4, 5) == [2, 4]


def test_format_table_marks_best():
    row = dict(name="layer 1", layers=[1], dim=8, C=0.1, val_acc=50.0, test_acc=49.0, converged=True)
    table = format_table(dict(rows=[row], best_layer=1, chance=10.0, solver="sklearn"))
    assert "layer 1" in table and "*" in table and "chance 10.0%" in table
