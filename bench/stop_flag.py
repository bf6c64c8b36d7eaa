"""What agreeing on a stop request costs a training step, before and after issue 12. Two ranks on CPU (gloo).

Peers, each timing the same stand-in step (--reps matrix products of side --size, then an all-reduce of a
--grad-numel gradient over the main group, as every data-parallel step has), in the same run, round-robin:

  none         the step alone
  gloo_async   before: a one-element all-reduce started every step on a gloo group of its own and read one
               step later (the former distributed.StopSignal.agreed, copied here)
  check_10     after: distributed.stop.StopSignal.check, one one-element all-reduce over the main group every
               10 steps (train.stop_check_every's default)

Per peer: the step time (best of --repeats), and the time spent inside the check itself per step (median): the
first moves with every disturbance of a shared machine, the second is the mechanism's own cost. Also counted:
the sockets a rank opens for a gloo group of its own (gloo connects every pair of ranks).
Writes stop_flag.json into --out-dir (default bench/results). Launch as two ranks:

    python bench/stop_flag.py                    # starts its two ranks itself
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent


class GlooEveryStep:
    """The stop flag before issue 12: reduced every step over a gloo group of its own, asynchronously."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo")
        self.pending = None

    def agreed(self, step: int) -> bool:
        stop = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.zeros(1)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return stop


def sockets() -> int:
    return sum(1 for c in psutil.Process().net_connections(kind="tcp"))


def rank_main(args: argparse.Namespace) -> None:
    from igpt_ds.distributed.process_group import init_distributed
    from igpt_ds.distributed.stop import StopSignal

    rank, world = init_distributed(600)
    torch.set_num_threads(1)
    a = torch.randn(args.size, args.size)
    grad = torch.zeros(args.grad_numel)

    def step() -> None:
        for _ in range(args.reps):
            a @ a
        dist.all_reduce(grad)  # the step's gradient reduction: ranks are in step with each other already

    tic = time.perf_counter()  # calibrate the stand-in step
    for _ in range(20):
        step()
    step_ms = (time.perf_counter() - tic) / 20 * 1e3
    before = sockets()
    peers = {"none": lambda s: False, "gloo_async": GlooEveryStep().agreed, "check_10": StopSignal(10).check}
    extra_sockets = sockets() - before
    times: dict[str, list[float]] = {k: [] for k in peers}
    inside: dict[str, list[float]] = {k: [] for k in peers}
    for _ in range(args.repeats):
        for name, check in peers.items():
            dist.barrier()
            in_check = 0.0
            tic = time.perf_counter()
            for s in range(1, args.steps + 1):
                step()
                t0 = time.perf_counter()
                check(s)
                in_check += time.perf_counter() - t0
            times[name].append((time.perf_counter() - tic) / args.steps * 1e6)
            inside[name].append(in_check / args.steps * 1e6)
    if rank == 0:
        best = {k: min(v) for k, v in times.items()}
        median = lambda v: sorted(v)[len(v) // 2]
        report = {
            "command": "python bench/stop_flag.py " + " ".join(sys.argv[1:]),
            "world": world,
            "step_us": {k: round(v, 1) for k, v in best.items()},
            "in_check_us_per_step": {k: round(median(v), 1) for k, v in inside.items() if k != "none"},
            "overhead_us_per_step": {k: round(v - best["none"], 1) for k, v in best.items() if k != "none"},
            "all_runs_us": times,
            "stand_in_step_ms": round(step_ms, 3),
            "sockets_of_a_gloo_group_per_rank": extra_sockets,
        }
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
        print(
            json.dumps({k: report[k] for k in ("step_us", "overhead_us_per_step", "sockets_of_a_gloo_group_per_rank")})
        )
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--size", type=int, default=256, help="matrix side of the stand-in step")
    p.add_argument("--reps", type=int, default=10, help="matrix products per stand-in step")
    p.add_argument("--grad-numel", type=int, default=65536, help="gradient values all-reduced each step")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--name", default="stop_flag")
    args = p.parse_args()
    if "RANK" in os.environ:
        rank_main(args)
        return 0
    from igpt_ds.distributed.rank_env import free_port

    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # fmt: skip
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]  # fmt: skip
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main())
