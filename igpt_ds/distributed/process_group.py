"""The process group: started under any launcher, each rank on its own device.

`init_distributed(timeout_s)` starts the process group under any launcher (`igpt_ds.distributed.rank_env`: the
DeepSpeed launcher, torchrun, Slurm, mpirun, or nothing: a world of one) after binding the rank's device
(`bind_device`). The collective timeout is deliberate (`train.dist_timeout_s`): when one rank dies, the others fail
with a timeout error after that long instead of hanging until the job's wall-clock limit.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from igpt_ds.config import ConfigError
from igpt_ds.distributed.rank_env import rank_env


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
    (`bind_device`): DeepSpeed's start-up already initialises NCCL on it. Every group made later (DeepSpeed's) has
    the same collective timeout (`bound_new_groups`). ConfigError when the rendezvous port rank 0 is to open is in
    use (`check_master_port`), at once rather than after torch's retries."""
    without_cpu_shm_allreduce()
    if not dist.is_initialized():
        os.environ.update(rank_env())
        cpu_threads()
        bind_device()
        check_master_port()
        bound_new_groups(timedelta(seconds=timeout_s))
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


LOCAL_SIZE_KEYS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
"""Where torchrun, the deepspeed launcher, Open MPI and Slurm say how many ranks share this node."""


def cpu_threads() -> int | None:
    """Split this node's usable cores among its ranks when nothing set OMP_NUM_THREADS; the threads set, or None.

    torchrun sets OMP_NUM_THREADS=1 when it starts several processes a node; the deepspeed launcher and mpirun set
    nothing, and each rank then starts one OpenMP thread per core: R ranks on C cores run R·C threads that steal
    each other's cores. Measured on 2 CPU ranks on 2 cores (bench/results/cpu_threads.md): one thread a rank
    trains 20% faster than the launcher's default. Each rank takes max(1, C // R) (C: the cores this process may
    run on), also on GPU nodes, where DeepSpeed's CPU optimizer (offload) is what uses them."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    local = next((os.environ[k] for k in LOCAL_SIZE_KEYS if os.environ.get(k)), "1")
    ranks = int(re.match(r"\d+", local).group()) if re.match(r"\d+", local) else 1  # Slurm: '4(x2)'
    if ranks <= 1:
        return None
    threads = max(1, len(os.sched_getaffinity(0)) // ranks)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the processes this rank starts
    torch.set_num_threads(threads)
    return threads


def bound_new_groups(timeout: timedelta) -> None:
    """Give every process group created from now on `timeout` for its collectives when its creator names none.

    DeepSpeed makes its own groups (ZeRO's data-parallel group, the pipeline's stage groups) with `dist.new_group`
    and no timeout, and torch then takes its backend default (`distributed_c10d._get_default_timeout`: 30 minutes
    for gloo; NCCL's watchdog default), not the world group's: a stalled rank held ZeRO-1's gradient all-reduce for
    11+ minutes under train.dist_timeout_s=30. Under NCCL the timeout is enforced by torch's watchdog, which tears
    the process down (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default)."""
    import torch.distributed.distributed_c10d as c10d

    c10d._get_default_timeout = lambda backend: timeout


def check_master_port() -> None:
    """ConfigError when rank 0 is to open the rendezvous store on MASTER_PORT and something holds that port: torch
    retries for ~30 s and ends in a traceback (EADDRINUSE). Not under torchrun, whose agent holds the store."""
    if os.environ.get("RANK") != "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    port = int(os.environ["MASTER_PORT"])
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise ConfigError(f"MASTER_PORT {port} on {socket.gethostname()} is in use ({e.strerror}): another job "
                              "holds it; pick a free port (--master_port with the deepspeed launcher, MASTER_PORT "
                              "elsewhere)") from None  # fmt: skip


def unanswering_ranks(wait_s: float = 15.0) -> list[int] | None:
    """After a collective timed out: the ranks that do not answer a roll call in the rendezvous store within `wait_s`
    (each live rank writes its name, then waits for everyone's); None when the store itself does not answer (its
    host, rank 0 outside torchrun, is the one that stopped). Costs nothing until a failure."""
    import time

    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=wait_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        store.set(f"igpt/roll_call/{rank}", "here")
        deadline = time.monotonic() + wait_s
        while True:
            present = {r for r in range(world) if store.check([f"igpt/roll_call/{r}"])}
            if len(present) == world or time.monotonic() > deadline:
                return sorted(set(range(world)) - present)
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - the store's host is gone or frozen: that is the answer
        return None


def lost_peer(error: BaseException) -> str | None:
    """How a collective failed when a peer stalled or went away: 'timeout' (gloo: 'Timed out waiting ...'; NCCL's
    watchdog: 'Watchdog caught collective operation timeout'), 'closed' (gloo: a peer's process ended: 'Connection
    closed by peer', 'Connection reset by peer'); None for any other error."""
    text = str(error).lower()
    if not isinstance(error, RuntimeError):
        return None
    if "timed out" in text or ("timeout" in text and "collective" in text):
        return "timeout"
    if any(k in text for k in ("connection closed by peer", "connection reset by peer", "broken pipe")):
        return "closed"
    return None


def check_distinct_devices() -> None:
    """Refuse, on every rank, a job in which two ranks of a node drive the same GPU. `device_index` assumes tasks
    that share k visible GPUs are numbered in blocks of k; a scheduler that deals them out otherwise (Slurm's
    default block:cyclic distribution with --gpu-bind=closest: tasks 0, 2, 4, 6 on one socket's 4 GPUs) would put
    two ranks on one GPU and leave another idle. Collective: one all-gather of (host, GPU UUID) at start-up. CUDA
    only."""
    if get_accelerator().device_name() != "cuda" or not torch.cuda.is_available():
        return
    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    devices = [None] * dist.get_world_size()
    dist.all_gather_object(devices, (socket.gethostname(), uuid))
    message = duplicate_devices(devices)
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
that name files by LOCAL_RANK (node-local checkpoint storage) would then collide, `train.engine.build_ds_config` refuses
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


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def device() -> torch.device:
    """This rank's accelerator device (`bind_device` chose it), or the CPU on the CPU accelerator."""
    return torch.device(get_accelerator().current_device_name())


def collective_device() -> torch.device:
    """Where the default group's collectives take their tensors: the accelerator under NCCL (and the like),
    the CPU under gloo or without a process group (one process: collectives are no-ops there)."""
    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return torch.device("cpu")
    return torch.device(get_accelerator().current_device_name())
