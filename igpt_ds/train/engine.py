"""DeepSpeed engine construction: the DeepSpeed JSON, optimizer, LR schedule, deepspeed.initialize.

The run config owns batch sizes, gradient clipping, the optimizer and the LR schedule; the DeepSpeed JSON
(`train.ds_config` / `--deepspeed_config`; by default the shipped one `choose_policy` picks for the accelerator
and, on a GPU, for the model's memory) sets engine policy (ZeRO stage, precision, offload, buckets).
`build_ds_config` is the one function that writes the run config's values into the JSON. A JSON brought from
DeepSpeedExamples or HF may set those keys too: values that agree and "auto" are accepted, a contradiction is
refused naming both.
Recipe (docs/reference.md#objectives-and-recipe): Adam β=(0.9, 0.95), no weight decay, linear warmup,
then cosine decay to 0 (`lr_at`).

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
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from torch import nn

from igpt_ds.checkpoint import resume
from igpt_ds.config import (
    DS_CONFIGS_DIR,
    ConfigError,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    find_shipped,
    load_policy,
    offloaded,
    origin_of,
    precision,
    zero_stage,
)
from igpt_ds.distributed import process_group
from igpt_ds.distributed.process_group import collective_device, without_cpu_shm_allreduce
from igpt_ds.plan.memory import DEFAULT_STAGES, GIB, USABLE_FRACTION, default_policy, estimated_peak

# DeepSpeed keys whose values the run config owns, and where each is set. A JSON may set them too (as
# DeepSpeedExamples and HF's JSONs do) if it agrees, or "auto" to take the run config's value.
OWNED_KEYS = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch / (train.micro_batch x data-parallel size)",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim.*",
    "scheduler": "optim.warmup_steps / optim.schedule",
}
ADAM_TYPES = ("adam", "adamw")
"""DeepSpeed optimizer types an `optimizer` section may name: the run trains with AdamW
(docs/reference.md#objectives-and-recipe)."""


@dataclass(frozen=True)
class Policy:
    """The DeepSpeed JSON a run uses and why: the run's header line and TensorBoard say both."""

    path: Path
    why: str
    follows_checkpoint: bool = False
    """The default of a GPU's ZeRO layout: a resumed run takes its checkpoint's stage (`choose_policy(stage=)`)."""


def choose_policy(
    train: TrainConfig, model: ModelConfig | None = None, world_size: int = 1, stage: int | None = None
) -> Policy:
    """The DeepSpeed JSON of this run: train.ds_config when named (a path or a shipped name); else by accelerator.

    A CPU: fp32 ZeRO-1 (cpu.json; bf16 on a CPU is slower than fp32 at these shapes). A GPU (bf16): the pipeline
    layout's pipeline_zero1_bf16.json (DeepSpeed's pipeline engine takes no higher stage); the ZeRO layout's
    `default_policy` for `model` on the smallest device of the job (`device_memory`: collective, so every rank
    picks the same), or the checkpoint's `stage` when resuming (a ZeRO checkpoint resumes at its own stage only).
    Without `model` (checks before the model is known), ZeRO-3's JSON stands in. ConfigError on a GPU without
    bf16."""
    if train.ds_config:
        path = find_shipped(train.ds_config, DS_CONFIGS_DIR, "ds_configs", "train.ds_config")
        return Policy(path, "named by train.ds_config")
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().device_name()
    if device == "cpu":
        return Policy(DS_CONFIGS_DIR / "cpu.json", "default policy on a CPU: fp32 ZeRO-1")
    if not accelerator_has_bf16():
        raise ConfigError(
            f"this {device} accelerator has no bf16 and no JSON was named: set train.ds_config (or "
            "--deepspeed_config) to a JSON with the precision you want (fp16 with loss scaling is untested here)"
        )
    if train.layout == "pipeline":
        return Policy(DS_CONFIGS_DIR / "pipeline_zero1_bf16.json", "default policy of the pipeline layout")
    if stage in DEFAULT_STAGES:
        why = f"default policy: ZeRO-{stage}, the checkpoint's"
        if model is not None:
            peak, room = estimated_peak(model, train, dp_size(train, world_size), stage), device_memory()
            if peak > USABLE_FRACTION * room:
                why += (f", though it does not fit: {peak / GIB:.1f} GiB a GPU by the estimate against "
                        f"{USABLE_FRACTION:.0%} of {room / GIB:.0f} GiB; to change stage, export the weights and "
                        "start a run with train.init_from")  # fmt: skip
        return Policy(DS_CONFIGS_DIR / f"zero{stage}_bf16.json", why, True)
    if model is None:
        return Policy(DS_CONFIGS_DIR / "zero3_bf16.json", "provisional, before the model is known", True)
    name, why = default_policy(model, train, dp_size(train, world_size), device_memory())
    return Policy(DS_CONFIGS_DIR / name, why, True)


def device_memory() -> int:
    """Bytes of memory of this rank's accelerator, the smallest over the job's ranks (one all-reduce), so that every
    rank takes the same decision from it."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    total = int(get_accelerator().total_memory())
    if dist.is_initialized() and dist.get_world_size() > 1:
        smallest = torch.tensor([float(total)], device=collective_device())
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        total = int(smallest.item())
    return total


def policy_path(train: TrainConfig, model: ModelConfig | None = None, world_size: int = 1) -> Path:
    """The DeepSpeed JSON this run uses (`choose_policy`)."""
    return choose_policy(train, model, world_size).path


def accelerator_has_bf16() -> bool:
    """Whether the accelerator DeepSpeed detected trains in bf16 (never the CPU accelerator: slower than fp32)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return acc.device_name() != "cpu" and acc.is_bf16_supported()


def _agree(source: str, key: str, given: Any, ours: Any, ours_name: str, ours_from: str) -> None:
    """Nothing when the JSON's `given` is "auto" or equals `ours`; else the one-line error naming both and their
    origins."""
    if given == "auto" or given == ours or (isinstance(given, list) and list(ours) == given):
        return
    raise ConfigError(
        f"{key}={given!r} in {source} contradicts {ours_name}={ours!r} ({ours_from}); make them agree "
        f'(or write "auto" in the JSON to take {ours_name})'
    )


def _optimizer(section: Any, source: str, optim: OptimConfig) -> None:
    """Check a JSON's optimizer section against optim.*: honoured when it names Adam/AdamW with agreeing params."""
    if not isinstance(section, dict) or str(section.get("type", "")).lower() not in ADAM_TYPES:
        kind = section.get("type") if isinstance(section, dict) else section
        raise ConfigError(
            f"optimizer type {kind!r} in {source} is not supported: igpt-ds trains with AdamW set by optim.* "
            "(the paper's recipe); Lamb, 1-bit Adam and other types are untested with its schedule and checkpoints; "
            "remove the optimizer section or make it Adam/AdamW"
        )
    params = section.get("params", {})
    ours = dict(lr=optim.lr, betas=list(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    for key, value in params.items():
        if key in ours:
            _agree(source, f"optimizer.params.{key}", value, ours[key], f"optim.{key}", origin_of(optim, key))
        elif not (key in ("torch_adam", "adam_w_mode") and value in (True, "auto")):
            raise ConfigError(
                f"optimizer.params.{key}={value!r} in {source} has no igpt-ds equivalent (it sets lr, betas, eps, "
                "weight_decay from optim.*, AdamW with decoupled weight decay); remove it"
            )


def fill_auto(node: Any, hidden_size: int | None, source: str, path: str = "") -> Any:
    """Replace the "auto" values HF's integration fills from the model, recursively; refuse any other "auto".

    ZeRO-3 buckets from the hidden size h, as transformers' HfDeepSpeedConfig does: reduce_bucket_size h²,
    stage3_prefetch_bucket_size 0.9 h², stage3_param_persistence_threshold 10 h; bf16/fp16 "enabled": "auto"
    means bf16 on an accelerator that has it and no fp16.
    """
    if isinstance(node, dict):
        return {k: fill_auto(v, hidden_size, source, f"{path}{k}.") for k, v in node.items()}
    if node != "auto":
        return node
    key = path.rstrip(".")
    by_hidden = {
        "zero_optimization.reduce_bucket_size": lambda h: h * h,
        "zero_optimization.stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    if key in by_hidden and hidden_size:
        return by_hidden[key](hidden_size)
    if key == "fp16.enabled":
        return False
    if key == "bf16.enabled":
        return accelerator_has_bf16()
    raise ConfigError(f'{key}="auto" in {source}: igpt-ds has no value to fill it with; write a value')


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
    train: TrainConfig, optim: OptimConfig, world_size: int, load_universal: bool = False,
    model: ModelConfig | None = None, policy: Policy | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The DeepSpeed config actually used: the JSON (`policy`, default `choose_policy(train, model, world_size)`)
    + batch sizes, clipping, optimizer.

    A JSON may carry the keys the run config owns (OWNED_KEYS) when they agree with it or say "auto"
    (filled from the run config, as HF's integration does; `model`'s width fills the ZeRO-3 bucket "auto"s).
    A contradiction raises ConfigError naming both values and where each came from; so does a `scheduler`
    section (the schedule is optim.*) and an optimizer other than Adam/AdamW.
    """
    path = (policy or choose_policy(train, model, world_size)).path
    hidden_size = model.n_embd if model is not None else None
    source = str(path)
    raw = load_policy(path)
    dp = dp_size(train, world_size)
    accum = train.grad_accum(dp)
    batch = {
        "train_batch_size": (train.global_batch, "train.global_batch", origin_of(train, "global_batch")),
        "train_micro_batch_size_per_gpu": (train.micro_batch, "train.micro_batch", origin_of(train, "micro_batch")),
        "gradient_accumulation_steps": (accum, "the accumulation",
                                        f"train.global_batch / (train.micro_batch x data-parallel size {dp})"),
        "gradient_clipping": (optim.grad_clip, "optim.grad_clip", origin_of(optim, "grad_clip")),
    }  # fmt: skip
    for key, (ours, name, where) in batch.items():
        if key in raw:
            _agree(source, key, raw[key], ours, name, where)
    if "optimizer" in raw:
        _optimizer(raw["optimizer"], source, optim)
    if "scheduler" in raw:
        raise ConfigError(
            f"scheduler section in {source}: the learning-rate schedule is optim.warmup_steps / optim.schedule "
            "(linear warmup, then cosine to 0 at train.max_steps: the paper's recipe), which resumes and changes of "
            "max_steps keep right; remove the scheduler section and set optim.* instead"
        )
    policy = fill_auto({k: v for k, v in raw.items() if k not in OWNED_KEYS}, hidden_size, source)
    stage = zero_stage(policy)
    if train.layout == "pipeline" and stage > 1:
        raise ConfigError(
            f"train.layout=pipeline with ZeRO stage {stage} ({source}): DeepSpeed's pipeline engine "
            "accepts ZeRO stage 0 or 1 only (its schedule accumulates gradients over micro-batches and reduces "
            "them once per step, which ZeRO-2's reduce-during-backward and ZeRO-3's per-layer parameter "
            "gathering break); use a ZeRO-1 JSON (ds_configs/pipeline_zero1_bf16.json, ds_configs/cpu.json) "
            "or train.layout=zero"
        )
    if train.layout == "zero" and train.pipeline_stages != 1:
        raise ConfigError(f"train.pipeline_stages={train.pipeline_stages} needs train.layout=pipeline")
    if policy.get("checkpoint", {}).get("use_node_local_storage") and process_group.local_rank_rewritten:
        raise ConfigError(
            f"checkpoint.use_node_local_storage in {source} with one GPU per task: DeepSpeed names node-local files by "
            "LOCAL_RANK, which is each task's device index here (0 on every task of a node), so the node's ranks would "
            "write the same files; remove the key, or let every task see all of its node's GPUs"
        )
    offload = "optimizer" in offloaded(policy)
    if offload and optim.fused:
        raise ConfigError(
            f"optim.fused=true with ZeRO optimizer offload ({source}): DeepSpeed's CPU Adam steps the "
            "offloaded states, torch's fused AdamW is not used; set optim.fused=false"
        )
    adam = dict(lr=optim.lr, betas=list(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.fused:
        adam["fused"] = True  # reaches torch.optim.AdamW; unset, torch picks its default (foreach on a GPU)
    cfg = dict(
        policy,
        train_batch_size=train.global_batch,
        train_micro_batch_size_per_gpu=train.micro_batch,
        gradient_accumulation_steps=accum,
        gradient_clipping=optim.grad_clip,
        optimizer={"type": "AdamW", "params": adam if offload else dict(adam, torch_adam=True)},
    )
    cfg.setdefault("steps_per_print", 2**31 - 1)  # the trainer's console line replaces DeepSpeed's
    if load_universal:
        cfg["checkpoint"] = dict(policy.get("checkpoint", {}), load_universal=True)
    return cfg


def engine_facts(ds_config: dict[str, Any], train: TrainConfig, world_size: int, policy: Policy) -> dict[str, Any]:
    """What the engine runs with, for the run's header line (`describe`) and TensorBoard's text/hparams."""
    return {
        "world_size": world_size,
        "layout": f"pipeline x{train.pipeline_stages}" if train.layout == "pipeline" else "zero",
        "data_parallel": dp_size(train, world_size),
        "zero_stage": zero_stage(ds_config),
        "precision": precision(ds_config),
        "micro_batch": ds_config["train_micro_batch_size_per_gpu"],
        "grad_accum": ds_config["gradient_accumulation_steps"],
        "global_batch": ds_config["train_batch_size"],
        "ds_json": str(policy.path),
        "policy": policy.why,
    }


def describe(facts: dict[str, Any]) -> str:
    """`engine_facts` as the one header line every run prints at start."""
    return (
        f"engine: world {facts['world_size']}, layout {facts['layout']}, data-parallel {facts['data_parallel']}, "
        f"ZeRO stage {facts['zero_stage']}, {facts['precision']}, micro-batch {facts['micro_batch']} x "
        f"accumulation {facts['grad_accum']} x data-parallel {facts['data_parallel']} = global batch "
        f"{facts['global_batch']}, DeepSpeed JSON {facts['ds_json']} ({facts['policy']})"
    )


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
    without_cpu_shm_allreduce()  # deepspeed.initialize starts DeepSpeed's comm backend if nothing did
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=ds_config,
        lr_scheduler=lambda optimizer: Schedule(optimizer, optim, total_steps),
        dist_init_required=False,
    )
    if isinstance(engine.optimizer, FP16_UnfusedOptimizer):
        # DeepSpeed's 16-bit optimizer without ZeRO (ZeRO-0 with bf16 or fp16, torch's AdamW: the only optimizer
        # build_ds_config names) takes one Adam step on zero gradients
        # when it is built (initialize_optimizer_states), so Adam would count that step: its bias correction runs
        # one step ahead and the first updates shrink (x0.73 at the first). Dropping the states lets Adam start at
        # step 1, as under ZeRO 1-3; measured: bf16 losses trailed fp32 by 0.08 nats after 6 steps, now by < 0.002.
        engine.optimizer.optimizer.state.clear()
    if compile_model:
        engine.compile()
    return engine


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """The run's learning-rate schedule: param group g steps at base_g x lr_at(step) / optim.lr, where base_g is
    the rate the run config gave the group (optim.lr; fine-tuning's head optim.lr x finetune.head_lr_mult).

    Everything but the step comes from the run config. LambdaLR's own state is its whole __dict__ (base_lrs: the
    saving run's rates), and a checkpoint's optimizer state holds that run's lr, betas, eps and weight decay; either
    would make a run resumed with another optim.lr go on at the old one. So the state saved here is the step alone,
    and `apply_schedule` puts the config's hyperparameters back after the optimizer is loaded."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
        self.optim = optim
        self.config_lrs = [group["lr"] for group in optimizer.param_groups]
        super().__init__(optimizer, lambda step: lr_at(step, optim, total_steps) / optim.lr)

    def state_dict(self) -> dict[str, int]:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The step of a saved schedule (ours, or a LambdaLR's whole state from an older checkpoint)."""
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))


def apply_schedule(engine: deepspeed.DeepSpeedEngine) -> None:
    """After a checkpoint is loaded: the optimizer's hyperparameters from the run config (`Schedule`) and its rates
    from the schedule at the restored step. Called by `igpt_ds.train.loop.restore`."""
    sched: Schedule = engine.lr_scheduler
    sched.base_lrs = list(sched.config_lrs)
    optim = sched.optim
    for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group.update(lr=base * factor(sched.last_epoch), initial_lr=base, betas=tuple(optim.betas), eps=optim.eps,
                     weight_decay=optim.weight_decay)  # fmt: skip
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]


def resumed_engine_config(
    resuming: resume.Resume, train: TrainConfig, optim: OptimConfig, world: int, model: ModelConfig | None,
    policy: Policy,
) -> tuple[dict[str, Any], Policy]:  # fmt: skip
    """(DeepSpeed config, policy) of a run resuming from `resuming`: the checkpoint's ZeRO stage when the run named no
    JSON and its default policy follows the checkpoint (`choose_policy`; the memory estimate may pick another stage at
    another GPU count, and a ZeRO checkpoint loads at its own stage only), and DeepSpeed's universal loader when the
    topology changed."""
    if policy.follows_checkpoint and resuming.meta.get("zero_stage") in DEFAULT_STAGES:
        policy = choose_policy(train, model, world, stage=resuming.meta["zero_stage"])
    return build_ds_config(train, optim, world, resuming.universal, model, policy), policy
