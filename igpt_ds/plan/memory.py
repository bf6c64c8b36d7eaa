"""Memory per GPU of a pretraining layout: the one estimate behind the default engine policy and the planner.

For a model (`Shape`, counted on the meta device), a layout (`Layout`: ZeRO stage, pipeline stages, offload,
activation checkpointing, micro-batch) and what the DeepSpeed JSON decides (`Knobs`: gradient accumulation dtype,
bucket sizes), `memory` itemises the bytes one GPU holds: bf16 parameters, gradients, fp32 master weights + Adam
moments (Rajbhandari et al. 2020, ZeRO: partitioned over data-parallel ranks from stage 3, 2, 1 respectively), the
ZeRO-3 working set of one gathered layer, DeepSpeed's communication buckets, activations (`activation_bytes_per_
token`) and the transient fp32 gradient copy of the optimizer step. Peak = states + buckets + max(activations, step
transient).

`default_policy` (applied by `igpt_ds.train.engine.choose_policy`) picks the lowest ZeRO stage whose peak fits
USABLE_FRACTION of the device; `igpt_ds.plan.training` adds communication and step time over every layout. Checked
in tests/test_planner.py against DeepSpeed's own estimators and bytes measured on a real engine
(bench/results/README.md, "Capacity planner checks").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from igpt_ds.config import DS_CONFIGS_DIR, ConfigError, ModelConfig, TrainConfig, load_policy, precision
from igpt_ds.models.flops import train_flops_per_token
from igpt_ds.models.igpt import IGPT

GIB = 2**30
BF16, FP32 = 2, 4
ADAM_STATES = 12
"""fp32 master weights + Adam m + Adam v, bytes per parameter."""
OFFLOADS = ("none", "optimizer", "param")
USABLE_FRACTION = 0.9
"""Share of a GPU's memory a layout may fill: the CUDA context, NCCL's buffers and allocator fragmentation take the
rest (a margin of 10%: 8 GiB of an 80 GB H100, 14 GiB of an H200's 141 GB)."""

# DeepSpeed 0.19.8 defaults for what the policy JSON may leave out (runtime/zero/config.py).
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7, "contiguous_gradients": True}


@dataclass(frozen=True)
class Knobs:
    """What the DeepSpeed policy JSON decides that changes memory."""

    grad_accum_bytes: int = FP32
    """Gradient accumulation dtype: fp32 (4) keeps bf16 accumulation error out of long accumulations."""
    reduce_bucket: float = DS_DEFAULTS["reduce_bucket_size"]
    """Elements of each gradient-reduction buffer, allocated whole whatever the model's size."""
    prefetch_bucket: float = DS_DEFAULTS["stage3_prefetch_bucket_size"]
    """ZeRO-3: elements of parameters gathered ahead of use."""
    contiguous_gradients: bool = DS_DEFAULTS["contiguous_gradients"]
    overlap_comm: bool | None = None
    """None: DeepSpeed's default, on for ZeRO-3 only. ZeRO-1/2 then double-buffer the reduction."""
    fused_optimizer: bool = False
    """igpt_ds.train.engine steps with torch.optim.AdamW (foreach: two fp32 temporaries); True for a fused Adam."""

    @classmethod
    def from_policy(cls, policy: dict[str, Any]) -> Knobs:
        zero = policy.get("zero_optimization", {})
        # DeepSpeed accumulates in the model's dtype unless data_types.grad_accum_dtype says otherwise.
        model_dtype = precision(policy)
        accum = policy.get("data_types", {}).get("grad_accum_dtype", model_dtype)
        return cls(
            grad_accum_bytes=FP32 if accum in ("fp32", "float32") else BF16,  # bf16 and fp16: 2 bytes
            reduce_bucket=float(zero.get("reduce_bucket_size", DS_DEFAULTS["reduce_bucket_size"])),
            prefetch_bucket=float(zero.get("stage3_prefetch_bucket_size", DS_DEFAULTS["stage3_prefetch_bucket_size"])),
            contiguous_gradients=bool(zero.get("contiguous_gradients", DS_DEFAULTS["contiguous_gradients"])),
            overlap_comm=zero.get("overlap_comm"),
        )


@dataclass(frozen=True)
class Shape:
    """What the planner needs from a model, counted on the meta device."""

    cfg: ModelConfig
    params: int
    block_params: int
    """Parameters of one transformer block."""
    edge_params: int
    """The larger of the embedding (first pipeline stage) and the final norm + head (last stage)."""
    largest_layer: int
    """Largest parameter count directly in one module, as DeepSpeed's model_to_params counts it."""
    flops_per_token: float

    @classmethod
    def of(cls, cfg: ModelConfig) -> Shape:
        with torch.device("meta"):
            model = IGPT(cfg)
        count = lambda m: sum(p.numel() for p in m.parameters())
        embed = count(model.wte) + count(model.wpe) + model.sos.numel()
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        head = count(model.ln_f) + count(model.lm_head)
        return cls(cfg, count(model), count(model.h[0]), max(embed, head), largest, train_flops_per_token(cfg))

    def stage_params(self, pp: int) -> int:
        """Parameters on the most loaded of `pp` pipeline stages (blocks split evenly, ends add their layers)."""
        if pp == 1:
            return self.params
        return math.ceil(self.cfg.n_layer / pp) * self.block_params + self.edge_params


@dataclass(frozen=True)
class Layout:
    zero_stage: int
    pp: int = 1
    offload: str = "none"
    checkpointing: bool = False
    micro_batch: int = 1

    def __post_init__(self) -> None:
        if (
            self.offload not in OFFLOADS
            or self.offload != "none"
            and self.zero_stage < {"optimizer": 1, "param": 3}[self.offload]
        ):
            raise ConfigError(
                f"offload={self.offload!r}: one of {OFFLOADS}; 'optimizer' needs ZeRO >= 1, 'param' ZeRO-3"
            )
        if self.pp > 1 and (self.zero_stage > 1 or self.offload != "none"):
            raise ConfigError("DeepSpeed's pipeline engine takes ZeRO stage 0 or 1 and no offload")

    @property
    def name(self) -> str:
        parts = [f"pp{self.pp}" if self.pp > 1 else "", f"zero{self.zero_stage}"]
        parts += [f"offload-{self.offload}" if self.offload != "none" else "", "ckpt" if self.checkpointing else ""]
        return "+".join(p for p in parts if p)


def activation_bytes_per_token(cfg: ModelConfig, norm_bytes: int = BF16) -> dict[str, float]:
    """Bytes one token's activations keep for backward, per block and for the head, bf16 compute.

    Per block (h = n_embd, a = n_head): two norm inputs (`norm_bytes` each per element: bf16 with
    CUDA's fused RMS norm; CPU's composite norm keeps an fp32 input and output, 8); the c_attn input
    2h; q, k, v 6h; SDPA output 2h + fp32 log-sum-exp 4a; c_proj input (a contiguous copy) 2h; c_fc
    input 2h; quick-GELU keeps c_fc's output 8h and the sigmoid 8h; the MLP c_proj input 8h. The
    flash / memory-efficient SDPA kernels keep no T x T matrix. Head: final-norm input, lm_head input
    2h, and the fp32 log-softmax the loss keeps, 4·n_vocab.
    """
    h = cfg.n_embd
    block = 2 * norm_bytes * h + (2 + 6 + 2 + 2 + 2 + 8 + 8 + 8) * h + 4 * cfg.n_head
    head = norm_bytes * h + 2 * h + 4 * cfg.n_vocab
    return {"block": block, "head": head, "block_input": BF16 * h}


def memory(shape: Shape, layout: Layout, dp: int, accum: int, knobs: Knobs, norm_bytes: int = BF16) -> dict[str, float]:
    """Bytes per GPU by kind (see module docstring) for `accum` micro-batches per step; 'peak' must fit.

    'model_states' (parameters, gradients, optimizer states, ZeRO-3 working layer) is what DeepSpeed's
    estimate_zero3_model_states_mem_needs counts; 'step_transient' comes on top during the step.
    """
    n = shape.stage_params(layout.pp)
    s, off = layout.zero_stage, layout.offload
    part = lambda from_stage: dp if s >= from_stage else 1  # ZeRO partitions this state from that stage on
    fp32_beside = knobs.grad_accum_bytes == FP32 and s <= 1
    mem = {
        "params": 0.0 if off == "param" else BF16 * n / part(3),
        # With fp32 accumulation at stage 0/1, DeepSpeed's BF16_Optimizer keeps the bf16 .grad beside it.
        "grads": 0.0 if off != "none" else knobs.grad_accum_bytes * n / part(2) + (BF16 * n if fp32_beside else 0),
        "optimizer": 0.0 if off != "none" else ADAM_STATES * n / part(1),
    }
    # ZeRO-3 gathers one layer's bf16 parameters and produces its full bf16 gradient before reduce-scatter.
    mem["zero3_working"] = 2 * BF16 * shape.largest_layer if s == 3 else 0.0
    # With contiguous gradients DeepSpeed reduces through buffers of reduce_bucket elements: ZeRO-1/2
    # stage them in the accumulation dtype (two with overlap_comm), ZeRO-3 in bf16; ZeRO-3 also keeps
    # up to prefetch_bucket elements of parameters gathered ahead.
    buckets = 0.0
    reduce_buffer = knobs.reduce_bucket if knobs.contiguous_gradients else 0.0
    if s in (1, 2):
        buckets = (2 if knobs.overlap_comm else 1) * knobs.grad_accum_bytes * reduce_buffer
    elif s == 3:
        buckets = BF16 * (reduce_buffer + min(knobs.prefetch_bucket, n))
    mem["buckets"] = buckets
    act = activation_bytes_per_token(shape.cfg, norm_bytes)
    tokens = layout.micro_batch * shape.cfg.seq_len
    layers = math.ceil(shape.cfg.n_layer / layout.pp)
    if layout.checkpointing:  # block inputs kept, one block's activations live while it is recomputed
        per_micro = tokens * (layers * act["block_input"] + act["block"])
    else:
        per_micro = tokens * layers * act["block"]
    in_flight = min(layout.pp, accum)  # 1F1B: stage 0 holds up to pp micro-batches' activations
    # The last stage (or the only one) also keeps the head's activations of the micro-batch in hand.
    mem["activations"] = per_micro * in_flight + tokens * act["head"]
    # The optimizer step flattens the local gradient partition into a new fp32 tensor (DeepSpeed
    # copies even when gradients accumulate in fp32); torch's foreach Adam adds two fp32 temporaries.
    step = FP32 + (0 if knobs.fused_optimizer else 2 * FP32)
    mem["step_transient"] = 0.0 if off != "none" else step * n / part(1)
    mem["model_states"] = mem["params"] + mem["grads"] + mem["optimizer"] + mem["zero3_working"]
    mem["peak"] = mem["model_states"] + buckets + max(mem["activations"], mem["step_transient"])
    return mem


DEFAULT_STAGES = (1, 2, 3)
"""ZeRO stages the default policy picks from, lowest first. Not ZeRO-0: ZeRO-1 communicates as much per step (a
reduce-scatter and an all-gather are one all-reduce) and holds 1/dp of the optimizer states; on one GPU the two
are the same. ZeRO-3 last: it gathers every layer's parameters in every forward and backward (66.9k tokens/s
against ZeRO-1's 109k for iGPT-S on one H200, docs/reference.md#measured-anchor) and its hooks cut torch.compile's
graphs at every module."""


def checkpoint_bytes(model: ModelConfig, ds_config: dict[str, Any]) -> int:
    """Bytes one checkpoint of `model` takes on disk, summed over ranks: the module's weights in the training
    precision (2 bytes bf16 / fp16, 4 fp32) and the fp32 master weights and Adam moments (ADAM_STATES), 14 or 16
    bytes a parameter whatever the ZeRO stage or rank count (ZeRO splits them over files, not copies them; run.json,
    RNG states and configs add kilobytes). iGPT-L at 32² in bf16: 19.1 GB."""
    weight = FP32 if precision(ds_config) == "fp32" else BF16
    return Shape.of(model).params * (ADAM_STATES + weight)


def default_policy(
    model: ModelConfig, train: TrainConfig, dp: int, device_bytes: float, usable: float = USABLE_FRACTION
) -> tuple[str, str]:
    """(shipped JSON, why) of a GPU run in the ZeRO layout that names no JSON: the lowest stage of DEFAULT_STAGES
    whose estimated peak memory per GPU (`igpt_ds.plan.memory`, with that JSON's buckets, at train.micro_batch and
    train.activation_checkpointing, over `dp` data-parallel ranks) fits `usable` (memory.USABLE_FRACTION) of
    `device_bytes`; ZeRO-3 when none does, saying so. The same estimate `launcher/plan.py` prints."""
    limit = usable * device_bytes
    for stage in DEFAULT_STAGES:
        name, peak = f"zero{stage}_bf16.json", estimated_peak(model, train, dp, stage)
        estimate = f"{peak / GIB:.1f} GiB a GPU by the estimate"
        room = f"{usable:.0%} of {device_bytes / GIB:.0f} GiB"
        if peak <= limit:
            return name, f"default policy: ZeRO-{stage}, the lowest stage that fits: {estimate} within {room}"
    ways = ["train.activation_checkpointing=true"] if not train.activation_checkpointing else []
    ways += ["a smaller train.micro_batch", "more GPUs", "ds_configs/zero3_offload.json"]
    return name, f"default policy: ZeRO-3, though no stage fits: {estimate} against {room}; try {', '.join(ways)}"


def estimated_peak(model: ModelConfig, train: TrainConfig, dp: int, stage: int) -> float:
    """Peak bytes a GPU of the ZeRO layout at `stage` with the shipped zero{stage}_bf16.json (`igpt_ds.plan.memory`)."""
    layout = Layout(stage, 1, "none", train.activation_checkpointing, train.micro_batch)
    knobs = Knobs.from_policy(load_policy(DS_CONFIGS_DIR / f"zero{stage}_bf16.json"))
    return memory(Shape.of(model), layout, dp, train.grad_accum(dp), knobs)["peak"]
