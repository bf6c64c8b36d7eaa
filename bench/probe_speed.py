"""The per-layer probe sweep at an everyday size, before and after: scikit-learn against igpt-ds's solver on the
same features. Issue 15, item 3 (a user probed 9 layers of 54k x 128 features with scikit-learn in ~20 minutes);
issue 25, item 4 (the same on real, correlated features: 149.5 s for one layer with the unpreconditioned solver).

Features: 9 synthetic "layers" of 54,000 train / 6,000 val / 10,000 test rows, d = 128, 10 classes, in the
extracted layout (igpt_ds.eval.feature_store). Layer l has class means of separation s_l rising to the middle layer
and falling after it (an iGPT-like unimodal curve), x = (mu_y + N(0, I)) · M with M a rotation whose singular
values spread over `--condition` (correlated features, as a network's are); or real extracted features
(`--features`), e.g. the two sets bench/probe_real_features.py makes from the views study's 8-view checkpoint:
mnist5k (3,500 / 500 / 1,000 rows x 64) and views56k (56,000 train rows: mnist5k's train images, each as its
evaluation crop and 15 augmented views, x 64). Real features are far worse conditioned than the synthetic ones (the
train covariance's eigenvalues span 7e-6 to 45 on layer 0), which is what made the unpreconditioned L-BFGS slow.
Every probe runs through the real entry point, launcher/linear_probe.py, one process, on `--threads` cores:
  sklearn            --solver sklearn: scikit-learn's LogisticRegression (L-BFGS, tol 1e-6), one fit per C;
  torch              --solver torch: the data-parallel solver (igpt_ds.eval.logreg; float32, warm starts,
                     preconditioned in the features' eigenbasis, the sweep stopped after 2 C values without a better
                     validation accuracy: the probe's defaults);
  torch@REV          with `--base REV`: the same command in a `git worktree` of an earlier revision (the solver before).
The C grid, max_iter and standardisation (train statistics) are the same; accuracy is compared per layer.

    python bench/probe_speed.py --threads 2          # bench/results/probe_speed.{json,md}
    python bench/probe_real_features.py --out studies_out/probe_real      # the two real sets (~10 min)
    python bench/probe_speed.py --threads 2 --base 4654a01 --features studies_out/probe_real/features/mnist5k \
        --name probe_speed_real_mnist5k
    python bench/probe_speed.py --threads 2 --base 4654a01 --features studies_out/probe_real/features/views56k \
        --name probe_speed_real_views56k
    python bench/probe_speed.py --n 4000 --layers 2 --out-dir /tmp/p    # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from igpt_ds.eval.feature_store import write_features

REPO = Path(__file__).resolve().parent.parent
PATIENCE = 2
"""The probe's default `c_patience` for the new solver; scikit-learn (before) sweeps every C, as a user does."""


def separations(n_layers: int) -> list[float]:
    """Distance scale of the class means per layer: 2.0 at the ends, 4.0 in the middle."""
    mid = (n_layers - 1) / 2
    return [4.0 - 2.0 * abs(l - mid) / max(mid, 1) for l in range(n_layers)]


def write_split(root: Path, split: str, n: int, d: int, k: int, n_layers: int, seed: int, condition: float) -> None:
    rng = np.random.default_rng([seed, d, k])
    mus = [rng.normal(scale=s / np.sqrt(2 * d), size=(k, d)).astype(np.float32) for s in separations(n_layers)]
    # Correlated features, like a network's: a random rotation with singular values from 1 down to 1/condition.
    # Standardising rescales each feature but keeps the correlations, so L-BFGS needs more passes.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mix = (q * np.logspace(0, -np.log10(condition), d)[None]).astype(np.float32) @ q.T.astype(np.float32)
    stream = ("train", "val", "test").index(split)
    labels = np.random.default_rng([seed, stream]).integers(0, k, n)

    def rows(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty((n_layers, b - a, d), np.float32)
        for l, mu in enumerate(mus):
            noise = np.random.default_rng([seed, stream, l, a]).standard_normal((b - a, d), dtype=np.float32)
            out[l] = (mu[labels[a:b]] + noise) @ mix
        return out, np.zeros((b - a, 1), np.uint8)

    write_features(root / split, n, list(range(n_layers)), d, rows, labels, seq_len=1, channels=1,
                   metadata={"n_layer": n_layers - 1}, part_rows=8192)  # fmt: skip


def run_probe(features: Path, out: Path, solver: str, threads: int, c_grid: list[float], max_iter: int,
              tree: Path = REPO, label: str = "") -> dict:  # fmt: skip
    """One sweep of every layer by launcher/linear_probe.py of the source tree `tree`."""
    env = dict(os.environ, PYTHONPATH=str(tree), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # fmt: skip
    cmd = [sys.executable, "launcher/linear_probe.py", "--features", str(features.resolve()), "--out", str(out),
           "--solver", solver, "--concat_k", "0", "--pixels", "false", "--c_grid", json.dumps(c_grid),
           "--max_iter", str(max_iter),
           "--c_patience", "0" if solver == "sklearn" else str(PATIENCE)]  # fmt: skip
    tic = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - tic
    if done.returncode:
        raise SystemExit(f"{solver} probe failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    report = json.loads((out / "probe.json").read_text())
    patience = 0 if solver == "sklearn" else PATIENCE
    return {"solver": label or solver, "threads": threads, "c_patience": patience, "wall_s": wall,
            "rows": report["rows"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=54_000, help="train rows (val n/9, test n·5/27)")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--c-grid", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU threads per run")
    p.add_argument("--solvers", nargs="+", default=["torch", "sklearn"], choices=["torch", "sklearn"])
    p.add_argument("--reference", type=Path, help="add the runs of this earlier report on the same features")
    p.add_argument("--base", help="also run the torch solver of this git revision (a worktree): the solver before")
    p.add_argument("--condition", type=float, default=100.0, help="spread of the features' singular values")
    p.add_argument("--features", type=Path, help="probe these extracted features instead of synthetic ones")
    p.add_argument("--name", default="probe_speed", help="result files' stem")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.features or Path(tmp) / "features"
        if args.features:
            from igpt_ds.eval.feature_store import FeatureSplit

            splits = {k: FeatureSplit(root / k) for k in ("train", "val", "test")}
            sizes = {k: s.n for k, s in splits.items()}
            args.d, args.layers = splits["train"].width(splits["train"].layers[0]), len(splits["train"].layers)
            args.classes = len(np.unique(splits["train"].labels))
        else:
            sizes = {"train": args.n, "val": args.n // 9, "test": args.n * 5 // 27}
            for split, n in sizes.items():
                write_split(root, split, n, args.d, args.classes, args.layers, args.seed, args.condition)
        trees = {solver: (REPO, "") for solver in args.solvers}
        if args.base:
            base = Path(tmp) / "base"
            subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPO, check=True,
                           capture_output=True)  # fmt: skip
            trees = {f"torch@{args.base}": (base, "torch"), **trees}
        runs = []
        try:
            for threads in args.threads:
                for label, (tree, solver) in trees.items():
                    runs.append(run_probe(root, Path(tmp) / f"{len(runs)}", solver or label, threads, args.c_grid,
                                          args.max_iter, tree, label))  # fmt: skip
                    r = runs[-1]
                    print(f"{label:14s} {threads} thread(s): {r['wall_s']:.1f} s; test "
                          + " ".join(f"{row['test_acc']:.2f}" for row in r["rows"]), flush=True)  # fmt: skip
        finally:
            if args.base:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    if args.reference:
        runs += json.loads(args.reference.read_text())["runs"]
    source = str(args.features) if args.features else f"synthetic, condition {args.condition:g}"
    shape = {**sizes, "d": args.d, "classes": args.classes, "layers": args.layers}
    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    report = {"features": source, "base": args.base, "shape": shape, "c_grid": args.c_grid,
              "max_iter": args.max_iter, "machine": machine, "runs": runs}  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / f"{args.name}.md").write_text(table(report))
    print(table(report))


def table(report: dict) -> str:
    """Whole-sweep figures per run (accuracy differences: the largest over the layers), then each layer's C and test
    accuracy per run."""
    s, runs = report["shape"], report["runs"]
    lines = [f"Probe sweep ({report['features']}): {s['layers']} layers x {s['train']:,} train x d {s['d']}, "
             f"{s['classes']} classes, "
             f"{len(report['c_grid'])} C values, launcher/linear_probe.py, one process "
             f"(`python bench/probe_speed.py`).", "",
             "| solver | C sweep | threads | wall s (whole sweep) | fit s per layer | mean test % "
             "| max abs diff vs before | max abs diff vs sklearn |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def diff(r: dict, solver: str) -> str:
        ref = next((x for x in runs if x["solver"].startswith(solver) and x["threads"] == r["threads"]), None)
        if ref is None:
            return "-"
        return f"{max(abs(a['test_acc'] - b['test_acc']) for a, b in zip(r['rows'], ref['rows'], strict=True)):.2f}"

    for r in runs:
        per_layer = np.mean([row["seconds"] for row in r["rows"]])
        mean = np.mean([row["test_acc"] for row in r["rows"]])
        sweep = f"stop after {r['c_patience']} worse" if r.get("c_patience") else "every C"
        cells = [r["solver"], sweep, r["threads"], f"{r['wall_s']:.1f}", f"{per_layer:.1f}", f"{mean:.2f}",
                 diff(r, "torch@"), diff(r, "sklearn")]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "Per layer: C chosen, test %, fit s.", "",
              "| layer | " + " | ".join(f"{r['solver']} ({r['threads']})" for r in runs) + " |",
              "|---|" + "---|" * len(runs)]  # fmt: skip
    for i, row in enumerate(runs[0]["rows"]):
        cells = [f"{r['rows'][i]['C']:g}, {r['rows'][i]['test_acc']:.2f}, {r['rows'][i]['seconds']:.1f} s"
                 for r in runs]  # fmt: skip
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
