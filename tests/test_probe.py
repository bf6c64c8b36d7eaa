"""Linear probe: the data-parallel L-BFGS solver agrees with scikit-learn; scalers come from train only; C is
chosen on validation; finished probes survive a crash; labels a probe cannot use are one-line errors; 2 ranks
fit exactly what 1 rank fits."""

import json

import numpy as np
import pytest
import torch
from eval_support import check, run_entry, synthetic_features
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from igpt_ds.config import ConfigError
from igpt_ds.eval import logreg, probe
from igpt_ds.eval.feature_store import FeatureSplit
from igpt_ds.eval.probe import ProbeConfig, ProbeTask, check_labels, format_table, linear_probe, run_task, window

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


def sklearn_reference(train, val, test, C, mean=None, std=None):
    """(val %, test %) of scikit-learn on features standardised with `mean`/`std` (default: train's)."""
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = train, val, test
    mean = x_tr.mean(0, dtype=np.float64) if mean is None else mean
    std = x_tr.std(0, dtype=np.float64) if std is None else std
    std = np.where(std < 1e-8, 1.0, std)
    scale = lambda x: (x - mean) / std
    clf = LogisticRegression(C=C, max_iter=1000, tol=1e-6).fit(scale(x_tr), y_tr)
    return 100 * clf.score(scale(x_va), y_va), 100 * clf.score(scale(x_te), y_te)


def test_fit_agrees_with_sklearn_at_every_c(digits_splits):
    train, val, test = digits_splits
    scaler = logreg.Scaler.fit(torch.from_numpy(train[0]), len(train[0]))
    x = {
        k: scaler.apply_(torch.from_numpy(s[0].copy())) for k, s in zip(("tr", "va", "te"), digits_splits, strict=True)
    }
    y = {k: torch.from_numpy(s[1]) for k, s in zip(("tr", "va", "te"), digits_splits, strict=True)}
    warm = None
    for C in C_GRID:
        warm = logreg.fit(x["tr"], y["tr"], 10, len(train[0]), C, warm=warm)
        assert warm.converged
        ours = [100 * logreg.correct(x[k], y[k], warm) / len(y[k]) for k in ("va", "te")]
        ref = sklearn_reference(train, val, test, C)
        assert abs(ours[0] - ref[0]) <= 0.5 and abs(ours[1] - ref[1]) <= 0.5, (C, ours, ref)
    assert ours[1] > 70  # well above the 10% chance


def test_probe_on_synthetic_features_agrees_with_sklearn(tmp_path):
    root = synthetic_features(tmp_path / "f", sizes={"train": 900, "val": 300, "test": 600}, dim=24, n_classes=6,
                              separation=0.5)  # fmt: skip
    splits = {k: FeatureSplit(root / k) for k in ("train", "val", "test")}
    classes = check_labels(splits, {"train": "train", "val": "val", "test": "test"})
    ours = run_task(ProbeTask([0], 1), splits, classes, C_GRID, "torch", 1000)
    data = [(s.read(0, range(s.n)), s.labels) for s in splits.values()]
    refs = {C: sklearn_reference(*data, C) for C in C_GRID}
    best_c = max(C_GRID, key=lambda C: (refs[C][0], -C))
    assert ours.C == best_c and abs(ours.test_acc - refs[best_c][1]) <= 0.5, (ours, refs)
    assert 40 < ours.test_acc < 95  # structured but not trivial: the comparison can tell solvers apart
    sk = run_task(ProbeTask([0], 1), splits, classes, C_GRID, "sklearn", 1000)
    assert abs(sk.test_acc - ours.test_acc) <= 0.5


def test_scalers_come_from_train_only(tmp_path, monkeypatch):
    """Val and test features squashed 50x and shifted by 6 standard deviations (random signs): standardised with
    their own statistics (the leak) they would probe as well as train; with train's they must probe badly,
    exactly as a reference that standardises by hand with train statistics does. Per layer and concatenated.
    Every scaler the probe fits holds train's statistics: test's or val's used for all splits alike would move
    the result too little to see, so the statistics themselves are checked."""
    signs = np.random.default_rng(1).choice([-1.0, 1.0], 12)
    shift = lambda split, x: x if split == "train" else x / 50 + 6.0 * signs
    root = synthetic_features(tmp_path / "f", dim=12, n_classes=4, separation=1.5, transform=shift)
    splits = {k: FeatureSplit(root / k) for k in ("train", "val", "test")}
    classes = check_labels(splits, {"train": "train", "val": "val", "test": "test"})
    fitted = []
    real_fit = logreg.Scaler.fit.__func__
    monkeypatch.setattr(logreg.Scaler, "fit", classmethod(lambda cls, x, n: fitted.append(real_fit(cls, x, n))
                                                          or fitted[-1]))  # fmt: skip
    for task in (ProbeTask([0], 1), ProbeTask([0, 1], 1)):
        fitted.clear()
        ours = run_task(task, splits, classes, [1.0], "torch", 1000)
        data = [(task.rows(s, range(s.n)), s.labels) for s in splits.values()]
        (scaler,) = fitted
        np.testing.assert_allclose(scaler.mean.numpy(), data[0][0].mean(0, dtype=np.float64), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(scaler.std.numpy(), data[0][0].std(0, dtype=np.float64), rtol=1e-5)
        honest = sklearn_reference(*data, 1.0)
        leaky = sklearn_reference(
            *data[:1],
            *(((x - x.mean(0)) / x.std(0) * data[0][0].std(0) + data[0][0].mean(0), y) for x, y in data[1:]),
            1.0,
        )
        assert abs(ours.test_acc - honest[1]) <= 0.5, (task.name, ours, honest)
        assert leaky[1] - honest[1] > 30, (task.name, leaky, honest)  # the leak would have moved the result


def test_c_is_chosen_on_validation(tmp_path):
    root = synthetic_features(tmp_path / "f", dim=20, n_classes=5, separation=0.4)
    splits = {k: FeatureSplit(root / k) for k in ("train", "val", "test")}
    classes = check_labels(splits, {"train": "train", "val": "val", "test": "test"})
    best = run_task(ProbeTask([0], 1), splits, classes, C_GRID, "torch", 1000)
    for C in C_GRID:
        assert run_task(ProbeTask([0], 1), splits, classes, [C], "torch", 1000).val_acc <= best.val_acc
    with pytest.raises(ConfigError):
        ProbeConfig(solver="newton")


LABEL_CASES = {
    "train holds one class": (dict(labels={"train": np.zeros(600, int)}), "holds one class (a)"),
    "test holds a class train lacks": (dict(labels={"train": np.arange(600) % 3}), "classes the train split lacks (d)"),
    "val has unlabelled images": (dict(labels={"val": np.full(200, -1)}), "unlabelled images"),
    "labels beyond the class names": (dict(labels={"test": np.full(300, 7)}), "but 4 class names"),
    "an empty split": (dict(sizes={"train": 600, "val": 0, "test": 300}), "has no images"),
}


@pytest.mark.parametrize("case", LABEL_CASES)
def test_labels_a_probe_cannot_use_are_refused_before_fitting(case, tmp_path):
    kwargs, message = LABEL_CASES[case]
    sizes = kwargs.get("sizes", {"train": 600, "val": 200, "test": 300})
    root = synthetic_features(tmp_path / "f", sizes=sizes, labels=kwargs.get("labels"), class_names=list("abcd"))
    splits = {k: FeatureSplit(root / k) for k in ("train", "val", "test")}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_labels(splits, {"train": "train", "val": "val", "test": "test"})


def test_label_errors_are_one_line_exit_2(tmp_path):
    root = synthetic_features(tmp_path / "f", labels={"train": np.zeros(600, int)}, class_names=list("abcd"))
    result = run_entry("linear_probe", "--features", str(root))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "train split" in result.stderr and "holds one class" in result.stderr
    assert not (root / "probe").exists()  # nothing fitted, nothing written
    same = run_entry("linear_probe", "--features", str(root), "--test_split", "val")
    assert same.returncode == 2 and "test_split=val is also the val split" in same.stderr


def test_finished_probes_survive_a_crash(tmp_path, one_rank_group, monkeypatch):
    """probe.json is written after every probe; a rerun with the same settings fits only what is missing."""
    root = synthetic_features(tmp_path / "f")
    fitted = []
    real = probe.run_task

    def crash_on_concat(task, *args):
        if len(task.layers) > 1:
            raise RuntimeError("killed")
        fitted.append(task.name)
        return real(task, *args)

    monkeypatch.setattr(probe, "run_task", crash_on_concat)
    with pytest.raises(RuntimeError, match="killed"):
        linear_probe(ProbeConfig(features=str(root), c_grid=[0.1, 1.0]))
    partial = json.loads((root / "probe" / "probe.json").read_text())
    assert not partial["complete"] and [r["name"] for r in partial["rows"]] == ["layer 0", "final norm (1)"]

    fitted.clear()
    monkeypatch.setattr(probe, "run_task", lambda task, *args: fitted.append(task.name) or real(task, *args))
    report = linear_probe(ProbeConfig(features=str(root), c_grid=[0.1, 1.0]))
    assert fitted == ["concat 0-1", "pixels"]  # the layers were not fitted again
    assert report["complete"] and report["rows"][:2] == partial["rows"]
    assert [r["name"] for r in report["rows"]] == ["layer 0", "final norm (1)", "concat 0-1", "pixels"]


def test_window_centres_and_clips():
    layers = [0, 1, 2, 3, 4, 5, 6]
    assert window(layers, 3, 5) == [1, 2, 3, 4, 5]
    assert window(layers, 0, 5) == [0, 1, 2, 3, 4]
    assert window(layers, 6, 3) == [4, 5, 6]
    assert window([2, 4], 4, 5) == [2, 4]


def test_format_table_marks_best():
    row = dict(name="layer 1", layers=[1], dim=8, C=0.1, val_acc=50.0, test_acc=49.0, converged=True)
    table = format_table(dict(rows=[row], best_layer=1, chance=10.0, solver="torch"))
    assert "layer 1" in table and "*" in table and "chance 10.0%" in table


@pytest.mark.multiproc
def test_two_ranks_fit_exactly_what_one_rank_fits(tmp_path):
    """Rows are summed per block in fixed point, so the split of rows over ranks changes nothing."""
    root = synthetic_features(tmp_path / "f", sizes={"train": 1500, "val": 400, "test": 700}, dim=20, n_classes=5,
                              separation=0.4)  # fmt: skip
    args = ("--features", str(root), "--c_grid", "[0.01, 0.1, 1.0]")
    check(run_entry("linear_probe", *args, "--out", str(tmp_path / "one")))
    check(run_entry("linear_probe", *args, "--out", str(tmp_path / "two"), nprocs=2))
    one, two = (json.loads((tmp_path / d / "probe.json").read_text()) for d in ("one", "two"))
    strip = lambda report: [{k: v for k, v in r.items() if k != "seconds"} for r in report["rows"]]
    assert strip(one) == strip(two)
    assert len(two["peak_rss_bytes"]) == 2


def test_preconditioning_bounds_iterations_on_ill_conditioned_features(tmp_path, monkeypatch):
    """Correlated features whose covariance spans 6 decades (a network's layer-0 features span 7e-6 to 45): plain
    L-BFGS needs many hundreds of passes at C = 100; in the covariance's eigenbasis (`logreg.Basis`) it converges in
    a fraction of them to scikit-learn's accuracy (to 0.1 points). The probe fits in that basis."""
    d, k = 32, 5
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(d, d)))
    mix = q * np.logspace(0, -3, d)[None] @ q.T  # singular values 1 to 1e-3: covariance eigenvalues 1 to 1e-6
    root = synthetic_features(tmp_path / "f", sizes={"train": 1500, "val": 500, "test": 3000}, dim=d, n_classes=k,
                              separation=0.6, transform=lambda split, x: x @ mix)  # fmt: skip
    splits = {s: FeatureSplit(root / s) for s in ("train", "val", "test")}
    (x_tr, y_tr), (x_te, y_te) = ((torch.from_numpy(splits[s].read(0, range(splits[s].n))),
                                   torch.from_numpy(splits[s].labels)) for s in ("train", "test"))  # fmt: skip
    scaler = logreg.Scaler.fit(x_tr, len(x_tr))
    scaler.apply_(x_tr)
    scaler.apply_(x_te)
    n = len(x_tr)
    plain = logreg.fit(x_tr, y_tr, k, n, 100.0, max_iter=1000)
    pre = logreg.fit(x_tr, y_tr, k, n, 100.0, max_iter=1000, basis=logreg.Basis.fit(x_tr, n))
    ref = logreg.fit_sklearn(x_tr, y_tr, k, 100.0, max_iter=5000)
    acc = lambda m: 100.0 * logreg.correct(x_te, y_te, m) / len(y_te)
    assert pre.converged and pre.n_iter * 4 < plain.n_iter, (pre.n_iter, plain.n_iter)
    assert abs(acc(pre) - acc(ref)) <= 0.1 and acc(pre) > 100 / k + 10, (acc(pre), acc(ref), acc(plain))

    fits = []  # the probe's own fits: preconditioned, so as few passes
    real_fit = logreg.fit
    monkeypatch.setattr(logreg, "fit", lambda *a, **kw: fits.append(real_fit(*a, **kw)) or fits[-1])
    result = run_task(ProbeTask([0], 1), splits, np.arange(k), [100.0], "torch", 1000)
    assert fits[-1].converged and fits[-1].n_iter * 4 < plain.n_iter, (fits[-1].n_iter, plain.n_iter)
    assert abs(result.test_acc - acc(ref)) <= 0.1
