"""The one training loop, shared by pretraining (`igpt_ds.train.pretrain`) and fine-tuning (`igpt_ds.train.finetune`).

What the two share lives here: each step's batches read one step ahead in a background thread (`StepReader`), a
checkpoint resumed with the run config's schedule (`resume`), the stop agreement (`StopSignal`), the cadence of log
lines, evaluations and checkpoints, the last checkpoint, and no host-device sync in between (`host_sync.hot`).
What differs is the `Task`: its optimizer step (pretraining's objective, fine-tuning's L_CLF + L_GEN), what its
log line reads, what it does after a step (validation, the live probe, early stopping) and what its checkpoint
holds beside the engine's state.

    run = setup(cfg)                                  # the job's Task, its engine and reader built and checked
    end = train_loop(run, run.engine, run.reader, stop, cfg.train, run.start_step)
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from igpt_ds import host_sync
from igpt_ds.checkpoint import ds_checkpoint
from igpt_ds.checkpoint.resume import Resume
from igpt_ds.config import RunError, TrainConfig, precision, zero_stage
from igpt_ds.data.prefetch import HostBatch, StepReader
from igpt_ds.data.sampler import GlobalBatchSampler
from igpt_ds.distributed.stop import StopSignal
from igpt_ds.train.engine import apply_schedule


@dataclass
class Window:
    """The steps since the last log line."""

    steps: int
    seconds: float
    """Wall time they took."""
    data_wait_s: float
    """Of which the loop waited for their batches."""


class Task(Protocol):
    """What a training job plugs into `train_loop`. Every method runs on every rank."""

    def step(self, batches: list[HostBatch], step: int) -> Tensor:
        """Optimizer step `step` (0-based) on this rank's micro-batches (on the host, pinned on a GPU): forward,
        backward, the engine's step. Returns this rank's figures to log (the loss, ...), on the device: summed over
        the steps of a log window, read only at the log step."""
        ...

    def log(self, step: int, sums: Tensor, lrs: list[float], window: Window) -> None:
        """At a log step: `sums` of `step`'s returns over the window, `lrs` the param groups' rates of its last step."""
        ...

    def after_step(self, step: int) -> bool:
        """After optimizer step `step` (1-based count of steps done): evaluation, the live probe; True when the run is
        done (early stopping)."""
        ...

    def save(self, step: int) -> None:
        """A checkpoint after `step` steps (collective)."""
        ...

    def say(self, line: str) -> None:
        """One console line, printed by rank 0."""
        ...


@dataclass
class LoopEnd:
    step: int
    """Steps done."""
    stopped_by: int
    """The signal that stopped the run after its checkpoint (0: it reached its last step or was done)."""
    done: bool
    """The task said it was done (early stopping)."""


def train_loop(
    task: Task,
    engine: Any,
    reader: StepReader,
    stop: StopSignal,
    train: TrainConfig,
    start_step: int,
    done: bool = False,
) -> LoopEnd:
    """Train from `start_step` to train.stop_at or train.max_steps, or until the task is done or a stop is agreed.

    Each step: its batches from `reader`, `task.step`; every train.log_every steps and at the last, `task.log`; then
    `task.after_step`; the stop agreement (every train.stop_check_every steps and before every checkpoint); a
    checkpoint every train.save_every steps, at the last step, when the task is done and when a stop was agreed.
    The same collective path on every rank. RunError, on every rank and before any checkpoint of the state, when
    the agreement finds that training diverged (a non-finite loss on any rank, or a step DeepSpeed skipped for
    non-finite gradients outside fp16): the checkpoints already written, and `latest`, stay as they were. A run
    stopped by a signal leaves its pending checkpoint deletions to the next run (its scheduler's grace period is
    short); otherwise they are waited for."""
    last_step = train.stop_at or train.max_steps
    step, stopped_by = start_step, 0
    if start_step >= last_step and not done:
        which = "train.stop_at" if train.stop_at else "train.max_steps"
        task.say(f"nothing to train: the checkpoint is at step {start_step} and {which}={last_step}; raise "
                 f"--{which} to train on")  # fmt: skip
    sums, steps, waited, tic = None, 0, 0.0, time.perf_counter()
    # Divergence, read only at checks, at no cost per step: the task's figures summed over a log window are
    # non-finite when any step's were (NaN and inf survive a sum), tested when a window closes and at checks (a
    # device flag, no sync); and the steps DeepSpeed skipped for non-finite gradients (a host counter). Under
    # fp16 a skipped step is the loss scaler at work, not divergence.
    flagged, fp16 = None, precision(engine.config) == "fp16"
    skipped_at_check, checked_at, saved_at = engine.skipped_steps, start_step, start_step
    with host_sync.hot():
        while not done and step < last_step:
            lrs = engine.get_lr()  # the rates this step uses (host values: no sync)
            before = time.perf_counter()
            batches = reader.take(step)
            waited += time.perf_counter() - before
            out = task.step(batches, step)
            sums = out if sums is None else sums + out
            step, steps = step + 1, steps + 1
            if step % train.log_every == 0 or step == last_step:
                task.log(step, sums, lrs, Window(steps, time.perf_counter() - tic, waited))
                flagged = either(flagged, ~torch.isfinite(sums).all())
                sums, steps, waited, tic = None, 0, 0.0, time.perf_counter()
            done = task.after_step(step)
            save_due = step % train.save_every == 0 or done or step == last_step
            checking, unhealthy = step % stop.every == 0 or save_due, None
            if checking:
                unhealthy = either(flagged, None if sums is None else ~torch.isfinite(sums).all())
                if save_due:  # an update can make weights non-finite after a finite loss (ZeRO-3 skips no step)
                    unhealthy = either(unhealthy, ~finite_weights(engine))
            skipped = 0 if fp16 else engine.skipped_steps - skipped_at_check
            agreed = stop.check(step, force=save_due, unhealthy=unhealthy, skipped=skipped)
            if agreed.diverged:
                reader.close()
                raise RunError(diverged_line(checked_at, step, saved_at))
            if checking:
                flagged, skipped_at_check, checked_at = None, engine.skipped_steps, step
            stopped_by = agreed.signal
            if save_due or stopped_by:
                task.save(step)
                saved_at = step
            if stopped_by:
                name = signal.Signals(stopped_by).name
                task.say(f"stopped at step {step} on {name}; rerun the same command to resume")
                break
    if not stopped_by:
        ds_checkpoint.wait_for_deletions()
    reader.close()
    return LoopEnd(step, stopped_by, done)


def either(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Logical or of two device flags, either of which may be absent."""
    return b if a is None else a if b is None else a | b


def finite_weights(engine: Any) -> Tensor:
    """Whether this rank's share of the weights is finite, as a device flag (no sync): ZeRO-3's partitions, the
    whole module otherwise. One pass over the parameters, paid before each checkpoint only."""
    local = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    return torch.stack([torch.isfinite(t).all() for t in local if t.numel()]).all()


def diverged_line(checked_at: int, step: int, saved_at: int) -> str:
    """The one line of a run that stopped because training diverged between steps `checked_at` and `step`."""
    when = f"after step {checked_at}, by step {step}" if step - checked_at > 1 else f"at step {step}"
    what = f"training diverged {when} (a non-finite loss, or gradients DeepSpeed skipped a step for)"
    if not saved_at:
        return f"{what}; no checkpoint was written; lower --optim.lr and start again"
    return (f"{what}; nothing was saved since step {saved_at}, whose checkpoint stays latest; lower --optim.lr "
            "(or raise optim.warmup_steps, or set gradient_clipping in the DeepSpeed JSON) and rerun the same command "
            "to resume from it")  # fmt: skip


def restore(engine: Any, resuming: Resume, sampler: GlobalBatchSampler, reset_data_position: bool) -> int:
    """Restore `resuming`'s checkpoint into `engine` (weights, optimizer, RNG; its universal form at another topology),
    the run config's optimizer hyperparameters and schedule at its step (`apply_schedule`: never the saving run's),
    and `sampler`'s position unless the data order starts afresh. Returns the steps done. Collective."""
    ds_checkpoint.load(engine, resuming.ckpt, resuming.universal)
    apply_schedule(engine)
    if not reset_data_position:
        sampler.load_state_dict(resuming.meta["sampler"])
    return resuming.meta["step"]


def save_checkpoint(
    engine: Any,
    root: Path,
    step: int,
    sampler: GlobalBatchSampler,
    data: dict[str, Any],
    layout: str,
    dp: int,
    files: dict[str, str],
    palette: np.ndarray | None,
    keep: int,
    need_bytes: int = 0,
    **extra: Any,
) -> Path:
    """Checkpoint `step` under `root` with what a resume needs besides the engine's state: the sampler's position,
    the topology (world, data-parallel size, layout, ZeRO stage), the training data's identity and `extra` (a task's
    own state). RunError when `root` has less room than `need_bytes` or a write fails (`ds_checkpoint.save`).
    Collective; a deliberate host-device sync (the states leave the device)."""
    meta = {"sampler": sampler.state_dict(), "world_size": dist.get_world_size(), "dp_size": dp, "layout": layout,
            "zero_stage": zero_stage(engine.config), "data": data, **extra}  # fmt: skip
    with host_sync.deliberate():
        return ds_checkpoint.save(engine, root, step, meta, files, palette, keep, need_bytes)
