"""Process-group start-up, one decision shared by every rank, and stop requests.

`init_distributed(timeout_s)` starts the process group under any launcher (`igpt_ds.launchers.rank_env`:
the DeepSpeed launcher, torchrun, Slurm, mpirun, or nothing: a world of one). The collective timeout is
deliberate (`train.dist_timeout_s`): when one rank dies, the others fail with a timeout error after that
long instead of hanging until the job's wall-clock limit.

`on_rank0(fn)` is the one way a single rank does something for all: rank 0 alone reads the disk,
converts a checkpoint or consolidates weights, and every rank receives its result, so ranks never act
on different views of the filesystem, and no rank waits for long work inside a timed collective.

`StopSignal` turns SIGTERM / SIGINT / SIGUSR1 (and, through `igpt_ds.supervisor`, the end of the launcher
process) into one decision shared by every rank at a step they all reach, so pretraining and fine-tuning
save a checkpoint together and exit.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from igpt_ds import host_sync
from igpt_ds.config import ConfigError
from igpt_ds.launchers import rank_env

T = TypeVar("T")


def without_cpu_shm_allreduce() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce (idempotent; call before the
    first `deepspeed.init_distributed` or `deepspeed.initialize`).

    Why: with the CPU accelerator every DeepSpeed process group JIT-compiles the `deepspeed_shm_comm` op (minutes
    on a small machine, a compiler needed on every node) and maps a 69 MB segment per rank named
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> that it never unlinks (DeepSpeed 0.19.8:
    csrc/cpu/comm/shm.cpp has no call to shared_close). Every run on a new port leaves 69 MB x local ranks
    of RAM in /dev/shm until reboot; a test suite or a sweep of CPU runs fills the machine's memory. The op
    serves only `deepspeed.comm.inference_all_reduce` (tensor-parallel inference), which igpt-ds never calls:
    training collectives go through torch.distributed either way. docs/reference.md#deepspeed."""
    # By module name: `import deepspeed.comm.torch as m` would bind PyTorch, which deepspeed.comm re-exports as `torch`.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if getattr(ds_torch, "build_shm_op", None) is not None:
        ds_torch.build_shm_op = _no_shm_op


def _no_shm_op() -> None:
    return None


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Start the process group (idempotent); returns (rank, world_size). The rank's device is chosen first
    (`bind_device`): DeepSpeed's start-up already initialises NCCL on it."""
    without_cpu_shm_allreduce()
    if not dist.is_initialized():
        os.environ.update(rank_env())
        bind_device()
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(),
            auto_mpi_discovery=False,  # rank_env did it
            distributed_port=int(os.environ["MASTER_PORT"]),
            timeout=timedelta(seconds=timeout_s),
            verbose=False,
        )
        check_distinct_devices()
    else:
        bind_device()
    return dist.get_rank(), dist.get_world_size()


def check_distinct_devices() -> None:
    """Refuse, on every rank, a job in which two ranks of a node drive the same GPU. `device_index` assumes tasks
    that share k visible GPUs are numbered in blocks of k; a scheduler that deals them out otherwise (Slurm's
    default block:cyclic distribution with --gpu-bind=closest: tasks 0, 2, 4, 6 on one socket's 4 GPUs) would put
    two ranks on one GPU and leave another idle. Collective: one all-gather of (host, GPU UUID) at start-up. CUDA
    only."""
    if get_accelerator().device_name() != "cuda" or not torch.cuda.is_available():
        return
    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    message = duplicate_devices(gather_objects((socket.gethostname(), uuid)))
    if message:
        raise ConfigError(message)


def duplicate_devices(devices: list[tuple[str, str]]) -> str | None:
    """The error for ranks sharing a (host, device) in `devices` (rank order), or None."""
    first: dict[tuple[str, str], int] = {}
    for rank, device in enumerate(devices):
        if device in first:
            return (f"ranks {first[device]} and {rank} on {device[0]} both use GPU {device[1]}: give each task its own "
                    "GPU (Slurm --gpus-per-task=1 or --gpu-bind=single:1) or let every task see all of its node's "
                    "GPUs (docs/cluster.md, GPU binding)")  # fmt: skip
        first[device] = rank
    return None


def device_index(local_rank: int, visible: int) -> int:
    """The device a rank uses among the `visible` ones: its node-local rank when every task of the node sees
    every device (`deepspeed --num_gpus 8`, torchrun, srun without GPU binding); the one device it sees when the
    scheduler binds one per task (Slurm --gpus-per-task=1, a CUDA_VISIBLE_DEVICES per rank); and generally
    local_rank mod visible, which gives each task of a group sharing k devices its own (--gpu-bind=closest)."""
    if visible < 1:
        raise ConfigError("no accelerator device is visible to this rank: check CUDA_VISIBLE_DEVICES and the "
                          "scheduler's GPU binding (or set DS_ACCELERATOR=cpu for a CPU run)")  # fmt: skip
    return local_rank % visible


local_rank_rewritten = False
"""Whether `bind_device` changed LOCAL_RANK (a task bound to fewer devices than its node has): DeepSpeed features
that name files by LOCAL_RANK (node-local checkpoint storage) would then collide, `engine.build_ds_config` refuses
them."""


def bind_device() -> None:
    """Set this rank's device before anything uses one, and make LOCAL_RANK its index among the visible devices.

    DeepSpeed takes the device index from LOCAL_RANK everywhere: `init_process_group(device_id=
    cuda:$LOCAL_RANK)` (eager NCCL start-up, comm/torch.py), the engine, zero.Init and the pipeline module. Under
    one device per task LOCAL_RANK 5 would name cuda:5 of the one visible device, so the variable is rewritten to
    the index (`device_index`); Open MPI's local rank with it, which DeepSpeed's engine asserts equal. A no-op on
    the CPU accelerator."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    index = device_index(local_rank, accelerator.device_count())
    global local_rank_rewritten
    local_rank_rewritten = local_rank_rewritten or index != local_rank
    os.environ["LOCAL_RANK"] = str(index)
    if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
        os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(index)
    accelerator.set_device(index)


def shutdown() -> None:
    """Destroy the process group before the process exits. A rank that exits with its gloo group still alive
    while another rank is working can abort in the group's destructor ('terminate called without an active
    exception', exit 134), and a launcher then kills the ranks still working."""
    if dist.is_initialized():
        dist.destroy_process_group()


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


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj` in rank order, on every rank ([obj] without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def collective_device() -> torch.device:
    """Where the default group's collectives take their tensors: the accelerator under NCCL (and the like),
    the CPU under gloo."""
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    return torch.device(get_accelerator().current_device_name())


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

    Errors: a `ConfigError` raised by `fn` is raised as the same ConfigError on every rank (one line, exit
    2 at the entry points); any other exception is re-raised on rank 0 and a RuntimeError naming it on the
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


class StopSignal:
    """SIGTERM / SIGINT / SIGUSR1 as a request to save a checkpoint and exit; `check(step)` decides, together.

    Create it before anything slow, so a signal during start-up is kept for the first check rather than
    killing the process. The handler only notes the signal (a second SIGINT raises KeyboardInterrupt at once,
    as Ctrl-C twice does). `check` is the decision, the same on every rank (any rank signalled = all stop),
    because the save that follows is collective. It communicates only at steps that are multiples of
    `every`: one one-element all-reduce (MAX of the signal numbers) over the main process group, NCCL on
    GPUs, whose cost grows with log(ranks) and is paid once every `every` steps, with no group or sockets of
    its own. A signal therefore stops the run within `every` steps.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.received: list[int] = []
        for sig in self.SIGNALS:
            # A signal the process was started ignoring stays ignored, as in any Python program and in the
            # supervisor: a shell without job control starts `cmd &` ignoring SIGINT so that Ctrl-C on the script
            # does not reach it (send such a run SIGTERM), and `nohup` is an explicit request.
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, self.note)

    def note(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt
        self.received.append(signum)

    def check(self, step: int) -> int:
        """At steps divisible by `every`: the largest signal number any rank received (0: carry on); collective
        there, every rank calls it after the same steps. Elsewhere 0 without communicating."""
        if step % self.every:
            return 0
        with host_sync.deliberate():  # the one sync of a stop check: every rank must read the same answer
            flag = torch.tensor([float(max(self.received, default=0))], device=collective_device())
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag.item())


def stop_exit_code(signum: int) -> int:
    """The exit status of a run stopped by signal `signum` after saving: 128 + signum, what a process ended
    by that signal reports, so shells and schedulers see a run that did not finish (0 when not stopped)."""
    return 128 + signum if signum else 0
