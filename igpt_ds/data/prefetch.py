"""Host batches read ahead of the device, pinned, and copied to it without blocking.

Every loop that feeds a device — pretraining and fine-tuning steps, validation, feature extraction — reads shard
rows (and draws BERT masks, augmentations) on the host. Done on the loop's own thread, that work stands between
two device steps, and a copy from pageable memory makes the host wait for the device (`igpt_ds.host_sync`). Here
the next batch is produced in a background thread while the device works on this one, pinned when the device is a
GPU, and `to_device` starts its copy asynchronously.

- `StepReader`: a training split's batches step by step, one step ahead, driven by the resumable sampler.
- `read_ahead(batches, pin)`: any iterable of host batches, one ahead (evaluation, features).
- `HostCopy`: a result's way back, started without blocking and waited for only when it is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from igpt_ds import host_sync
from igpt_ds.data.sampler import GlobalBatchSampler

HostBatch = tuple[Any, ...]
"""A micro-batch on the host: tensors (tokens, labels, a BERT mask, ...), None where absent, and any plain values."""


def pins(device: torch.device) -> bool:
    """Whether host batches bound for `device` are pinned: a GPU's (a copy from pinned memory runs asynchronously);
    on a CPU pinning would only cost a copy."""
    return device.type != "cpu"


def pin(batch: HostBatch) -> HostBatch:
    """`batch` with its tensors in page-locked memory, from which a copy to a GPU is asynchronous."""
    return tuple(x.pin_memory() if isinstance(x, Tensor) else x for x in batch)


def to_device(batch: HostBatch, device: torch.device) -> HostBatch:
    """`batch`'s tensors on `device`, copied without blocking the host (pinned sources: truly asynchronous)."""
    return tuple(x.to(device, non_blocking=True) if isinstance(x, Tensor) else x for x in batch)


class StepReader:
    """The training split's host batches step by step, the next step's read in a background thread while this
    one trains: shard rows, BERT masks, augmentation and pinning cost milliseconds a step at 1024+ tokens, which
    the GPU would otherwise wait for. The sampler advances only when a step takes its batches, so a checkpoint's
    sampler state counts exactly the steps trained.

    `read(indices, epochs, step)`: the step's micro-batches for this rank's sample indices and their epochs; a
    function of its arguments alone (augmentations keyed by the step or the epoch), since it runs ahead of the
    step in another thread."""

    def __init__(self, read: Callable[[np.ndarray, np.ndarray, int], list[HostBatch]], sampler: GlobalBatchSampler):
        self.read, self.sampler = read, sampler
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="igpt-reader")
        self.ahead: tuple[int, Future] | None = None  # (sampler position, its batches being read)

    def take(self, step: int) -> list[HostBatch]:
        """Step `step`'s batches (at the sampler's position), and start reading the step after."""
        at, after = self.sampler.consumed, self.sampler.consumed + self.sampler.global_batch
        pending = self.ahead[1] if self.ahead is not None and self.ahead[0] == at else self.submit(at, step)
        self.ahead = (after, self.submit(after, step + 1))
        batches = pending.result()
        self.sampler.consumed = after
        return batches

    def submit(self, consumed: int, step: int) -> Future:
        return self.pool.submit(
            lambda: self.read(self.sampler.indices_at(consumed), self.sampler.epochs_at(consumed), step)
        )

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def read_ahead(batches: Iterable[HostBatch], pin_memory: bool) -> Iterator[HostBatch]:
    """The items of `batches` (a generator doing host work: reading, masking), each produced in a background
    thread while the caller uses the one before, and pinned when `pin_memory`. Memory: two batches."""
    items = iter(batches)
    done = object()

    def produce() -> Any:
        item = next(items, done)
        return item if item is done or not pin_memory else pin(item)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="igpt-read-ahead") as pool:
        pending = pool.submit(produce)
        while (item := pending.result()) is not done:
            pending = pool.submit(produce)
            yield item


class HostCopy:
    """`tensor`'s copy to the host, started without blocking (into page-locked memory on a GPU); `numpy()` waits for
    it, a deliberate sync, by which time the device has usually moved on to the next batch."""

    def __init__(self, tensor: Tensor):
        self.host = tensor.to("cpu", non_blocking=True)
        self.event = None
        if tensor.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def numpy(self) -> np.ndarray:
        with host_sync.deliberate():
            if self.event is not None:
                self.event.synchronize()
            return self.host.numpy()
