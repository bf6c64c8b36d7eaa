"""Pretraining: the objective's step, validation, the live probe (docs/reference.md#objectives-and-recipe).

`train(cfg)` runs on every rank: `setup` does everything that can fail (configuration, shards, the checkpoint to
resume, the engine) before the first step, then the shared loop (`igpt_ds.train.loop.train_loop`: batches read
ahead, log lines, stop agreement, checkpoints, no host-device sync in the step) runs `Run`'s step: the mean loss of
this rank's micro-batches, accumulated on the device and read at log steps. Two layouts: ZeRO data parallel
(`train.layout=zero`, stage from the DeepSpeed JSON) and pipeline x data parallel (`train.layout=pipeline`,
`igpt_ds.models.pipe`).

Launch: `deepspeed --num_gpus 8 launcher/pretrain.py --config launcher/configs/igpt_s_imagenet32.yaml`.
"""

from __future__ import annotations

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
from igpt_ds.config import ConfigError, DataConfig, PretrainConfig, to_dict
from igpt_ds.data.prefetch import HostBatch, StepReader, pins, to_device
from igpt_ds.data.prefetch import pin as pin_batch
from igpt_ds.data.sampler import GlobalBatchSampler
from igpt_ds.data.shards import ShardSplit, open_shards
from igpt_ds.data.views import describe as describe_views
from igpt_ds.data.views import read_training
from igpt_ds.distributed.process_group import barrier, init_distributed
from igpt_ds.distributed.rank0 import agree_on_config, on_rank0
from igpt_ds.distributed.stop import StopSignal
from igpt_ds.models.igpt import IGPT
from igpt_ds.models.objectives import keyed_bert_masks, objective_loss
from igpt_ds.models.pipe import IGPTPipe, bert_pipe_batch
from igpt_ds.plan.memory import checkpoint_bytes
from igpt_ds.train import loop, run_folder
from igpt_ds.train.engine import (
    Policy,
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
from igpt_ds.train.loop import Window, train_loop
from igpt_ds.train.metrics import Metrics


def build_model(cfg: PretrainConfig, ds_config: dict[str, Any]) -> torch.nn.Module:
    """IGPT (ZeRO layout, built inside zero.Init under ZeRO-3) or IGPTPipe, initialised from train.seed.
    train.init_from's weights go into the engine afterwards (`checkpoint.weights.load_weights`: exact masters)."""
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
    training: tuple[np.ndarray, int, DataConfig] | None = None,
) -> list[HostBatch]:
    """`indices`' rows of `split` as micro-batches of (tokens, BERT mask or None) on the host, pinned for a
    GPU. With `mask_key` = (seed, stream, step), each sample's mask is `keyed_bert_masks`': the same on the
    first and last pipeline stage, in a resumed run, and at any data-parallel size. `training` = (the samples'
    epochs, train.seed, data): training rows, their views and flips (`views.read_training`); None: the evaluation
    crop (validation)."""
    out = []
    n_micro = len(indices) // micro_batch
    for i, chunk in enumerate(np.split(np.asarray(indices), n_micro)):
        if training is None:
            tokens = torch.from_numpy(split.batch(chunk)[0])
        else:
            epochs, seed, data = training
            tokens = torch.from_numpy(read_training(split, chunk, np.split(epochs, n_micro)[i], seed, data)[0])
        mask = None if mask_key is None else keyed_bert_masks(*mask_key, chunk, split.seq_len, mask_prob, mask_kind)
        out.append(pin_batch((tokens, mask)) if pin else (tokens, mask))
    return out


@dataclass
class Run:
    """A pretraining run: everything `train_loop` needs, built and checked by `setup`; its `Task`."""

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
    checkpoint_bytes: int
    """One checkpoint's size (`plan.memory.checkpoint_bytes`): the room each save asks for first."""
    probe: LiveProbe | None = None
    """The live probe, when the shards have labels and train.probe_every asks for it."""
    reader: StepReader = field(init=False)

    def __post_init__(self) -> None:
        self.reader = StepReader(
            lambda indices, epochs, step: self.host_batches(self.train, indices, (0, step), epochs), self.sampler
        )

    @property
    def pipeline(self) -> bool:
        return self.cfg.train.layout == "pipeline"

    def host_batches(
        self, split: ShardSplit, indices: np.ndarray, key: tuple[int, int], epochs: np.ndarray | None = None
    ) -> list[HostBatch]:
        """This rank's micro-batches on the host: `read_micro_batches` with BERT masks keyed by (seed, *key); with
        the samples' `epochs`, training rows (views, flips), else the evaluation crop."""
        mask_key = (self.cfg.train.seed, *key) if self.cfg.model.objective == "bert" else None
        pin = pins(self.engine.device)
        m, t = self.cfg.model, self.cfg.train
        training = None if epochs is None else (epochs, t.seed, self.cfg.data)
        return read_micro_batches(split, indices, t.micro_batch, m.mask_prob, mask_key, pin, m.bert_mask, training)

    def device_batches(self, host: list[HostBatch]) -> list[tuple[Tensor, Tensor | None]]:
        """`host` on the engine's device, copied without blocking; (inputs, labels) for the pipeline."""
        out = []
        for batch in host:
            tokens, mask = to_device(batch, self.engine.device)
            if not self.pipeline:
                out.append((tokens, mask))
            else:
                out.append((tokens, tokens) if mask is None else bert_pipe_batch(tokens, mask, self.cfg.model.n_vocab))
        return out

    # The Task of train_loop -----------------------------------------------------------------------------------

    def step(self, batches: list[HostBatch], step: int) -> Tensor:
        """Optimizer step `step`; the mean loss over the global batch (pipeline) or this rank's share."""
        self.metrics.step()
        batches = self.device_batches(batches)
        if self.pipeline:
            return self.engine.train_batch(iter(batches))
        total = torch.zeros((), device=self.engine.device)
        for tokens, mask in batches:
            loss = objective_loss(self.engine(tokens, mask), tokens, mask)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        return total / len(batches)

    def log(self, step: int, sums: Tensor, lrs: list[float], window: Window) -> None:
        """The mean training loss over the window and the ranks, the gradient norm, throughput (two syncs)."""
        with host_sync.deliberate():
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = None if grad_norm is None else float(grad_norm)
        loss = self.mean_over_ranks(sums) / window.steps
        self.metrics.train(step, loss, lrs[0], grad_norm, window.steps, window.seconds, window.data_wait_s)

    def after_step(self, step: int) -> bool:
        """Validation every train.eval_every steps, the live probe (after a validation) every train.probe_every."""
        t = self.cfg.train
        probe_due = self.probe is not None and step % t.probe_every == 0
        if (t.eval_every and step % t.eval_every == 0) or probe_due:
            val_loss = self.evaluate()
            self.metrics.val(step, val_loss)
            if probe_due:
                with host_sync.deliberate():
                    self.probe.run_probe(step, val_loss)
        return False

    def save(self, step: int) -> None:
        root = self.cfg.train.run_dir / "checkpoints"
        loop.save_checkpoint(self.engine, root, step, self.sampler, self.data, self.cfg.train.layout, self.dp,
                             self.files, self.train.palette, self.cfg.train.keep_checkpoints,
                             self.checkpoint_bytes)  # fmt: skip
        self.metrics.print(f"step {step}: checkpoint {root / ds_checkpoint.tag_for(step)}")

    def say(self, line: str) -> None:
        self.metrics.print(line)

    # ----------------------------------------------------------------------------------------------------------

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
        """Mean validation loss over train.eval_batches global batches of the validation split (the same each time)."""
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


def setup(cfg: PretrainConfig) -> Run:
    """Everything that can fail, before the first step: configuration, shards, the checkpoint to resume, the engine;
    the same decisions on every rank."""
    # DeepSpeed's ZeRO calls torch collectives that warn of their deprecation on every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    rank, world = init_distributed(cfg.train.dist_timeout_s)
    agree_on_config(to_dict(cfg))
    policy = choose_policy(cfg.train, cfg.model, world)
    ds_config = build_ds_config(cfg.train, cfg.optim, world, model=cfg.model, policy=policy)  # checks before work
    run_folder.claim(cfg.train.run_dir)  # this run's alone, and writable, before anything is read from it
    ckpt_bytes = checkpoint_bytes(cfg.model, ds_config)
    run_folder.check_room(cfg.train.run_dir, ckpt_bytes, cfg.train.keep_checkpoints)
    train_split, val_split = (open_shards(cfg.model, cfg.data, s) for s in (cfg.data.train_split, cfg.data.val_split))
    dp, t = dp_size(cfg.train, world), cfg.train
    data = resume.data_identity(train_split, cfg.data)
    # One decision for every rank, by rank 0, checked against this run before anything is built.
    resuming = resume.resume_plan(t.run_dir, model=cfg.model, layout=t.layout, world=world, dp=dp, ds_config=ds_config,
                              data=data, seed=t.seed, reset_data_position=t.reset_data_position,
                              stage_from_checkpoint=policy.follows_checkpoint, fallback=t.resume_fallback)  # fmt: skip
    if resuming is not None:
        ds_config, policy = resumed_engine_config(resuming, t, cfg.optim, world, cfg.model, policy)
    init = load_init(cfg) if cfg.train.init_from and resuming is None else None
    model = build_model(cfg, ds_config)
    engine = initialize(model, ds_config, cfg.optim, cfg.train.max_steps, compile_model=cfg.train.compile)
    if init is not None:
        weights.load_weights(engine, init, f"train.init_from={cfg.train.init_from}")
    dp_rank = model.topology().get_coord(rank).data if cfg.train.layout == "pipeline" else rank
    sampler = GlobalBatchSampler(len(train_split), cfg.train.global_batch, dp_rank, dp, cfg.train.seed)
    start_step = loop.restore(engine, resuming, sampler, t.reset_data_position) if resuming is not None else 0
    header = describe(engine_facts(ds_config, cfg.train, world, policy))
    files, writer = run_folder.open_run(t.run_dir, to_dict(cfg), ds_config, rank, start_step, header)
    metrics = Metrics(writer, model_cfg=cfg.model, world_size=world, global_batch=cfg.train.global_batch,
                      max_steps=cfg.train.max_steps, start_step=start_step)  # fmt: skip
    if resuming is not None:
        metrics.print(run_folder.resumed_line(resuming, start_step, t.reset_data_position))
    if (augmentation := describe_views(train_split, cfg.data)) is not None:
        metrics.print(augmentation)
    run = Run(cfg, engine, metrics, train_split, val_split, sampler, dp_rank, dp, start_step, files, data, policy,
              ckpt_bytes)  # fmt: skip
    subset, why_off = on_rank0(lambda: choose_subset(cfg, train_split, val_split))  # one decision for every rank
    if subset is not None:
        run.probe = LiveProbe(engine, cfg, (train_split, val_split), dp_rank, dp, metrics, subset, start_step)
    elif t.probe_every:
        metrics.print(f"live probe off: {why_off}")
    return run


def train(cfg: PretrainConfig) -> dict[str, float]:
    """Pretrain per `cfg` (every rank), resuming from the run's latest checkpoint; returns the final metrics and
    `stopped_by`: the signal that stopped the run early after a checkpoint (0: it reached its last step)."""
    stop = StopSignal(cfg.train.stop_check_every)  # preemption, time limit, launcher gone: save, then exit
    run = setup(cfg)
    started = time.perf_counter()
    if run.probe is not None and run.start_step == 0 and cfg.train.probe_at_start:
        val_loss = run.evaluate()
        run.metrics.val(0, val_loss)
        run.probe.run_probe(0, val_loss)
    end = train_loop(run, run.engine, run.reader, stop, cfg.train, run.start_step)
    if run.probe is not None:
        run.probe.finish(end.step, time.perf_counter() - started)
    world = torch.distributed.get_world_size()
    run.metrics.close({**to_dict(cfg), "engine": engine_facts(run.engine.config, cfg.train, world, run.policy)})
    barrier()  # every rank's writes are done before any exits: a launcher may kill the rest when one exits non-zero
    return {**run.metrics.last, "stopped_by": end.stopped_by}
