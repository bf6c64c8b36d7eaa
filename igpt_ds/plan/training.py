"""Capacity planner: memory per GPU, communication and step time of every iGPT layout, 1 to 1024 GPUs.

For a model, a global batch and a cluster it enumerates layouts — ZeRO stage 0-3 data parallel, with
or without optimizer / parameter offload, pipeline x data parallel (ZeRO-0/1, as DeepSpeed's pipeline
engine requires), activation checkpointing on or off, every micro-batch that divides the batch — and
estimates for each:

- memory per GPU: bf16 parameters, gradients, fp32 master weights + Adam moments (ZeRO, Rajbhandari
  et al. 2020: partitioned over data-parallel ranks from stage 3, 2, 1 respectively), the ZeRO-3
  working set of one gathered layer, DeepSpeed's communication buckets, activations (itemised per
  layer below; with checkpointing one block input per layer plus one block recomputed), and the
  transient fp32 gradient copy of the optimizer step. Peak = states + buckets + max(activations,
  step transient): activations are gone by the time the optimizer steps.
- communication per optimizer step through each GPU's link (ring collectives move (D-1)/D of the
  data): ZeRO-0/1 one all-reduce of the gradients, ZeRO-2 a reduce-scatter every micro-batch and one
  parameter all-gather, ZeRO-3 two all-gathers and a reduce-scatter every micro-batch; pipeline
  activations and their gradients at every stage boundary.
- step time: compute from the measured single-GPU tokens/s at this shape (or peak x an assumed MFU),
  x 4/3 with recomputation, x (1 + (P-1)/m) pipeline bubble for 1F1B with m micro-batches (Narayanan
  et al. 2021); plus communication not hidden behind compute (`overlap`), plus offload traffic over
  PCIe and the CPU Adam step, which DeepSpeed does not overlap.

Checked in tests/test_planner.py against DeepSpeed's own estimators (estimate_zero3/zero2_model_states_
mem_needs) and against bytes measured on a real model on the CPU. The step-time model is only as good
as `tokens_per_s` and `overlap`: calibrate both with bench/train_throughput.py on the target machine.

Command: `python launcher/plan.py --model.size igpt-l --train.global_batch 128 --cluster.gpus '[1,8,64,1024]'`.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from igpt_ds.atomic import write_text
from igpt_ds.config import (
    DS_CONFIGS_DIR,
    ConfigError,
    PretrainConfig,
    find_shipped,
    load_policy,
    offloaded,
    to_dict,
    zero_stage,
)
from igpt_ds.plan.memory import (
    ADAM_STATES,
    BF16,
    GIB,
    OFFLOADS,
    USABLE_FRACTION,
    Knobs,
    Layout,
    Shape,
    default_policy,
    memory,
)
from igpt_ds.plan.shards import ShardCost
from igpt_ds.plan.shards import describe as describe_shards


@dataclass
class ClusterConfig:
    """cluster: the machines to plan a pretraining run for."""

    gpus: list[int] = field(default_factory=lambda: [1, 8, 64, 256, 1024])
    """GPU counts to plan for; each gets its fastest layout that fits."""
    gpus_per_node: int = 8
    gpu_mem_gib: float = 139.0
    """Memory per GPU as torch reports it (H200: 139 GiB)."""
    usable_fraction: float = USABLE_FRACTION
    """Share of gpu_mem_gib a plan may fill: the CUDA context and allocator fragmentation take the rest."""
    intra_node_gbps: float = 450.0
    """GB/s per GPU inside a node, one direction (NVLink 4: 900 GB/s both ways)."""
    inter_node_gbps: float = 50.0
    """GB/s per GPU between nodes (one 400 Gb/s NIC per GPU)."""
    pcie_gbps: float = 50.0
    """GB/s host <-> GPU, for offloaded states."""
    cpu_mem_gib: float = 2000.0
    """Host memory per node, for offloaded states."""
    cores_per_node: int = 32
    """CPU cores per node, for the shard build's time."""
    cpu_adam_params_per_s: float = 2e9
    """Parameters per second one node's CPUs update with DeepSpeed's CPU Adam (assumption: measure it)."""
    tokens_per_s: float = 0.0
    """Measured single-GPU training tokens/s at this model shape (bench/train_throughput.py);
    0 = peak_tflops x assumed_mfu."""
    measured_micro_batch: int = 16
    """Micro-batch at which tokens_per_s was measured (or assumed_mfu holds)."""
    half_rate_tokens: float = 2048.0
    """Tokens per micro-batch at which a GPU runs at half its large-batch rate (launch overheads, thin
    matrix products): rate(m tokens) ∝ m / (m + half_rate_tokens). An assumption: fit it to the
    micro-batch sweep of bench/gpu_matrix.sh."""
    peak_tflops: float = 989.0
    assumed_mfu: float = 0.4
    overlap: float = 0.5
    """Share of communication time hidden behind compute (DeepSpeed overlap_comm, prefetch); calibrate."""

    def __post_init__(self) -> None:
        if not self.gpus or min(self.gpus) < 1:
            raise ConfigError(f"cluster.gpus={self.gpus} must be a list of GPU counts > 0")
        if not (0 < self.usable_fraction <= 1 and 0 <= self.overlap <= 1):
            raise ConfigError("cluster.usable_fraction and cluster.overlap must lie in [0, 1]")
        if min(self.intra_node_gbps, self.inter_node_gbps, self.pcie_gbps, self.tokens_per_s + 1) <= 0:
            raise ConfigError("cluster bandwidths must be > 0 and cluster.tokens_per_s >= 0")


@dataclass
class PlanConfig(PretrainConfig):
    """A pretraining config (same YAML presets) plus the cluster to plan for."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    top: int = 5
    """Fastest fitting layouts to list per GPU count."""
    train_images: int = 1_281_167
    """Training images the shards hold (ImageNet-1k train by default): their bytes on disk and build time."""
    views: int = 0
    """Augmented views of each training image (igpt-build-shards --views K), for the same."""
    json: str = ""
    """Also write every estimate to this JSON file."""


@dataclass
class Estimate:
    layout: Layout
    n_gpus: int
    dp: int
    grad_accum: int
    mem_gib: dict[str, float]
    cpu_mem_gib_per_node: float
    comm_gb: float
    """Bytes through each GPU's link per optimizer step, GB."""
    compute_s: float
    comm_s: float
    offload_s: float
    step_s: float
    tokens_per_s: float
    fits: bool

    def row(self) -> dict[str, Any]:
        return dict(asdict(self), layout=self.layout.name, **{f"layout_{k}": v for k, v in asdict(self.layout).items()})


def estimate(
    shape: Shape, layout: Layout, n_gpus: int, global_batch: int, cluster: ClusterConfig, knobs: Knobs
) -> Estimate:
    """Memory, communication and step time of one layout on `n_gpus` (which it must divide evenly)."""
    cfg = shape.cfg
    dp = n_gpus // layout.pp
    accum = global_batch // (layout.micro_batch * dp)
    n = shape.stage_params(layout.pp)
    mem = memory(shape, layout, dp, accum, knobs)
    ring = (dp - 1) / dp
    grads = BF16 * n * ring
    s = layout.zero_stage
    comm = {0: 2 * grads, 1: 2 * grads, 2: accum * grads + grads, 3: 3 * accum * grads}[s]
    dp_gbps = cluster.intra_node_gbps if dp <= cluster.gpus_per_node else cluster.inter_node_gbps
    comm_s = comm / (dp_gbps * 1e9)
    if layout.pp > 1:  # activations forward and their gradients backward, every micro-batch, every boundary
        p2p = 2 * accum * layout.micro_batch * cfg.seq_len * cfg.n_embd * BF16
        p2p_gbps = cluster.intra_node_gbps if n_gpus <= cluster.gpus_per_node else cluster.inter_node_gbps
        comm += p2p
        comm_s += p2p / (p2p_gbps * 1e9)
    rate = cluster.tokens_per_s or cluster.peak_tflops * 1e12 * cluster.assumed_mfu / shape.flops_per_token
    efficiency = lambda micro: micro * cfg.seq_len / (micro * cfg.seq_len + cluster.half_rate_tokens)
    rate *= efficiency(layout.micro_batch) / efficiency(cluster.measured_micro_batch)
    # Each pipeline stage runs its share of the blocks (the most loaded stage sets the pace).
    compute_s = global_batch * cfg.seq_len / dp / rate * math.ceil(cfg.n_layer / layout.pp) / cfg.n_layer
    compute_s *= 4 / 3 if layout.checkpointing else 1.0
    compute_s *= 1 + (layout.pp - 1) / accum
    offload_s = 0.0
    if layout.offload != "none":  # gradients down, updated bf16 parameters up, CPU Adam in between
        local = n / dp
        offload_s = (knobs.grad_accum_bytes + BF16) * local / (cluster.pcie_gbps * 1e9)
        offload_s += local * min(n_gpus, cluster.gpus_per_node) / cluster.cpu_adam_params_per_s
        if layout.offload == "param":  # every micro-batch fetches its partition forward and backward
            offload_s += 2 * accum * BF16 * local / (cluster.pcie_gbps * 1e9)
    step_s = compute_s + comm_s - cluster.overlap * min(compute_s, comm_s) + offload_s
    cpu_per_gpu = (knobs.grad_accum_bytes + ADAM_STATES) * n / dp if layout.offload != "none" else 0.0
    cpu_per_gpu += BF16 * n / dp if layout.offload == "param" else 0.0
    cpu_node = cpu_per_gpu * min(n_gpus, cluster.gpus_per_node) / GIB
    fits = mem["peak"] <= cluster.usable_fraction * cluster.gpu_mem_gib * GIB and cpu_node <= cluster.cpu_mem_gib
    return Estimate(
        layout=layout, n_gpus=n_gpus, dp=dp, grad_accum=accum, mem_gib={k: v / GIB for k, v in mem.items()},
        cpu_mem_gib_per_node=cpu_node, comm_gb=comm / 1e9, compute_s=compute_s, comm_s=comm_s, offload_s=offload_s,
        step_s=step_s, tokens_per_s=global_batch * cfg.seq_len / step_s, fits=fits,
    )  # fmt: skip


def layouts(shape: Shape, n_gpus: int, global_batch: int) -> Iterator[Layout]:
    """Every layout DeepSpeed can run for this model on `n_gpus` at this global batch."""
    pps = [p for p in range(1, shape.cfg.n_layer + 1) if n_gpus % p == 0]  # stages may hold unequal blocks
    for pp, stage, offload, ckpt in itertools.product(pps, range(4), OFFLOADS, (False, True)):
        if pp > 1 and (stage > 1 or offload != "none"):
            continue
        if offload == "optimizer" and stage == 0 or offload == "param" and stage != 3:
            continue  # DeepSpeed offloads ZeRO's partitioned states: none to offload at stage 0
        dp = n_gpus // pp
        for micro in (1, 2, 4, 8, 16, 32, 64):
            if global_batch % (micro * dp) == 0:
                yield Layout(stage, pp, offload, ckpt, micro)


def plan(cfg: PlanConfig, knobs: Knobs, gpus: list[int] | None = None) -> dict[int, list[Estimate]]:
    """For each GPU count of `gpus` (default cfg.cluster.gpus), every layout, fastest first (those that fit before
    the rest)."""
    shape = Shape.of(cfg.model)
    out = {}
    for n_gpus in gpus or cfg.cluster.gpus:
        rows = [
            estimate(shape, lay, n_gpus, cfg.train.global_batch, cfg.cluster, knobs)
            for lay in layouts(shape, n_gpus, cfg.train.global_batch)
        ]
        out[n_gpus] = sorted(rows, key=lambda e: (not e.fits, -e.tokens_per_s, e.mem_gib["peak"]))
    return out


def format_table(rows: list[Estimate]) -> str:
    """Markdown table of estimates."""
    cols = ["GPUs", "layout", "dp", "micro", "accum", "params", "grads", "optim", "act", "peak GiB", "comm GB"]
    cols += ["step s", "tokens/s", "fits"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for e in rows:
        m = e.mem_gib
        lines.append(
            f"| {e.n_gpus} | {e.layout.name} | {e.dp} | {e.layout.micro_batch} | {e.grad_accum} | {m['params']:.2f} | "
            f"{m['grads']:.2f} | {m['optimizer']:.2f} | {m['activations']:.2f} | {m['peak']:.2f} | {e.comm_gb:.2f} | "
            f"{e.step_s:.3f} | {e.tokens_per_s:,.0f} | {'yes' if e.fits else 'no'} |"
        )
    return "\n".join(lines)


# The report of the command line (launcher/plan.py, igpt-plan, python -m igpt_ds plan; igpt_ds.cli parses it).


def configured_layout(cfg: PlanConfig, policy: dict) -> Layout:
    """The layout the pretraining config itself would run."""
    moved = offloaded(policy)
    offload = "param" if "param" in moved else "optimizer" if "optimizer" in moved else "none"
    pp = cfg.train.pipeline_stages if cfg.train.layout == "pipeline" else 1
    return Layout(zero_stage(policy), pp, offload, cfg.train.activation_checkpointing, cfg.train.micro_batch)


def planned_policy(cfg: PlanConfig, n_gpus: int | None) -> tuple[Path, dict, str]:
    """(JSON, its contents, why) of the planned run on `n_gpus`: train.ds_config when named, else what the run would
    choose on a GPU of cluster.gpu_mem_gib (`memory.default_policy`, the same estimate; the planner plans GPU runs,
    whatever machine it runs on). `n_gpus` None: the configured layout does not fit that count, and ZeRO-3's JSON
    supplies the buckets of the layouts listed."""
    if cfg.train.ds_config:
        path = find_shipped(cfg.train.ds_config, DS_CONFIGS_DIR, "ds_configs", "train.ds_config")
        why = "named by train.ds_config"
    elif cfg.train.layout == "pipeline":
        path, why = DS_CONFIGS_DIR / "pipeline_zero1_bf16.json", "default policy of the pipeline layout"
    elif n_gpus is None:
        path, why = DS_CONFIGS_DIR / "zero3_bf16.json", "no default policy: the configured layout does not fit"
    else:
        usable = cfg.cluster.usable_fraction
        name, why = default_policy(cfg.model, cfg.train, n_gpus, cfg.cluster.gpu_mem_gib * GIB, usable)
        path = DS_CONFIGS_DIR / name
    return path, load_policy(path), why


def report(cfg: PlanConfig) -> None:
    """The planner's report (launcher/plan.py, igpt-plan): the plan per GPU count, printed, and `cfg.json` if
    set. Raises ConfigError for a DeepSpeed JSON that is missing or does not fit the layout."""
    shape = Shape.of(cfg.model)
    print(f"{cfg.model.size} at {cfg.model.n_px}x{cfg.model.n_px}: {shape.params / 1e6:.1f}M parameters, "
          f"global batch {cfg.train.global_batch}")  # fmt: skip
    result: dict[str, Any] = {"config": to_dict(cfg), "plans": {}}
    pp = cfg.train.pipeline_stages if cfg.train.layout == "pipeline" else 1
    for n_gpus in cfg.cluster.gpus:
        divides = n_gpus % pp == 0 and cfg.train.global_batch % (cfg.train.micro_batch * (n_gpus // pp)) == 0
        policy_file, policy, why = planned_policy(cfg, n_gpus if divides else None)
        mine, knobs = configured_layout(cfg, policy), Knobs.from_policy(policy)
        rows = plan(cfg, knobs, [n_gpus])[n_gpus]
        own = estimate(shape, mine, n_gpus, cfg.train.global_batch, cfg.cluster, knobs) if divides else None
        fitting = [e for e in rows if e.fits]
        fastest = (f"fastest that fits: {fitting[0].layout.name}, micro-batch {fitting[0].layout.micro_batch}, "
                   f"{fitting[0].tokens_per_s:,.0f} tokens/s" if fitting else "no layout fits")  # fmt: skip
        print(f"\n## {n_gpus} GPU{'s' if n_gpus > 1 else ''}: {fastest}")
        print(f"configured: {policy_file.name} ({why})")
        print(format_table(([own] if own else []) + fitting[: cfg.top]))
        if own is None:
            print(f"(the configured layout {mine.name} with micro-batch {mine.micro_batch} does not divide "
                  f"global batch {cfg.train.global_batch} over {n_gpus} GPUs)")  # fmt: skip
        result["plans"][n_gpus] = {"policy": str(policy_file), "why": why, "knobs": to_dict(knobs),
                                   "configured": own.row() if own else None,
                                   "all": [e.row() for e in rows]}  # fmt: skip
    cost = ShardCost(cfg.train_images, cfg.model.n_px, cfg.views)
    print(f"\n{describe_shards(cost, cfg.cluster.cores_per_node)}")
    result["shards"] = {"bytes": cost.total_bytes, "crop_bytes": cost.crop_bytes, "view_bytes": cost.view_bytes,
                        "crop_core_hours": cost.crop_core_hours, "view_core_hours": cost.view_core_hours}  # fmt: skip
    if cfg.json:
        write_text(cfg.json, json.dumps(result, indent=1))
        print(f"\nwrote {cfg.json}")
