"""The pretraining loop: step, evaluate, log, checkpoint (docs/reference.md#objectives-and-recipe).

`train(cfg)` runs on every rank. `setup` does everything that can fail (configuration, shards, the
checkpoint to resume) before the first step; the loop in `train` is then the same collective path
on every rank. Two layouts: ZeRO data parallel (`train.layout=zero`, stage from the DeepSpeed
JSON) and pipeline x data parallel (`train.layout=pipeline`, igpt_ds.pipe).

No host-device sync in the step (`host_sync.hot`; checked by tests/test_host_sync.py and, on a GPU, tests/gpu):
the loss accumulates on the device and is read at log steps, the stop request (SIGTERM, SIGINT, SIGUSR1, the
launcher gone: `distributed.StopSignal`) is agreed every `train.stop_check_every` steps, and evaluation, the live
probe and checkpoints sync where they must (`host_sync.deliberate`). The next step's batches are read and pinned
in a background thread (`StepReader`) and copied to the device without blocking.

Launch: `deepspeed --num_gpus 8 launcher/pretrain.py --config launcher/configs/igpt_s_imagenet32.yaml`.
"""

from __future__ import annotations

import signal
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from igpt_ds import host_sync
from igpt_ds.checkpoint import ds_checkpoint, resume, weights
from igpt_ds.checkpoint.weights import open_consolidated_shared
from igpt_ds.config import ConfigError, PretrainConfig, to_dict, zero_stage
from igpt_ds.data.prefetch import HostBatch, StepReader
from igpt_ds.data.sampler import GlobalBatchSampler
from igpt_ds.data.shards import ShardSplit, open_shards
from igpt_ds.distributed.process_group import barrier, init_distributed
from igpt_ds.distributed.rank0 import agree_on_config, on_rank0
from igpt_ds.distributed.stop import StopSignal
from igpt_ds.models.igpt import IGPT
from igpt_ds.models.objectives import keyed_bert_masks, objective_loss
from igpt_ds.models.pipe import IGPTPipe, bert_pipe_batch
from igpt_ds.train import run_folder
from igpt_ds.train.engine import (
    Policy,
    apply_schedule,
    build_ds_config,
    choose_policy,
    describe,
    dp_size,
    engine_facts,
    initialize,
    model_init_context,
    resumed_engine_config,
)
from igpt_ds.train.live_probe import LiveProbe, choose_subset
from igpt_ds.train.metrics import Metrics


def build_model(cfg: PretrainConfig, ds_config: dict[str, Any]) -> torch.nn.Module:
    """IGPT (ZeRO layout, built inside zero.Init under ZeRO-3) or IGPTPipe, initialised from train.seed.
    train.init_from's weights are loaded into the engine afterwards (`weights.load_weights`: exact masters)."""
    # Initial weights from (train.seed, layer index): identical on every rank, in both layouts and at any
    # stage count.
    if cfg.train.layout == "pipeline":
        return IGPTPipe(cfg.model, cfg.train.pipeline_stages, cfg.train.activation_checkpointing, cfg.train.seed)
    with model_init_context(ds_config):
        model = IGPT(cfg.model, cfg.train.seed)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    return model


def load_init(cfg: PretrainConfig) -> Mapping[str, Tensor]:
    """train.init_from's weights, read tensor by tensor as the model takes them."""
    init_cfg, state, _ = open_consolidated_shared(cfg.train.init_from)  # read by rank 0, shared
    shape = ("n_layer", "n_head", "n_embd", "n_px", "n_vocab", "bias")
    if any(getattr(init_cfg, k) != getattr(cfg.model, k) for k in shape):
        raise ConfigError(f"train.init_from={cfg.train.init_from} holds a model of another shape: {init_cfg}")
    return state


def read_micro_batches(
    split: ShardSplit,
    indices: np.ndarray,
    micro_batch: int,
    mask_prob: float,
    mask_key: tuple[int, int, int] | None,
    pin: bool,
    mask_kind: str = "bernoulli",
) -> list[HostBatch]:
    """`indices`' rows of `split` as micro-batches of (tokens, BERT mask or None) on the host, pinned for a
    GPU. With `mask_key` = (seed, stream, step), each sample's mask is `keyed_bert_masks`': the same on the
    first and last pipeline stage, in a resumed run, and at any data-parallel size."""
    out = []
    for chunk in np.split(np.asarray(indices), len(indices) // micro_batch):
        tokens = torch.from_numpy(split.batch(chunk)[0])
        mask = None if mask_key is None else keyed_bert_masks(*mask_key, chunk, split.seq_len, mask_prob, mask_kind)
        out.append((tokens.pin_memory(), None if mask is None else mask.pin_memory()) if pin else (tokens, mask))
    return out


@dataclass
class Run:
    """Everything the loop needs, built and checked by `setup`."""

    cfg: PretrainConfig
    engine: Any
    metrics: Metrics
    train: ShardSplit
    val: ShardSplit
    sampler: GlobalBatchSampler
    dp_rank: int
    dp: int
    start_step: int
    files: dict[str, str]
    data: dict[str, Any]
    """The training split's identity (resume.data_identity), saved with every checkpoint."""
    policy: Policy
    """The DeepSpeed JSON and why (`engine.choose_policy`)."""
    reader: StepReader = field(init=False)
    data_wait_s: float = field(init=False, default=0.0)
    """Time the loop waited for training batches since the last log line."""

    def __post_init__(self) -> None:
        self.reader = StepReader(lambda indices, step: self.host_batches(self.train, indices, (0, step)), self.sampler)

    @property
    def pipeline(self) -> bool:
        return self.cfg.train.layout == "pipeline"

    def host_batches(self, split: ShardSplit, indices: np.ndarray, key: tuple[int, int]) -> list[HostBatch]:
        """This rank's micro-batches on the host: `read_micro_batches` with BERT masks keyed by (seed, *key)."""
        mask_key = (self.cfg.train.seed, *key) if self.cfg.model.objective == "bert" else None
        pin = self.engine.device.type != "cpu"
        m = self.cfg.model
        return read_micro_batches(split, indices, self.cfg.train.micro_batch, m.mask_prob, mask_key, pin, m.bert_mask)

    def device_batches(self, host: list[HostBatch]) -> list[tuple[Tensor, Tensor | None]]:
        """`host` on the engine's device, copied without blocking; (inputs, labels) for the pipeline."""
        out = []
        for tokens, mask in host:
            tokens = tokens.to(self.engine.device, non_blocking=True)
            mask = None if mask is None else mask.to(self.engine.device, non_blocking=True)
            if not self.pipeline:
                out.append((tokens, mask))
            else:
                out.append((tokens, tokens) if mask is None else bert_pipe_batch(tokens, mask, self.cfg.model.n_vocab))
        return out

    def train_step(self, step: int) -> Tensor:
        """Optimizer step `step`; the mean loss over the global batch (pipeline) or this rank's share."""
        tic = time.perf_counter()
        batches = self.device_batches(self.reader.take(step))
        self.data_wait_s += time.perf_counter() - tic
        if self.pipeline:
            return self.engine.train_batch(iter(batches))
        total = torch.zeros((), device=self.engine.device)
        for tokens, mask in batches:
            loss = objective_loss(self.engine(tokens, mask), tokens, mask)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        return total / len(batches)

    def mean_over_ranks(self, value: Tensor) -> float:
        """The pipeline engine already averages over data-parallel ranks; ZeRO ranks each hold a share. A sync."""
        if not self.pipeline:
            value = value.clone()
            dist.all_reduce(value)
            value /= dist.get_world_size()
        with host_sync.deliberate():
            return value.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        sampler = GlobalBatchSampler(
            len(self.val), self.cfg.train.global_batch, self.dp_rank, self.dp, self.cfg.train.seed, shuffle=False
        )
        losses = []
        self.engine.eval()
        for i in range(self.cfg.train.eval_batches):
            batches = self.device_batches(self.host_batches(self.val, sampler.next_indices(), (1, i)))
            if self.pipeline:
                losses.append(self.engine.eval_batch(iter(batches)))
            else:
                losses.extend(objective_loss(self.engine(t, m), t, m) for t, m in batches)
        self.engine.train()
        return self.mean_over_ranks(torch.stack(losses).float().mean())

    def save(self, step: int) -> None:
        meta = {
            "sampler": self.sampler.state_dict(),
            "world_size": dist.get_world_size(),
            "dp_size": self.dp,
            "layout": self.cfg.train.layout,
            "zero_stage": zero_stage(self.engine.config),
            "data": self.data,
        }
        root, keep = self.cfg.train.run_dir / "checkpoints", self.cfg.train.keep_checkpoints
        with host_sync.deliberate():  # the states leave the device
            ds_checkpoint.save(self.engine, root, step, meta, self.files, self.train.palette, keep)
        self.metrics.print(f"step {step}: checkpoint {root / ds_checkpoint.tag_for(step)}")


def setup(cfg: PretrainConfig) -> Run:
    # DeepSpeed's ZeRO calls torch collectives that warn of their deprecation on every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    rank, world = init_distributed(cfg.train.dist_timeout_s)
    agree_on_config(to_dict(cfg))
    policy = choose_policy(cfg.train, cfg.model, world)
    ds_config = build_ds_config(cfg.train, cfg.optim, world, model=cfg.model, policy=policy)  # checks before work
    train_split, val_split = (open_shards(cfg.model, cfg.data, s) for s in (cfg.data.train_split, cfg.data.val_split))
    dp, t = dp_size(cfg.train, world), cfg.train
    data = resume.data_identity(train_split)
    # One decision for every rank, by rank 0, checked against this run before anything is built.
    plan = resume.resume_plan(t.run_dir, model=cfg.model, layout=t.layout, world=world, dp=dp,
                                     ds_config=ds_config, data=data, seed=t.seed,
                                     reset_data_position=t.reset_data_position,
                                     stage_from_checkpoint=policy.follows_checkpoint)  # fmt: skip
    if plan is not None:
        ds_config, policy = resumed_engine_config(plan, t, cfg.optim, world, cfg.model, policy)
    init = load_init(cfg) if cfg.train.init_from and plan is None else None
    model = build_model(cfg, ds_config)
    engine = initialize(model, ds_config, cfg.optim, cfg.train.max_steps, compile_model=cfg.train.compile)
    if init is not None:
        weights.load_weights(engine, init, f"train.init_from={cfg.train.init_from}")
    dp_rank = model.topology().get_coord(rank).data if cfg.train.layout == "pipeline" else rank
    sampler = GlobalBatchSampler(len(train_split), cfg.train.global_batch, dp_rank, dp, cfg.train.seed)
    start_step = 0
    if plan is not None:
        ds_checkpoint.load(engine, plan.ckpt, plan.universal)
        apply_schedule(engine)
        if not t.reset_data_position:
            sampler.load_state_dict(plan.meta["sampler"])
        start_step = plan.meta["step"]
    files = run_folder.run_files(to_dict(cfg), ds_config)
    run_folder.write_run_files(t.run_dir, files, rank)
    writer = run_folder.open_tensorboard(t.run_dir, rank, start_step, files,
                                            describe(engine_facts(ds_config, cfg.train, world, policy)))  # fmt: skip
    metrics = Metrics(
        writer,
        model_cfg=cfg.model,
        world_size=world,
        global_batch=cfg.train.global_batch,
        max_steps=cfg.train.max_steps,
        start_step=start_step,
    )
    if plan is not None:
        how = (" (universal checkpoint)" if plan.universal else "") + (
            ", data order started afresh" if t.reset_data_position else ""
        )
        metrics.print(f"resumed from {plan.ckpt} at step {start_step}{how}")
    return Run(cfg, engine, metrics, train_split, val_split, sampler, dp_rank, dp, start_step, files, data, policy)


def train(cfg: PretrainConfig) -> dict[str, float]:
    """Pretrain per `cfg` (every rank), resuming from the run's latest checkpoint; returns the final metrics and
    `stopped_by`: the signal that stopped the run early after a checkpoint (0: it reached its last step)."""
    stop = StopSignal(cfg.train.stop_check_every)  # preemption, time limit, launcher gone: save, then exit
    run = setup(cfg)
    t, m = cfg.train, run.metrics
    started = time.perf_counter()
    subset, why_off = on_rank0(lambda: choose_subset(cfg, run.train, run.val))  # one decision for every rank
    probe = LiveProbe(run, subset, run.start_step) if subset is not None else None
    if probe is None and t.probe_every:
        m.print(f"live probe off: {why_off}")
    if probe is not None and run.start_step == 0 and t.probe_at_start:
        val_loss = run.evaluate()
        m.val(0, val_loss)
        probe.run_probe(0, val_loss)
    last_step = t.stop_at or t.max_steps
    step, saved, window, stopped_by = run.start_step, run.start_step, 0, 0
    loss_sum = torch.zeros((), device=run.engine.device)
    tic = time.perf_counter()
    with host_sync.hot():
        while step < last_step:
            lr = run.engine.get_lr()[0]  # the rate this step uses (a host value: no sync)
            loss_sum += run.train_step(step)
            step, window = step + 1, window + 1
            m.step()
            if step % t.log_every == 0 or step == last_step:
                with host_sync.deliberate():
                    grad_norm = run.engine.get_global_grad_norm()
                    grad_norm = None if grad_norm is None else float(grad_norm)
                loss = run.mean_over_ranks(loss_sum) / window
                m.train(step, loss, lr, grad_norm, window, time.perf_counter() - tic, run.data_wait_s)
                run.data_wait_s = 0.0
                loss_sum.zero_()
                window, tic = 0, time.perf_counter()
            probe_due = probe is not None and step % t.probe_every == 0
            if (t.eval_every and step % t.eval_every == 0) or probe_due:
                val_loss = run.evaluate()
                m.val(step, val_loss)
                if probe_due:
                    with host_sync.deliberate():
                        probe.run_probe(step, val_loss)
            stopped_by = stop.check(step)
            if step % t.save_every == 0 or stopped_by:
                run.save(step)
                saved = step
            if stopped_by:
                name = signal.Signals(stopped_by).name
                m.print(f"stopped at step {step} on {name}; rerun the same command to resume")
                break
    if saved != step:
        run.save(step)
    if not stopped_by:  # a stopped run leaves its pending deletions to the next run: it has a grace period to keep
        ds_checkpoint.wait_for_deletions()
    run.reader.close()
    if probe is not None:
        probe.finish(step, time.perf_counter() - started)
    world = torch.distributed.get_world_size()
    m.close({**to_dict(cfg), "engine": engine_facts(run.engine.config, t, world, run.policy)})
    barrier()  # every rank's writes are done before any exits: a launcher may kill the rest when one exits non-zero
    return {**m.last, "stopped_by": stopped_by}
