"""What the live probe costs a pretraining run, before and after its fits moved to owner ranks (issue 25): seconds a
probe spends extracting features and fitting, at 1 and 2 CPU ranks, on two source trees (the current one and a git
revision, checked out with `git worktree`).

The run: the mnist5k digits at 14x14 (16 colours; built here unless --shards), preset `study_mnist5k` (8 blocks x
64, 9 probe layers) with ZeRO-1 fp32 (`ds_configs/cpu.json`), `--steps` steps with a probe at step 0 and every
`--every` steps, probe_images 1,024 and probe_val_images 500 (the study's). Each probe's `seconds` and `extract_s`
come from the run's live_probe.json; fitting is the difference. Runs alternate between the trees.

    python bench/live_probe_overhead.py --base HEAD~1       # writes bench/results/live_probe_overhead.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def run(tree: Path, shards: Path, out: Path, nprocs: int, steps: int, every: int) -> list[dict]:
    """One pretraining run of `tree` on `nprocs` CPU ranks (the deepspeed launcher); its probes' history."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(tree))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    deepspeed = Path(sys.executable).parent / "deepspeed"
    port = str(29600 + np.random.default_rng().integers(0, 300))
    cmd = [str(deepspeed), "--num_gpus", str(nprocs), "--master_port", port, "launcher/pretrain.py", "--config",
           "study_mnist5k", "--data.shards", str(shards), "--train.run_root", str(out), "--train.name", "run",
           "--train.ds_config", "ds_configs/cpu.json", "--train.max_steps", str(steps), "--train.probe_every",
           str(every), "--train.eval_every", str(every), "--train.save_every", str(10 * steps),
           "--train.log_every", str(every)]  # fmt: skip
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    history = json.loads((out / "run" / "live_probe.json").read_text())["history"]
    shutil.rmtree(out)
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision before the change")
    p.add_argument("--shards", type=Path, default=None, help="mnist5k shards at 14x14, 16 colours (built if absent)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = args.shards or tmp / "shards"
        if args.shards is None:
            subprocess.run([sys.executable, "-m", "data_tools.build_shards", "mnist5k", "--out", str(shards),
                            "--n-px", "14", "--k", "16"], cwd=REPO, check=True, capture_output=True)  # fmt: skip
        base = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
        try:
            trees = {"before": base, "after": REPO}
            probes: dict[str, dict[int, list[dict]]] = {k: {1: [], 2: []} for k in trees}
            for _ in range(args.repeats):
                for nprocs in (1, 2):
                    for name, tree in trees.items():
                        history = run(tree, shards.resolve(), tmp / "runs", nprocs, args.steps, args.every)
                        probes[name][nprocs] += history
                        print(name, nprocs, [round(h["seconds"], 2) for h in history], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    summary = {}
    for name, by_world in probes.items():
        for nprocs, history in by_world.items():
            total = [h["seconds"] for h in history]
            extract = [h["extract_s"] for h in history]
            fit = [t - e for t, e in zip(total, extract, strict=True)]
            summary[f"{name}_ranks{nprocs}"] = {"probes": len(history), "seconds": float(np.mean(total)),
                                                "extract_s": float(np.mean(extract)), "fit_s": float(np.mean(fit)),
                                                "acc": [h["acc"] for h in history]}  # fmt: skip
    for nprocs in (1, 2):
        a = [h["acc"] for h in probes["after"][nprocs]]
        b = [h["acc"] for h in probes["before"][nprocs]]
        summary[f"identical_accuracies_ranks{nprocs}"] = a == b
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores visible", "base": args.base,
              "steps": args.steps, "every": args.every, "repeats": args.repeats, "runs": summary}  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "live_probe_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / "live_probe_overhead.md").write_text(table(result))
    print(table(result))


def table(result: dict) -> str:
    lines = [f"Live probe of a pretraining run (mnist5k 14x14, 8 x 64 AR model, 9 layers, 1,024 + 500 probe images, "
             f"ZeRO-1 fp32), mean over {result['repeats']} runs of {result['steps']} steps, a probe every "
             f"{result['every']} and at step 0; {result['machine']}; base {result['base']}", "",
             "| tree | ranks | probes | seconds a probe | extraction s | fitting s | accuracies as before |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in result["runs"].items():
        if key.startswith("identical"):
            continue
        name, ranks = key.split("_ranks")
        same = result["runs"][f"identical_accuracies_ranks{ranks}"] if name == "after" else ""
        lines.append(f"| {name} | {ranks} | {r['probes']} | {r['seconds']:.2f} | {r['extract_s']:.2f} | "
                     f"{r['fit_s']:.2f} | {same} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
