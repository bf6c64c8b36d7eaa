"""Training throughput of one iGPT shape under several implementations ("peers"), measured in one run.

Issue 6, part 1. Every peer trains the same shape (preset, n_px, micro-batch, precision) on the same
token batches with the same recipe (AdamW β=(0.9, 0.95), no weight decay, gradient clipping, loss
= mean cross-entropy over all n_px² pixels; the plain loops keep the learning rate constant where
DeepSpeed follows igpt_ds.train.engine's warmup, which costs nothing), so peers measured in one run compare
like with like:

  hf        HF transformers ImageGPTForCausalImageModeling, randomly initialised locally (config from
            igpt_ds.checkpoint.hf_interop: no dropout, as iGPT trains; HF attention is eager), plain PyTorch loop
  eager     igpt_ds.models.igpt.IGPT, plain PyTorch loop (bf16: torch.autocast over fp32 weights)
  compile   the same, model.loss under torch.compile
  ds        IGPT through igpt_ds.train.pretrain.build_model + igpt_ds.train.engine: the pretraining path
  pipe      IGPTPipe through DeepSpeed's pipeline engine (one stage per process here)
  trainer   the pretraining entry point itself, igpt_ds.train.pretrain.train, on --shards (reader thread,
            logging, stop flag; ZeRO layout); its figures are the last log window's, read from its
            metrics, which starts after at least --warmup steps

A peer is `NAME[:key=value,...]`. Keys: `ckpt=1` activation checkpointing, `fused=1` fused AdamW,
`sdpa=flash|efficient|cudnn|math` pin the attention kernel; for ds/pipe/trainer also `config=PATH` (policy
JSON, default --ds-config; `config=default` for the trainer: no JSON named, the engine policy a run gets by
itself, igpt_ds.train.engine.choose_policy), `stage=N`, `compile=1` (DeepSpeed's engine.compile()), and any other key
(ds, pipe, trainer) as a zero_optimization override (`stage3_param_persistence_threshold=1e5`, `overlap_comm=false`).
Each peer runs in its own child process: its peak memory, DeepSpeed state and compile caches are its
own, and one failure (out of memory, say) is recorded without losing the others.

Reported per peer (the best of `--repeats` round-robin runs), over `--steps` timed steps after
`--warmup` untimed ones (compilation and allocation happen there): tokens/s, samples/s, achieved
TFLOP/s and MFU (igpt_ds.models.flops: 6·N + 12·L·T·d per token against the device's peak bf16 rate; none on
CPU), peak memory (CUDA: max allocated; CPU: peak RSS growth of the child), and the share of wall time
the host spent fetching and copying batches (an upper bound on data stalls: the GPU runs ahead of
the host when the host is fast enough).

    python bench/train_throughput.py                         # CPU: igpt-tiny, 8x8, fp32, hf eager ds
    python bench/train_throughput.py --size igpt-s --n-px 32 --micro-batch 16 --precision bf16 \\
        --ds-config ds_configs/zero1_bf16.json --peers hf eager compile ds ds:stage=3 --out-dir $OUT

Writes train_throughput.json and train_throughput.md into --out-dir (default bench/results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from igpt_ds.config import ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from igpt_ds.models.flops import mfu, peak_flops, train_flops_per_token
from igpt_ds.models.igpt import IGPT, count_parameters
from igpt_ds.models.objectives import objective_loss

REPO = Path(__file__).resolve().parent.parent

IMPLS = ("hf", "eager", "compile", "ds", "pipe", "trainer")
PLAIN_OPTIONS = {"hf": {"fused"}, "eager": {"fused", "ckpt", "sdpa"}, "compile": {"fused", "ckpt", "sdpa"}}
"""Options the plain loops understand; DeepSpeed peers pass unknown keys to zero_optimization, which checks them."""
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
BASELINES = ("hf", "eager", "compile")
"""Peers every other peer's tokens/s is divided by, when they ran."""


@dataclass
class Peer:
    spec: str
    impl: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.impl, _, rest = self.spec.partition(":")
        if self.impl not in IMPLS:
            raise SystemExit(f"peer {self.spec!r}: name must be one of {IMPLS}")
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise SystemExit(f"peer {self.spec!r}: options look like key=value, got {item!r}")
            self.options[key] = _scalar(value)
        unknown = set(self.options) - PLAIN_OPTIONS.get(self.impl, set(self.options))
        if unknown:
            raise SystemExit(f"peer {self.spec!r}: {self.impl} takes {sorted(PLAIN_OPTIONS[self.impl])}, not {unknown}")
        if self.options.get("sdpa", "flash") not in SDPA_BACKENDS:
            raise SystemExit(f"peer {self.spec!r}: sdpa must be one of {list(SDPA_BACKENDS)}")

    def flag(self, key: str) -> bool:
        return bool(self.options.get(key, False))


def _scalar(text: str) -> Any:
    """'1' -> 1, '1e5' -> 100000.0, 'false' -> False, else the text."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


# ------------------------------------------------------------------ one peer (child process)


def sdpa_context(peer: Peer) -> contextlib.AbstractContextManager:
    """Pin scaled_dot_product_attention to one kernel when the peer asks for it."""
    if "sdpa" not in peer.options:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[peer.options["sdpa"]])])


def plain_step(peer: Peer, cfg: ModelConfig, args: argparse.Namespace, device: torch.device):
    """Model + optimizer + one-step closure of a plain PyTorch loop (hf, eager, compile)."""
    if peer.impl == "hf":
        from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

        from igpt_ds.checkpoint.hf_interop import hf_config_from_model_config, hf_input_ids

        model = ImageGPTForCausalImageModeling(ImageGPTConfig(**hf_config_from_model_config(cfg))).to(device)
        info = {"attn_implementation": model.config._attn_implementation}
        loss_fn = lambda t: objective_loss(model(hf_input_ids(t, cfg.n_vocab)).logits, t, None)
    else:
        model = IGPT(cfg).to(device)
        model.activation_checkpointing = peer.flag("ckpt")
        loss_fn = torch.compile(model.loss) if peer.impl == "compile" else model.loss
        info = {}
    optim = OptimConfig()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                            fused=peer.flag("fused") or None)  # fmt: skip
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    def step(tokens: torch.Tensor) -> torch.Tensor:
        with amp:
            loss = loss_fn(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    model.train()
    return step, dict(info, n_params=sum(p.numel() for p in params))


def deepspeed_step(peer: Peer, cfg: ModelConfig, args: argparse.Namespace, device: torch.device):
    """The pretraining path: igpt_ds.train.pretrain.build_model + igpt_ds.train.engine, ZeRO or pipeline engine."""
    from igpt_ds.distributed.process_group import init_distributed
    from igpt_ds.train.engine import initialize
    from igpt_ds.train.pretrain import build_model

    _, world = init_distributed(timeout_s=600)
    pipeline = peer.impl == "pipe"
    run, ds_config = pretrain_config(peer, cfg, args, world, args.warmup + args.steps)
    model = build_model(run, ds_config)
    engine = initialize(model, ds_config, run.optim, run.train.max_steps, compile_model=run.train.compile)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        if pipeline:
            return engine.train_batch(iter([(tokens, tokens)]))
        loss = objective_loss(engine(tokens), tokens, None)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    return step, {"ds_config": ds_config, "n_params": n_params}


def pretrain_config(
    peer: Peer, cfg: ModelConfig, args: argparse.Namespace, world: int, max_steps: int
) -> tuple[PretrainConfig, dict[str, Any]]:
    """The run config and DeepSpeed config of a ds / pipe / trainer peer: one micro-batch a step."""
    from igpt_ds.train.engine import build_ds_config

    opts = dict(peer.options)
    pipeline = peer.impl == "pipe"
    config = str(opts.pop("config", args.ds_config))
    train = TrainConfig(
        ds_config="" if config == "default" else config, layout="pipeline" if pipeline else "zero",
        pipeline_stages=world if pipeline else 1, activation_checkpointing=bool(opts.pop("ckpt", False)),
        compile=bool(opts.pop("compile", False)), global_batch=args.micro_batch * world,
        micro_batch=args.micro_batch, max_steps=max_steps,
    )  # fmt: skip
    run = PretrainConfig(model=cfg, optim=OptimConfig(fused=bool(opts.pop("fused", False))), train=train)
    ds_config = build_ds_config(train, run.optim, world, model=cfg)
    if config == "default":  # the engine policy a run naming no JSON gets (igpt_ds.train.engine.choose_policy), as is
        return run, ds_config
    # Bench-time levers, applied to this run's copy only: the policy files in ds_configs/ stay as they are.
    ds_config["bf16"] = {"enabled": args.precision == "bf16"}
    opts.pop("sdpa", None)
    zero = ds_config.setdefault("zero_optimization", {})
    if "stage" in opts:
        zero["stage"] = opts.pop("stage")
    zero.update(opts)
    return run, ds_config


def measure_trainer(peer: Peer, cfg: ModelConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Run igpt_ds.train.pretrain.train on --shards and report its last log window (whole steps, no warmup)."""
    from igpt_ds.config import DataConfig
    from igpt_ds.data.shards import ShardSplit
    from igpt_ds.train.engine import OWNED_KEYS
    from igpt_ds.train.pretrain import train

    if not args.shards:
        raise SystemExit("the trainer peer reads shards: pass --shards")
    cfg = ModelConfig(size=cfg.size, n_px=cfg.n_px, n_vocab=ShardSplit(args.shards, "train").n_vocab)
    windows = 1 + -(-args.warmup // args.steps)  # whole windows of --steps; the first ones hold the warmup
    run, ds_config = pretrain_config(peer, cfg, args, 1, windows * args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        if run.train.ds_config:  # the bench's DeepSpeed config, less what the run config owns
            policy = Path(tmp) / "policy.json"
            policy.write_text(json.dumps({k: v for k, v in ds_config.items() if k not in OWNED_KEYS}))
            run.train.ds_config = str(policy)
        run.data = DataConfig(shards=args.shards, val_split="train")  # evaluation is off: any split will do
        run.train.run_root = tmp
        run.train.log_every, run.train.eval_every, run.train.save_every = args.steps, 0, run.train.max_steps
        last = train(run)
        ds_config = json.loads((run.train.run_dir / "ds_config.json").read_text())  # what the run used
    tokens_per_s = last["perf/tokens_per_s"]
    memory = last.get("memory/max_allocated_gib", last.get("memory/max_rss_gib"))
    return {
        "peer": peer.spec, "impl": peer.impl, "options": peer.options,
        "tokens_per_s": tokens_per_s, "samples_per_s": last["perf/samples_per_s"],
        "step_ms": 1e3 * last["perf/step_time_s"], "tflops": tokens_per_s * train_flops_per_token(cfg) / 1e12,
        "mfu": mfu(tokens_per_s, cfg, peak_flops()), "peak_mem_gib": memory,
        "mem_kind": "trainer's memory/max_allocated_gib (cuda) or max_rss_gib (cpu)",
        "data_wait_frac": last["perf/data_wait_frac"], "mean_loss": last["train/loss"], "ds_config": ds_config,
        "n_params": count_parameters(cfg),
    }  # fmt: skip


class Batches:
    """Token batches on the host (pinned on CUDA), copied to the device without blocking.

    Synthetic uniform tokens by default; with --shards, the pretraining reader and sampler
    (igpt_ds.data.shards), so the data-wait share measures the real data path.
    """

    def __init__(self, args: argparse.Namespace, cfg: ModelConfig, device: torch.device):
        self.device, self.micro = device, args.micro_batch
        self.pin = device.type == "cuda"
        if args.shards:
            from igpt_ds.data.sampler import GlobalBatchSampler
            from igpt_ds.data.shards import ShardSplit

            self.split = ShardSplit(args.shards, "train")
            self.sampler = GlobalBatchSampler(len(self.split), self.micro, 0, 1, seed=0)
        else:
            self.split = None
            gen = torch.Generator().manual_seed(0)
            pool = torch.randint(0, cfg.n_vocab, (8, self.micro, cfg.seq_len), generator=gen)
            self.pool = pool.pin_memory() if self.pin else pool
            self.i = 0

    def next(self) -> torch.Tensor:
        if self.split is not None:
            host = torch.from_numpy(self.split.batch(self.sampler.next_indices())[0])
            host = host.pin_memory() if self.pin else host
        else:
            host, self.i = self.pool[self.i % len(self.pool)], self.i + 1
        return host.to(self.device, non_blocking=True)


def _rss_bytes(field_name: str) -> int:
    """VmRSS / VmHWM of this process (Linux), bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field_name))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(peer: Peer, args: argparse.Namespace) -> dict[str, Any]:
    """Build the peer, run warmup + timed steps, return its figures."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(size=args.size, n_px=args.n_px)
    if peer.impl == "trainer":
        return measure_trainer(peer, cfg, args)
    rss_start = _rss_bytes("VmRSS")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    build = deepspeed_step if peer.impl in ("ds", "pipe") else plain_step
    step, info = build(peer, cfg, args, device)
    batches = Batches(args, cfg, device)
    with sdpa_context(peer):
        start = time.perf_counter()
        for _ in range(args.warmup):
            step(batches.next())
        sync(device)
        warmup_s = time.perf_counter() - start
        total, fetch_s = torch.zeros((), device=device), 0.0
        start = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            tokens = batches.next()
            fetch_s += time.perf_counter() - t0
            total += step(tokens)  # stays on the device: no host sync inside the timed loop
        sync(device)
        elapsed = time.perf_counter() - start
    tokens_per_s = args.steps * args.micro_batch * cfg.seq_len / elapsed
    peak = peak_flops(device)
    if device.type == "cuda":
        peak_mem, mem_kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        peak_mem, mem_kind = _rss_bytes("VmHWM") - rss_start, "cpu peak RSS growth"
    return {
        "peer": peer.spec, "impl": peer.impl, "options": peer.options,
        "tokens_per_s": tokens_per_s, "samples_per_s": tokens_per_s / cfg.seq_len,
        "step_ms": 1e3 * elapsed / args.steps, "tflops": tokens_per_s * train_flops_per_token(cfg) / 1e12,
        "mfu": mfu(tokens_per_s, cfg, peak), "peak_mem_gib": peak_mem / 2**30, "mem_kind": mem_kind,
        "data_wait_frac": fetch_s / elapsed, "warmup_s": warmup_s, "mean_loss": float(total) / args.steps,
        **info,
    }  # fmt: skip


# ------------------------------------------------------------------ the run (parent process)


def machine() -> dict[str, Any]:
    """What ran the benchmark, for the results file."""
    desc = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "device": "cpu"}  # fmt: skip
    if torch.cuda.is_available():
        desc.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    for package in ("deepspeed", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            desc[package] = metadata.version(package)
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    desc["git"] = git.stdout.strip()
    return desc


def run_child(peer: Peer, argv: list[str], timeout_s: int) -> dict[str, Any]:
    """Measure one peer in a fresh interpreter; a failure becomes an {'error': ...} record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        cmd = [sys.executable, __file__, *argv, "--peers", peer.spec, "--child-out", str(out)]
        try:
            child = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"peer": peer.spec, "impl": peer.impl, "error": f"timed out after {timeout_s} s"}
        if child.returncode != 0 or not out.is_file():
            lines = [line.strip() for line in (child.stderr + child.stdout).splitlines() if line.strip()]
            last = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
            return {"peer": peer.spec, "impl": peer.impl, "error": last or f"exit status {child.returncode}"}
        return json.loads(out.read_text())


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest successful run (the least disturbed by other processes), every run's tokens/s beside it."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    return dict(max(ok, key=lambda r: r["tokens_per_s"]), tokens_per_s_runs=[r["tokens_per_s"] for r in ok])


def ratios(results: list[dict[str, Any]]) -> None:
    """Add `x_<baseline>` = tokens/s over the first successful run of each baseline implementation."""
    base = {}
    for r in results:
        if r["impl"] in BASELINES and "error" not in r:
            base.setdefault(r["impl"], r["tokens_per_s"])
    for r in results:
        if "error" not in r:
            r["ratio"] = {f"x_{name}": r["tokens_per_s"] / value for name, value in base.items()}


def markdown(report: dict[str, Any]) -> str:
    shape, results, mach = report["shape"], report["results"], report["machine"]
    names = sorted({k for r in results for k in r.get("ratio", {})}, key=lambda k: BASELINES.index(k[2:]))
    head = ["peer", "tokens/s", "samples/s", "TFLOP/s", "MFU", "peak mem GiB", "data wait", *names]
    lines = [
        f"{shape['size']} ({shape['n_layer']} layers, d {shape['n_embd']}, seq {shape['seq_len']}), micro-batch "
        f"{shape['micro_batch']}, {shape['precision']}, {report['steps']} timed steps after {report['warmup']}, "
        f"best of {report['repeats']} run(s) a peer; "
        f"device: {mach['device']} ({mach['cpu_count']} CPUs), git {mach['git']}",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for r in results:
        if "error" in r:
            error = r["error"][:160].replace("|", "/")
            lines.append(f"| {r['peer']} | failed: {error} |" + " |" * (len(head) - 2))
            continue
        util = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        cells = [r["peer"], f"{r['tokens_per_s']:,.0f}", f"{r['samples_per_s']:,.1f}", f"{r['tflops']:.3g}", util,
                 f"{r['peak_mem_gib']:.2f}", f"{100 * r['data_wait_frac']:.1f}%"]  # fmt: skip
        cells += [f"{r['ratio'][n]:.2f}x" if n in r["ratio"] else "" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="igpt-tiny", help="model preset (igpt_ds.config.MODEL_SIZES)")
    p.add_argument("--n-px", type=int, default=8, help="image side; sequence = n_px²")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument(
        "--ds-config", default="ds_configs/zero1_bf16.json" if torch.cuda.is_available() else "ds_configs/cpu.json"
    )
    p.add_argument("--peers", nargs="+", default=["hf", "eager", "ds"], help="NAME[:key=value,...] (see above)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation, allocation)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument(
        "--shards", help="shard folder: feed batches through igpt_ds.data.shards instead of synthetic tokens"
    )
    p.add_argument("--repeats", type=int, default=1, help="runs of each peer, round robin; the fastest is reported")
    p.add_argument("--peer-timeout", type=int, default=900, help="seconds one peer may take")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default="train_throughput", help="output file stem")
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)  # set by the parent for each peer
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    peers = [Peer(spec) for spec in args.peers]
    if args.child_out:
        args.child_out.write_text(json.dumps(measure(peers[0], args), default=str))
        return 0
    shared = ["--size", args.size, "--n-px", str(args.n_px), "--micro-batch", str(args.micro_batch),
              "--precision", args.precision, "--ds-config", args.ds_config, "--warmup", str(args.warmup),
              "--steps", str(args.steps)] + (["--shards", args.shards] if args.shards else [])  # fmt: skip
    cfg = ModelConfig(size=args.size, n_px=args.n_px)
    runs: dict[str, list[dict[str, Any]]] = {peer.spec: [] for peer in peers}
    for _ in range(args.repeats):  # round robin: a slow spell of a shared machine hits every peer
        for peer in peers:
            r = run_child(peer, shared, args.peer_timeout)
            runs[peer.spec].append(r)
            print(f"{peer.spec:>40}: " + (f"{r['tokens_per_s']:,.0f} tokens/s" if "error" not in r else r["error"]))
    results = [best_run(runs[peer.spec]) for peer in peers]
    ratios(results)
    shape = dict(size=args.size, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, n_px=cfg.n_px,
                 seq_len=cfg.seq_len, micro_batch=args.micro_batch, precision=args.precision)  # fmt: skip
    report = {
        "machine": machine(), "shape": shape, "ds_config": args.ds_config, "warmup": args.warmup,
        "steps": args.steps, "repeats": args.repeats, "flops_per_token": train_flops_per_token(cfg),
        "data": args.shards or "synthetic",
        "results": results,
    }  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out_dir / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if all("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
