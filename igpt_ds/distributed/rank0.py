"""Work the same on every rank done once, and one decision shared by every rank.

`on_rank0(fn)` is the one way a single rank does something for all: rank 0 alone reads the disk, converts a
checkpoint or consolidates weights, and every rank receives its result, so ranks never act on different views of the
filesystem, and no rank waits for long work inside a timed collective. `on_every_rank(fn)` shares work of uneven
length among the ranks the same way; `tensor_from_rank0` sends a tensor rank 0 read to every rank;
`agree_on_config` refuses ranks that parsed different configurations; `check_output` asks once whether a job's
output folder can take its output.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from igpt_ds.atomic import unwritable
from igpt_ds.config import ConfigError, RunError, flatten
from igpt_ds.distributed.process_group import collective_device

T = TypeVar("T")


def agree_on_config(config: dict[str, Any]) -> None:
    """Refuse to run when ranks parsed different configurations (a config file that differs between nodes, an
    edit during start-up): schedules, stops and saves follow the config, so ranks would take different
    collective paths. Collective: one gather of a 32-byte digest, and of the configs only when digests differ;
    the same ConfigError on every rank, naming the first differing keys."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) == 1:
        return
    configs = [None] * dist.get_world_size()
    dist.all_gather_object(configs, config)
    first = flatten(configs[0])
    for rank, other in enumerate(configs[1:], start=1):
        theirs = flatten(other)
        diff = sorted(k for k in first.keys() | theirs.keys() if first.get(k) != theirs.get(k))
        if diff:
            shown = "; ".join(f"{k}: {first.get(k)!r} on rank 0, {theirs.get(k)!r} on rank {rank}" for k in diff[:3])
            raise ConfigError(f"ranks read different configurations ({shown}); give every rank the same config "
                              "file and arguments")  # fmt: skip


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj` in rank order, on every rank ([obj] without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def tensor_from_rank0(shape: torch.Size, read: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The fp32 tensor `read()` returns on rank 0, on every rank: one broadcast on the collective device (the
    accelerator under NCCL), so that a file every rank needs is read from shared storage once, not once per rank.
    Collective; each rank waits at most for one tensor's read. Without a process group, `read()` itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return read().float()
    out = torch.empty(shape, dtype=torch.float32, device=collective_device())
    if dist.get_rank() == 0:
        out.copy_(read())
    dist.broadcast(out, src=0)
    return out


def on_rank0(fn: Callable[[], T], poll_s: float = 1.0) -> T:
    """`fn()` run on rank 0 alone; its result (picklable) returned on every rank. Collective.

    Two uses. A decision from the filesystem (resume or not, which checkpoint, what is already done) is
    read once and shared, so ranks cannot take different collective paths on different views of a network
    filesystem. Long work (universal conversion, weight consolidation) runs in a worker thread on rank 0
    while every rank meets it in a one-element broadcast every `poll_s` seconds: each broadcast completes
    within `poll_s`, so no rank waits inside a collective for longer than that, however long the work
    takes, and a rank that dies still fails the others within the process group's timeout.

    Errors: a `ConfigError` or `RunError` raised by `fn` is raised as the same error on every rank (one line,
    exit 2 or 3 at the entry points); any other exception is re-raised on rank 0 and a RuntimeError naming it on the
    others. Without a process group (or in a world of one) it is `fn()`.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    outcome: list[tuple[str, Any]] = [("error", "rank 0 did not finish")]
    failure: list[BaseException] = []
    if dist.get_rank() == 0:

        def work() -> None:
            try:
                outcome[0] = ("ok", fn())
            except ConfigError as e:
                outcome[0] = ("config", str(e))
            except RunError as e:
                outcome[0] = ("run", str(e))
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are told
                outcome[0] = ("error", f"{type(e).__name__}: {e}")
                failure.append(e)

        worker = threading.Thread(target=work, name="igpt-rank0-work", daemon=True)
        worker.start()
    done = torch.zeros(1, device=collective_device())
    while not done.item():
        if dist.get_rank() == 0:
            worker.join(timeout=poll_s)
            done.fill_(float(not worker.is_alive()))
        dist.broadcast(done, src=0)
    shared = [outcome[0]]
    dist.broadcast_object_list(shared, src=0, device=collective_device())
    kind, value = shared[0]
    if kind == "config":
        raise ConfigError(value)
    if kind == "run":
        raise RunError(value)
    if kind == "error":
        if failure:
            raise failure[0]
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def on_every_rank(fn: Callable[[], T], poll_s: float = 1.0) -> list[T]:
    """`fn()` on every rank at once, each rank's result gathered on every rank in rank order. Collective.

    For work of uneven length (each rank hashing its share of a dataset): `fn` runs in a worker thread while the
    ranks meet in a one-element all-reduce every `poll_s` seconds until all are done, so no rank waits inside a
    timed collective for longer than that, as in `on_rank0`. A ConfigError on any rank is raised on every rank (the
    lowest rank's); any other exception as a RuntimeError naming the rank. Without a process group: [fn()]."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [fn()]
    outcome: list[tuple[str, Any]] = [("error", "did not finish")]

    def work() -> None:
        try:
            outcome[0] = ("ok", fn())
        except ConfigError as e:
            outcome[0] = ("config", str(e))
        except BaseException as e:  # noqa: BLE001 - reported to every rank below
            outcome[0] = ("error", f"{type(e).__name__}: {e}")

    worker = threading.Thread(target=work, name="igpt-every-rank-work", daemon=True)
    worker.start()
    busy = torch.ones(1, device=collective_device())
    while busy.item():
        worker.join(timeout=poll_s)
        busy.fill_(float(worker.is_alive()))
        dist.all_reduce(busy, op=dist.ReduceOp.MAX)
    outcomes = gather_objects(outcome[0])
    for rank, (kind, value) in enumerate(outcomes):
        if kind == "config":
            raise ConfigError(value)
        if kind == "error":
            raise RuntimeError(f"rank {rank} failed: {value}")
    return [value for _, value in outcomes]


def check_output(folder: str | Path, flag: str, need_bytes: int = 0) -> None:
    """ConfigError on every rank, before a job's work, when `folder` (the job's output, named by `flag`) cannot be
    made or written, or has less free space than `need_bytes`: one line naming the folder and the errno's meaning
    (`atomic.unwritable`). Rank 0 asks, a few system calls; collective."""

    def work() -> None:
        why = unwritable(folder, need_bytes)
        if why is not None:
            raise ConfigError(f"cannot write {flag}={folder} ({why}); choose a writable folder with room")

    on_rank0(work)
