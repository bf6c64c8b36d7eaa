"""OpenMP threads of CPU ranks started by the `deepspeed` launcher: does leaving OMP_NUM_THREADS unset slow steps?

Issue 24, item 10. torchrun sets OMP_NUM_THREADS=1 when it starts several processes on a node; the `deepspeed`
launcher sets nothing, so each CPU rank starts one OpenMP thread per core and R ranks on C cores run R·C threads.
This runs the pretraining entry point under `deepspeed --num_gpus R` (DS_ACCELERATOR=cpu, gloo) on the tiny
digits shards with each setting in turn (round robin, `--repeats` times) and reports tokens/s of the last log
window: C threads a rank (what a rank runs when nothing sets OMP_NUM_THREADS and nothing splits the cores), C // R
(what `igpt_ds.distributed.process_group.cpu_threads` now sets when the variable is unset), and unset (which must
now match C // R).

    python bench/cpu_threads.py --ranks 2 --repeats 3        # writes bench/results/cpu_threads.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: Path, threads: str | None, ranks: int, steps: int) -> float:
    """tokens/s of the last log window of one run; `threads` None leaves OMP_NUM_THREADS unset."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(free_port()), "launcher/pretrain.py",
           "--config", str(config), f"--train.max_steps={steps}", f"--train.log_every={steps // 3}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"run failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    rates = re.findall(r"\| ([\d.]+)k tok/s", out.stdout)
    return float(rates[-1]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--size", default="igpt-mini")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpu_threads-"))
    try:
        shards = work / "shards"
        subprocess.run([sys.executable, "-m", "data_tools.build_shards", "digits", "--out", str(shards), "--n-px",
                        "8"], cwd=REPO, check=True, capture_output=True)  # fmt: skip
        cfg = {"model": {"size": args.size, "n_px": 8, "n_vocab": 512}, "data": {"shards": str(shards)},
               "train": {"run_root": str(work / "runs"), "ds_config": "ds_configs/cpu.json", "global_batch": 64,
                         "micro_batch": 16, "eval_every": 0, "save_every": 100000, "probe_every": 0}}  # fmt: skip
        config = work / "c.yaml"
        config.write_text(yaml.safe_dump(cfg))
        cores = len(os.sched_getaffinity(0))
        settings = {f"{cores} (C: one thread a core, the launcher's default before)": str(cores),
                    f"{max(1, cores // args.ranks)} (C // R)": str(max(1, cores // args.ranks)),
                    "unset (igpt_ds splits the cores)": None}  # fmt: skip
        results: dict[str, list[float]] = {k: [] for k in settings}
        for i in range(args.repeats):
            for name, threads in settings.items():
                shutil.rmtree(work / "runs", ignore_errors=True)
                results[name].append(run(config, threads, args.ranks, args.steps))
                print(f"repeat {i + 1}: OMP_NUM_THREADS={name}: {results[name][-1]:,.0f} tokens/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {k: max(v) for k, v in results.items()}
    report = {"ranks": args.ranks, "cpu_count": os.cpu_count(), "size": args.size, "steps": args.steps,
              "tokens_per_s": results, "best": best}  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "cpu_threads.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# OpenMP threads of {args.ranks} CPU ranks under the deepspeed launcher ({os.cpu_count()} CPUs)", "",
             f"{args.size}, 8x8 digits, global batch 64, ZeRO-1 fp32, last log window of {args.steps} steps; "
             f"tokens/s, {args.repeats} round-robin repeats (best in bold).", "",
             "| OMP_NUM_THREADS | runs (tokens/s) | best |", "|---|---|---|"]  # fmt: skip
    for name, runs in results.items():
        lines.append(f"| {name} | {', '.join(f'{r:,.0f}' for r in runs)} | **{best[name]:,.0f}** |")
    (args.out_dir / "cpu_threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
