"""DeepSpeed engine construction: the DeepSpeed JSON, optimizer, LR schedule, deepspeed.initialize.

The JSON under `ds_configs/` is engine policy only (ZeRO stage, precision, offload, buckets).
`build_ds_config` is the one function that writes batch sizes, gradient clipping and the optimizer
into it from the dataclasses, and it refuses a JSON that sets any of them itself: each value lives
in one place. Recipe (paper §3.3, REFERENCE.md): Adam β=(0.9, 0.95), no weight decay, linear
warmup then cosine decay to 0 (`lr_at`).

The optimizer is DeepSpeed's "AdamW" type with `torch_adam: true` (torch.optim.AdamW, fused when
`optim.fused`: no FusedAdam JIT build, runs on CPU); with ZeRO optimizer offload DeepSpeed's own
CPU Adam steps the offloaded states instead.

Any model trains through here, not only IGPT (fine-tuning passes its own module and loss):

    ds_config = build_ds_config(train_cfg, optim_cfg, world_size)
    with model_init_context(ds_config):          # ZeRO-3: parameters partitioned as they are built
        model = MyModel(...)
    engine = initialize(model, ds_config, optim_cfg, total_steps=train_cfg.max_steps)
    loss = my_loss(engine(batch)); engine.backward(loss); engine.step()
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn

from igpt_ds.config import ConfigError, OptimConfig, TrainConfig

# DeepSpeed keys that the dataclasses own, and where each value is set instead.
OWNED_KEYS = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "derived: train.global_batch / (train.micro_batch x data-parallel size)",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim.*",
    "scheduler": "optim.warmup_steps / optim.schedule",
}


def load_policy(path: str | Path) -> dict[str, Any]:
    """The engine-policy JSON, refused if it sets what the run config owns."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.ds_config={path} does not exist")
    try:
        policy = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.ds_config={path} is not valid JSON: {e}") from None
    clashes = [f"{k} (set {OWNED_KEYS[k]} instead)" for k in OWNED_KEYS if k in policy]
    if clashes:
        raise ConfigError(f"{path} must hold engine policy only; remove {', '.join(clashes)}")
    return policy


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def dp_size(train: TrainConfig, world_size: int) -> int:
    """Data-parallel replicas: every rank under ZeRO; world / stages under the pipeline layout."""
    if train.layout == "pipeline":
        if world_size % train.pipeline_stages:
            raise ConfigError(
                f"train.pipeline_stages={train.pipeline_stages} does not divide the world size {world_size}"
            )
        return world_size // train.pipeline_stages
    return world_size


def build_ds_config(
    train: TrainConfig, optim: OptimConfig, world_size: int, load_universal: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config actually used: policy JSON + batch sizes, clipping, optimizer."""
    policy = load_policy(train.ds_config)
    stage = zero_stage(policy)
    if train.layout == "pipeline" and stage > 1:
        raise ConfigError(
            f"train.layout=pipeline with ZeRO stage {stage} ({train.ds_config}): DeepSpeed's pipeline engine "
            "accepts ZeRO stage 0 or 1 only (its schedule accumulates gradients over micro-batches and reduces "
            "them once per step, which ZeRO-2's reduce-during-backward and ZeRO-3's per-layer parameter "
            "gathering break); use a ZeRO-1 JSON (ds_configs/pipeline_zero1_bf16.json, ds_configs/cpu.json) "
            "or train.layout=zero"
        )
    if train.layout == "zero" and train.pipeline_stages != 1:
        raise ConfigError(f"train.pipeline_stages={train.pipeline_stages} needs train.layout=pipeline")
    dp = dp_size(train, world_size)
    offload = policy.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if offload and optim.fused:
        raise ConfigError(
            f"optim.fused=true with ZeRO optimizer offload ({train.ds_config}): DeepSpeed's CPU Adam steps the "
            "offloaded states, torch's fused AdamW is not used; set optim.fused=false"
        )
    adam = dict(lr=optim.lr, betas=list(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.fused:
        adam["fused"] = True  # reaches torch.optim.AdamW; unset, torch picks its default (foreach on a GPU)
    cfg = dict(
        policy,
        train_batch_size=train.global_batch,
        train_micro_batch_size_per_gpu=train.micro_batch,
        gradient_accumulation_steps=train.grad_accum(dp),
        gradient_clipping=optim.grad_clip,
        optimizer={"type": "AdamW", "params": adam if offload else dict(adam, torch_adam=True)},
    )
    cfg.setdefault("steps_per_print", 2**31 - 1)  # the trainer's console line replaces DeepSpeed's
    if load_universal:
        cfg["checkpoint"] = dict(policy.get("checkpoint", {}), load_universal=True)
    return cfg


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to 0 or constant."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    return optim.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def model_init_context(ds_config: dict[str, Any]) -> contextlib.AbstractContextManager:
    """Build the model inside this: under ZeRO-3 each module is partitioned as soon as it exists,
    so a model larger than one device's memory never materialises whole on one rank."""
    if zero_stage(ds_config) == 3:
        return deepspeed.zero.Init(config_dict_or_path=ds_config)
    return contextlib.nullcontext()


def initialize(
    model: nn.Module,
    ds_config: dict[str, Any],
    optim: OptimConfig,
    total_steps: int,
    params: Iterable[nn.Parameter] | list[dict[str, Any]] | None = None,
    compile_model: bool = False,
) -> deepspeed.DeepSpeedEngine:
    """deepspeed.initialize with the schedule of `lr_at` (a PipelineModule gives a PipelineEngine).

    `params`: the trainable parameters or torch-style param groups (default: all that require
    grad); a group's own "lr" is scaled by the same schedule. `compile_model`: engine.compile()
    (torch.compile of the module, compiled on the first forward).
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, optim, total_steps) / optim.lr)

    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config, lr_scheduler=scheduler, dist_init_required=False
    )
    if compile_model:
        engine.compile()
    return engine


def apply_schedule(engine: deepspeed.DeepSpeedEngine) -> None:
    """Set the optimizer's rates from the schedule at its restored step. A resumed optimizer carries
    the rate of the run that saved it, which differs when that run's schedule did (a longer max_steps)."""
    sched = engine.lr_scheduler
    for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["lr"] = base * factor(sched.last_epoch)
