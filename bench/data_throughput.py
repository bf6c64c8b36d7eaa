"""Data-path throughput: tokens/s one data-parallel rank's shard reader and sampler deliver.

Issue 6, part 1. The pretraining loop (igpt_ds.train.pretrain) reads this rank's share of each global batch
with `read_micro_batches` (memory-mapped uint16 rows -> int64 tensors, the BERT objective's keyed masks,
pinned on a GPU) in a background thread one step ahead (`StepReader`), then copies it to the device
without blocking. Peers in the same run, each reading one step at a time on the calling thread:

  reader     sampler + igpt_ds.train.pretrain.read_micro_batches (+ a non-blocking device copy on CUDA)
  in-memory  the same indices gathered from the whole split held in RAM, no masks: the ceiling for any reader

With --objective bert the reader also draws the masks, which cost more than the rows at 1024 tokens.

and `needed`: the tokens/s one GPU consumes when it trains at --train-tokens-per-s (default: the
H200 anchor of docs/reference.md#measured-anchor, 530k tokens/s for iGPT-S compiled), so headroom = reader / needed.
Shards are read from the page cache once warm; a cold first epoch on a network file system is
slower and is not what this measures.

    python bench/data_throughput.py --shards demo_out/shards
    python bench/data_throughput.py --synthetic 20000 --n-px 32 --global-batch 128 --dp 8
    python bench/data_throughput.py --synthetic 20000 --n-px 32 --objective bert

--synthetic N writes N random 3-channel images to a temporary folder and builds shards from them with
data_tools.build_shards (a 16-colour palette: the vocabulary size does not change the reading cost).
Writes data_throughput.json into --out-dir (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.build_shards import main as build_shards
from igpt_ds.data.sampler import GlobalBatchSampler
from igpt_ds.data.shards import ShardSplit
from igpt_ds.train.pretrain import read_micro_batches

REPO = Path(__file__).resolve().parent.parent
ANCHOR_TOKENS_PER_S = 530_000
"""docs/reference.md#measured-anchor: iGPT-S shape, torch.compile, one H200."""


def synthetic_shards(n_images: int, n_px: int, folder: Path, k: int = 16) -> Path:
    """Random images -> shards (a k-colour palette) under `folder` through the real shard builder."""
    images = np.random.default_rng(0).integers(0, 256, (n_images, n_px, n_px, 3), dtype=np.uint8)
    np.save(folder / "images.npy", images)
    out = folder / "shards"
    argv = [str(folder / "images.npy"), "--out", str(out), "--n-px", str(n_px), "--k", str(k)]
    if build_shards([*argv, "--palette-samples", "20000", "--workers", "1", "--val-fraction", "0"]) != 0:
        raise SystemExit("building synthetic shards failed")
    return out


def rate(fetch: Callable[[np.ndarray], Any], sampler: GlobalBatchSampler, steps: int, warmup: int) -> float:
    """Steps per second of `fetch(sampler.next_indices())`, after `warmup` untimed steps."""
    device = torch.device("cuda") if torch.cuda.is_available() else None
    for _ in range(warmup):
        fetch(sampler.next_indices())
    start = time.perf_counter()
    for _ in range(steps):
        fetch(sampler.next_indices())
    if device is not None:
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def measure(split: ShardSplit, args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s of the reader and of the in-memory ceiling, for rank 0 of args.dp ranks."""
    cuda = torch.cuda.is_available()

    def to_device(host: torch.Tensor) -> torch.Tensor:
        return host.pin_memory().to("cuda", non_blocking=True) if cuda else host

    def read(idx: np.ndarray) -> list[torch.Tensor]:
        mask_key = (0, 0, int(idx[0])) if args.objective == "bert" else None
        batches = read_micro_batches(split, idx, args.micro_batch, 0.15, mask_key, pin=cuda)
        return [t.to("cuda", non_blocking=True) if cuda else t for batch in batches for t in batch if t is not None]

    whole = split.batch(np.arange(len(split)))[0]  # the split in RAM, for the ceiling
    fetchers = {"reader": read, "in-memory": lambda idx: to_device(torch.from_numpy(whole[idx]))}
    per_rank = args.global_batch // args.dp
    results = []
    for name, fetch in fetchers.items():
        sampler = GlobalBatchSampler(len(split), args.global_batch, dp_rank=0, dp_size=args.dp, seed=0)
        steps_per_s = rate(fetch, sampler, args.steps, args.warmup)
        tokens_per_s = steps_per_s * per_rank * split.seq_len
        results.append({"peer": name, "tokens_per_s": tokens_per_s, "samples_per_s": steps_per_s * per_rank,
                        "ms_per_step": 1e3 / steps_per_s})  # fmt: skip
    for r in results:
        r["x_in_memory"] = r["tokens_per_s"] / results[1]["tokens_per_s"]
        r["x_needed"] = r["tokens_per_s"] / args.train_tokens_per_s
    return {
        "shards": str(args.shards or f"synthetic ({args.synthetic} random images)"), "n_images": len(split),
        "n_px": split.n_px, "objective": args.objective, "global_batch": args.global_batch, "dp": args.dp,
        "per_rank_batch": per_rank, "micro_batch": args.micro_batch,
        "device_copy": cuda, "needed_tokens_per_s": args.train_tokens_per_s, "steps": args.steps, "results": results,
    }  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", type=Path, help="shard folder (manifest.json)")
    source.add_argument("--synthetic", type=int, metavar="N", help="build shards of N random images first")
    p.add_argument("--n-px", type=int, default=32, help="image side of --synthetic images")
    p.add_argument("--split", default="train")
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--dp", type=int, default=1, help="data-parallel ranks sharing the global batch")
    p.add_argument("--micro-batch", type=int, default=16, help="samples a forward pass (a rank's share is split so)")
    p.add_argument("--objective", choices=("ar", "bert"), default="ar", help="bert: the reader draws masks too")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--train-tokens-per-s", type=float, default=ANCHOR_TOKENS_PER_S)
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default="data_throughput", help="output file stem")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.global_batch % (args.dp * args.micro_batch):
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by --dp {args.dp} x --micro-batch "
                         f"{args.micro_batch}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = args.shards or synthetic_shards(args.synthetic, args.n_px, Path(tmp))
        report = measure(ShardSplit(root, args.split), args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    print(f"{report['shards']}: {report['n_images']} images of {report['n_px']}x{report['n_px']}, rank 0 of {args.dp} "
          f"takes {report['per_rank_batch']} a step; needed {args.train_tokens_per_s:,.0f} tokens/s")  # fmt: skip
    for r in report["results"]:
        print(f"  {r['peer']:>9}: {r['tokens_per_s']:>14,.0f} tokens/s  {r['ms_per_step']:8.3f} ms/step  "
              f"{r['x_in_memory']:.2f}x in-memory  {r['x_needed']:.1f}x needed")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
