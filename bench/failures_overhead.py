"""What the training loop's failure checks cost: tokens/s of the pretraining entry point at a base revision (before
the checks) and at this checkout, measured alternately in one run.

Issue 24. The checks in the loop: divergence read from the log window's sums (at log steps and stop checks, no
per-step work), DeepSpeed's skipped-step counter, three numbers instead of one in the stop check's all-reduce,
the finite-weights pass and the free-space question before each save. Each side runs `bench/train_throughput.py
--peers trainer` (the entry point itself on shards) in its own tree (`git worktree` of --base), the two sides
round robin `--repeats` times so drifting machine load falls on both.

    python bench/failures_overhead.py --base e8ab28c --repeats 4     # writes bench/results/failures_overhead.*
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def trainer_rate(tree: Path, shards: Path, out: Path, name: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "bench/train_throughput.py", "--size", args.size, "--n-px", "8", "--micro-batch", "16",
           "--precision", "fp32", "--ds-config", "ds_configs/cpu.json", "--peers", "trainer", "--warmup", "20",
           "--steps", str(args.steps), "--repeats", "1", "--shards", str(shards), "--out-dir", str(out),
           "--name", name]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(tree))
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, timeout=900)
    [result] = json.loads((out / f"{name}.json").read_text())["results"]
    return result["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="git revision without the checks")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--size", default="igpt-mini")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="failures_overhead-"))
    base = work / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    try:
        shards = work / "shards"
        subprocess.run([sys.executable, "-m", "data_tools.build_shards", "digits", "--out", str(shards), "--n-px",
                        "8"], cwd=REPO, check=True, capture_output=True)  # fmt: skip
        rates: dict[str, list[float]] = {"base": [], "checks": []}
        for i in range(args.repeats):
            for side, tree in (("base", base), ("checks", REPO)):
                rates[side].append(trainer_rate(tree, shards, work, f"{side}{i}", args))
                print(f"repeat {i + 1}: {side}: {rates[side][-1]:,.0f} tokens/s", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    mean = {k: statistics.mean(v) for k, v in rates.items()}
    spread = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in rates.items()}
    change = 100 * (mean["checks"] / mean["base"] - 1)
    report = {"base": args.base, "checks": head.strip(), "size": args.size, "steps": args.steps,
              "cpu_count": os.cpu_count(), "tokens_per_s": rates, "mean": mean, "stdev": spread,
              "change_percent": change}  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "failures_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Failure checks in the training loop: tokens/s before ({args.base}) and after ({head.strip()})", "",
             f"`bench/train_throughput.py --peers trainer`: {args.size}, 8x8 digits, micro-batch 16, ZeRO-1 fp32, "
             f"{args.steps} timed steps, {os.cpu_count()} CPUs, OMP_NUM_THREADS=1; {args.repeats} alternating "
             "repeats.", "", "| tree | runs (tokens/s) | mean ± stdev |", "|---|---|---|"]  # fmt: skip
    for side, runs in rates.items():
        lines.append(f"| {side} | {', '.join(f'{r:,.0f}' for r in runs)} | {mean[side]:,.0f} ± {spread[side]:,.0f} |")
    lines += ["", f"Change: {change:+.1f}% (the runs' own spread is ±{100 * spread['base'] / mean['base']:.1f}%)."]
    (args.out_dir / "failures_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
