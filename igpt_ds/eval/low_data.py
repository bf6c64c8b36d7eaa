"""Low-data linear probes: the paper's semi-supervised comparison (docs/reference.md#low-data-probes).

The paper probes iGPT-L's features on CIFAR-10 with 40, 250 and 4,000 labels, five class-balanced random subsets
of the training split each, and reports the test accuracy's mean ± std. Here a budget B over K classes takes
B // K images of every class plus one more from B % K classes drawn at random; subset r of budget B is drawn from
a generator seeded by (seed, B, r) over the split's labels alone, so every rank, world size and rerun draws the
same rows, and the rows are recorded in `<out>/subsets.json`. C is chosen on the full validation split as in the
full probe; the fit sees only the subset's rows (standardised with the subset's statistics).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from igpt_ds.config import ConfigError
from igpt_ds.eval.feature_store import FeatureSplit


def balanced_subset(labels: np.ndarray, classes: np.ndarray, budget: int, seed: int, repeat: int) -> np.ndarray:
    """Sorted row indices (budget,) int64 of one class-balanced random subset of `labels`: budget // K rows of each
    of the K `classes`, one more from budget % K of them (chosen at random). ConfigError when a class has fewer rows
    than it needs, or the budget gives some class no row. One stable sort of the labels (O(N log N)), not a scan per
    class (O(N K): 1.28G comparisons for ImageNet's 1,000 classes)."""
    k = len(classes)
    if budget < k:
        raise ConfigError(f"a label budget of {budget} leaves some of the {k} classes without a label; give at "
                          f"least {k} (one a class)")  # fmt: skip
    rng = np.random.default_rng([seed, budget, repeat])
    extra = np.zeros(k, np.int64)
    extra[rng.choice(k, budget % k, replace=False)] = 1
    order = np.argsort(labels, kind="stable")  # each class's rows ascending, as np.flatnonzero(labels == c) gives
    ordered = labels[order]
    starts, stops = np.searchsorted(ordered, classes, "left"), np.searchsorted(ordered, classes, "right")
    picks = []
    for c, n, start, stop in zip(classes, budget // k + extra, starts, stops, strict=True):
        rows = order[start:stop]
        if len(rows) < n:
            raise ConfigError(f"class {int(c)} has {len(rows)} training images, fewer than the {n} a budget of "
                              f"{budget} takes; lower --label_budgets")  # fmt: skip
        picks.append(rng.choice(rows, n, replace=False))
    return np.sort(np.concatenate(picks))


def digest(rows: np.ndarray) -> str:
    """A subset's fingerprint (sha256 of its int64 rows), recorded beside them."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes()).hexdigest()


class SubsetSplit:
    """`split` seen through `rows` (sorted): the same interface the probe reads (n, labels, layers, width, read,
    path, meta), row i being the split's row rows[i]. Reads only the subset's rows (fancy-indexed out of each
    contiguous range read), so memory is the subset's, not the split's."""

    def __init__(self, split: FeatureSplit, rows: np.ndarray):
        self.split, self.rows = split, np.asarray(rows, dtype=np.int64)
        self.n = len(self.rows)
        self.labels = split.labels[self.rows]
        self.layers, self.meta = split.layers, split.meta
        self.path = Path(split.path)

    def width(self, what: int | str) -> int:
        return self.split.width(what)

    def read(self, what: int | str, rows: range, out: np.ndarray | None = None) -> np.ndarray:
        wanted = self.rows[rows.start : rows.stop]
        if out is None:
            out = np.empty((len(wanted), self.width(what)), np.uint8 if what == "pixels" else np.float32)
        # Runs of consecutive rows read as one range each: a few reads for a small subset of a big split.
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        at = 0
        for run in np.split(wanted, breaks):
            if len(run):
                out[at : at + len(run)] = self.split.read(what, range(int(run[0]), int(run[-1]) + 1))
                at += len(run)
        return out


def summarise(accuracies: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1, as the paper's ± over five subsets) of test accuracies (%)."""
    a = np.asarray(accuracies, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}
