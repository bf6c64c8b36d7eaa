"""Does the preconditioned probe solver reach the exact minimiser? One layer's fit at one C (igpt_ds.eval.logreg,
default tolerance) against a fully converged reference: scikit-learn's L-BFGS in float64 at tol 1e-10 and
max_iter 100,000, on the same standardised real features (bench/probe_real_features.py). Prints, and appends to
`--out`, test accuracy and the objective J (scikit-learn's loss / (C N)) of both, their iterations and seconds.
Issue 25, item 4: on real features the solver before preconditioning stopped unconverged at C = 100.

    python bench/probe_converged.py --features studies_out/probe_real/features/mnist5k --layer 0 --C 100
    python bench/probe_converged.py --features studies_out/probe_real/features/views56k --layer 0 --C 100  # ~16 min
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from igpt_ds.eval import logreg
from igpt_ds.eval.feature_store import FeatureSplit


def load(root: Path, split: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
    f = FeatureSplit(root / split)
    return f.read(layer, range(f.n)).astype(np.float32), np.asarray(f.labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", type=Path, required=True)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--C", type=float, default=100.0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "probe_converged.jsonl")
    args = p.parse_args()
    (xtr, ytr), (xte, yte) = load(args.features, "train", args.layer), load(args.features, "test", args.layer)
    mean, std = xtr.mean(0, dtype=np.float64), xtr.std(0, dtype=np.float64)
    std[std < 1e-8] = 1
    xtr, xte = ((xtr - mean) / std).astype(np.float32), ((xte - mean) / std).astype(np.float32)
    n, k, C = len(xtr), int(ytr.max()) + 1, args.C

    def objective(W: np.ndarray, b: np.ndarray) -> float:
        z = xtr.astype(np.float64) @ W + b
        z -= z.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        return float((lse - z[np.arange(n), ytr]).mean() + (W * W).sum() / (2 * C * n))

    def accuracy(W: np.ndarray, b: np.ndarray) -> float:
        return 100 * float(((xte @ W + b).argmax(1) == yte).mean())

    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr).long()
    tic = time.perf_counter()
    fit = logreg.fit(x, y, k, n, C, basis=logreg.Basis.fit(x, n))
    ours_s = time.perf_counter() - tic
    W, b = fit.W.double().numpy(), fit.b.double().numpy()
    tic = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegression(C=C, tol=1e-10, max_iter=100_000).fit(xtr.astype(np.float64), ytr)
    ref_s = time.perf_counter() - tic
    row = {"features": str(args.features), "layer": args.layer, "C": C, "train_rows": n,
           "ours": {"test_pct": accuracy(W, b), "J": objective(W, b), "iterations": fit.n_iter,
                    "seconds": round(ours_s, 1)},
           "reference": {"test_pct": accuracy(ref.coef_.T, ref.intercept_),
                         "J": objective(ref.coef_.T, ref.intercept_), "iterations": int(ref.n_iter_.max()),
                         "seconds": round(ref_s, 1)}}  # fmt: skip
    print(json.dumps(row))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
