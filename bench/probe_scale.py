"""How the data-parallel linear probe scales: wall time, peak RSS per rank and accuracy against N, d, classes
and world size, with scikit-learn in the same run at the sizes it can take. Issue 11, item 8.

Synthetic features with known structure: class k has mean mu_k ~ N(0, s²·I_d), s = 4 / sqrt(2·d), so any two
means lie ~4 apart, and x = mu_y + N(0, I_d). For these isotropic Gaussians with equal priors the nearest-mean
rule with the true means is Bayes-optimal, so `bayes_acc` (on the test rows) is the ceiling any probe can
reach. Features are written in the extracted layout (igpt_ds.eval.feature_store.write_features), part by part from a
seeded generator, never whole; val and test hold N/8 rows each.

Each case runs the real entry point (launcher/linear_probe.py) as 1 and as 2 ranks (env:// like torchrun),
one core each (OMP_NUM_THREADS=1: a rank stands for one device; two OpenMP threads on a shared 2-core machine
spin on each other), one C and a fixed max_iter so that time per L-BFGS pass is comparable. Peak RSS per
rank comes from the probe's own report; `predicted_gb` is igpt_ds.plan.evaluation.probe_bytes for the same
case, and `rss_over_idle_gb` subtracts the peak of the same run on a tiny set (the process's fixed cost:
Python, torch, DeepSpeed).
scikit-learn (LogisticRegression, L-BFGS, the same C and max_iter) runs in a subprocess of its own where
N·d·8 B (its float64 copy) stays under --sklearn-max-gb.

    python bench/probe_scale.py                                  # 10 classes: probe_scale.{json,md} (~40 min)
    python bench/probe_scale.py --n 20000 --classes 1000 --max-iter 15 --name probe_scale_k1000   # (~25 min)
    python bench/probe_scale.py --n 2000 --d 16 --classes 4 --max-iter 20 --out-dir /tmp/p   # smoke
Writes probe_scale.json and probe_scale.md into --out-dir (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from igpt_ds.distributed.rank_env import free_port
from igpt_ds.eval.feature_store import FeatureSplit, write_features
from igpt_ds.plan.evaluation import probe_bytes

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def means(d: int, n_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, d, n_classes]).normal(scale=4 / math.sqrt(2 * d), size=(n_classes, d))


def synthetic_split(root: Path, split: str, n: int, d: int, n_classes: int, seed: int) -> Path:
    mu = means(d, n_classes, seed).astype(np.float32)
    stream = {"train": 0, "val": 1, "test": 2}[split]
    labels = np.random.default_rng([seed, stream]).integers(0, n_classes, n)

    def rows(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        noise = np.random.default_rng([seed, stream, a]).standard_normal((b - a, d), dtype=np.float32)
        return (mu[labels[a:b]] + noise)[None], np.zeros((b - a, 1), np.uint8)

    return write_features(root / split, n, [0], d, rows, labels, seq_len=1, channels=1,
                          metadata={"n_layer": 0}, part_rows=8192)  # fmt: skip


def bayes_accuracy(split: FeatureSplit, mu: np.ndarray) -> float:
    hits = 0
    for a in range(0, split.n, 65536):
        x = split.read(0, range(a, min(split.n, a + 65536)))
        d2 = (x * x).sum(1)[:, None] - 2 * x @ mu.T + (mu * mu).sum(1)[None]
        hits += int((d2.argmin(1) == split.labels[a : a + len(x)]).sum())
    return 100.0 * hits / split.n


def run_probe(features: Path, out: Path, world: int, C: float, max_iter: int) -> dict:
    """launcher/linear_probe.py on layer 0 as `world` ranks; its report plus the wall time."""
    port = str(free_port())
    base = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
                OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
    cmd = [sys.executable, "launcher/linear_probe.py", "--features", str(features), "--out", str(out),
           "--layers", "[0]", "--concat_k", "0", "--pixels", "false", "--c_grid", f"[{C}]",
           "--max_iter", str(max_iter)]  # fmt: skip
    tic = time.perf_counter()
    rank_env = lambda r: dict(base, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world))
    procs = [subprocess.Popen(cmd, cwd=REPO, env=rank_env(r), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(world)]  # fmt: skip
    logs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - tic
    if any(p.returncode for p in procs):
        raise SystemExit(f"probe failed on {world} ranks:\n{logs[0][-3000:]}")
    report = json.loads((out / "probe.json").read_text())
    return {"wall_s": wall, "row": report["rows"][0], "peak_rss_bytes": report["peak_rss_bytes"]}


SKLEARN = """
import json, resource, sys, time, numpy as np
from sklearn.linear_model import LogisticRegression
from igpt_ds.eval.feature_store import FeatureSplit
root, C, max_iter = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
s = {k: FeatureSplit(f"{root}/{k}") for k in ("train", "val", "test")}
x = {k: v.read(0, range(v.n)) for k, v in s.items()}
mean, std = x["train"].mean(0, dtype=np.float64), x["train"].std(0, dtype=np.float64)
tic = time.perf_counter()
clf = LogisticRegression(C=C, max_iter=max_iter, tol=1e-6).fit((x["train"] - mean) / std, s["train"].labels)
fit_s = time.perf_counter() - tic
acc = {k: 100 * clf.score((x[k] - mean) / std, s[k].labels) for k in ("val", "test")}
print(json.dumps({"fit_s": fit_s, "val_acc": acc["val"], "test_acc": acc["test"], "n_iter": int(clf.n_iter_.max()),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_sklearn(features: Path, C: float, max_iter: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", SKLEARN, str(features), str(C), str(max_iter)], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def case(args, tmp: Path, n: int, d: int, k: int, idle: dict[int, float]) -> dict:
    root = tmp / f"n{n}_d{d}_k{k}"
    sizes = {"train": n, "val": n // 8, "test": n // 8}
    for split, rows in sizes.items():
        synthetic_split(root, split, rows, d, k, args.seed)
    out = {"n_train": n, "n_val": n // 8, "n_test": n // 8, "d": d, "classes": k, "C": args.C,
           "max_iter": args.max_iter, "bayes_acc": bayes_accuracy(FeatureSplit(root / "test"), means(d, k, args.seed)),
           "disk_gb": sum(n_ * d * 4 for n_ in sizes.values()) / GB, "ranks": {}}  # fmt: skip
    for world in args.worlds:
        got = run_probe(root, tmp / f"probe{world}", world, args.C, args.max_iter)
        peak = max(got["peak_rss_bytes"])
        predicted = probe_bytes(n, n // 8, n // 8, d, k, world, gpu=False)
        out["ranks"][world] = {
            "wall_s": round(got["wall_s"], 2),
            "fit_s": round(got["row"]["seconds"], 2),
            "val_acc": got["row"]["val_acc"],
            "test_acc": got["row"]["test_acc"],
            "converged": got["row"]["converged"],
            "peak_rss_gb": [round(b / GB, 3) for b in got["peak_rss_bytes"]],
            "rss_over_idle_gb": round((peak - idle[world]) / GB, 3),
            "predicted_gb": round(predicted / GB, 3),
            "predicted_bytes": predicted,
        }
        print(f"N={n:,} d={d} K={k} ranks={world}: {got['row']['seconds']:.1f} s, test {got['row']['test_acc']:.2f}%, "
              f"peak RSS {peak / GB:.2f} GB/rank (over idle {(peak - idle[world]) / GB:.2f}, predicted "
              f"{predicted / GB:.2f})", flush=True)  # fmt: skip
    if n * d * 8 / GB <= args.sklearn_max_gb:
        out["sklearn"] = run_sklearn(root, args.C, args.max_iter)
        print(f"  sklearn: {out['sklearn']}", flush=True)
    for split in sizes:
        for f in (root / split).rglob("*.npy"):
            f.unlink()  # disk: the next case may be large
    return out


def idle_rss(args, tmp: Path) -> dict[int, float]:
    """Peak RSS per rank of a probe on 2,048 rows: what a probe process costs before any data."""
    root = tmp / "idle"
    for split in ("train", "val", "test"):
        synthetic_split(root, split, 2048, 8, 2, args.seed)
    return {w: max(run_probe(root, tmp / f"idle{w}", w, 1.0, 5)["peak_rss_bytes"]) for w in args.worlds}


def markdown(report: dict) -> str:
    lines = ["| N train | d | K | ranks | fit s | test % | Bayes % | sklearn test % | sklearn fit s | peak RSS GB/rank "
             "| over idle GB | predicted GB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in report["cases"]:
        sk = c.get("sklearn", {})
        for world, r in c["ranks"].items():
            sk_acc, sk_s = sk.get("test_acc", float("nan")), sk.get("fit_s", float("nan"))
            lines.append(
                f"| {c['n_train']:,} | {c['d']} | {c['classes']} | {world} | {r['fit_s']:.1f} | {r['test_acc']:.2f} | "
                f"{c['bayes_acc']:.2f} | {sk_acc:.2f} | {sk_s:.1f} | {max(r['peak_rss_gb']):.2f} | "
                f"{r['rss_over_idle_gb']:.2f} | {r['predicted_gb']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[50_000, 200_000, 800_000], help="train rows")
    p.add_argument("--d", type=int, nargs="+", default=[512, 1536])
    p.add_argument("--classes", type=int, nargs="+", default=[10])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-pass-flops", type=float, default=1.2e11,
                   help="skip cases whose L-BFGS pass (4·N·d·K FLOPs) is larger (CPU time)")  # fmt: skip
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--sklearn-max-gb", type=float, default=2.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--name", default="probe_scale")
    p.add_argument("--tmp", default=None, help="folder for the synthetic features (default: a temporary one)")
    args = p.parse_args(argv)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(["python bench/probe_scale.py", *(argv or sys.argv[1:])]), "git": git.strip(),
              "cores": os.cpu_count(), "cases": []}  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        idle = idle_rss(args, Path(tmp))
        report["idle_rss_gb"] = {w: v / GB for w, v in idle.items()}
        for k in args.classes:
            for d in args.d:
                for n in args.n:
                    if 4 * n * d * k <= args.max_pass_flops:
                        report["cases"].append(case(args, Path(tmp), n, d, k, idle))
                        # after every case: a long run stopped midway keeps what it measured
                        (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
                        (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
