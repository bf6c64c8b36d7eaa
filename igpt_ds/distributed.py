"""Process-group start-up for every way a run is launched.

One call, `init_distributed(timeout_s)`, works under
- the DeepSpeed launcher or torchrun (`deepspeed --hostfile hosts launcher/pretrain.py ...`): they
  set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
- Slurm (`srun python launcher/pretrain.py ...`, one task per device): DeepSpeed reads no SLURM_*
  variables itself (REFERENCE.md), so they are translated here;
- mpirun (`mpirun -np 4 -x MASTER_PORT python launcher/pretrain.py ...`): DeepSpeed's MPI discovery
  via mpi4py (rank 0's address; the port is MASTER_PORT, else 29500);
- nothing at all (`python launcher/pretrain.py ...`): a world of one on this machine.

The collective timeout is deliberate (`train.dist_timeout_s`): when one rank dies, the others fail
with a timeout error after that long instead of hanging until the job's wall-clock limit.

`on_rank0(fn)` is the one way a single rank does something for all: rank 0 alone reads the disk,
converts a checkpoint or consolidates weights, and every rank receives its result, so ranks never act
on different views of the filesystem, and no rank waits for long work inside a timed collective.

`StopSignal` turns SIGTERM / SIGUSR1 (Slurm preemption, `--signal` before the time limit) into one
decision shared by every rank, so pretraining and fine-tuning save a checkpoint together and exit.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

from igpt_ds.config import ConfigError

T = TypeVar("T")

MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Start the process group (idempotent); returns (rank, world_size)."""
    if not dist.is_initialized():
        mpi = "RANK" not in os.environ and any(k in os.environ for k in MPI_MARKERS)
        # mpirun inside a Slurm job starts its daemons with srun, so every rank inherits its daemon's
        # SLURM_PROCID: Open MPI's own rank variables (which srun never sets) win over Slurm's.
        slurm = "SLURM_PROCID" in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ
        if "RANK" not in os.environ and slurm:
            os.environ.update(slurm_env(os.environ))
        elif "RANK" not in os.environ and not mpi:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(),
            auto_mpi_discovery=mpi,
            # DeepSpeed's MPI discovery sets MASTER_PORT to this argument, not from the environment.
            distributed_port=int(os.environ.get("MASTER_PORT", TORCH_DISTRIBUTED_DEFAULT_PORT)),
            timeout=timedelta(seconds=timeout_s),
            verbose=False,
        )
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        # A scheduler that gives each task its own device (Slurm --gpus-per-task=1, a CUDA_VISIBLE_DEVICES
        # per rank) leaves fewer visible devices than tasks on the node; DeepSpeed's engine picks its device
        # by LOCAL_RANK, so it becomes the index among the visible ones.
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) % accelerator.device_count()
        os.environ["LOCAL_RANK"] = str(local_rank)
        accelerator.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size()


def slurm_env(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed variables from a Slurm task's environment (one task per device)."""
    job_id = int(env.get("SLURM_JOB_ID", "0"))
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
        # Every task of the job derives the same port without talking to the others; the offset
        # keeps clear of well-known ports and the spread makes two jobs sharing a node unlikely to clash.
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job_id % 20000),
    }


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist ('gpu[03-05,9],cpu1' -> 'gpu03'), via scontrol when present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^-,\]]+))?", nodelist)
    return m.group(1) + (m.group(2) or "") if m else nodelist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Destroy the process group before the process exits. A rank that exits with its gloo group still alive
    while another rank is working can abort in the group's destructor ('terminate called without an active
    exception', exit 134), and a launcher then kills the ranks still working."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def collective_device() -> torch.device:
    """Where the default group's collectives take their tensors: the accelerator under NCCL (and the like),
    the CPU under gloo."""
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    return torch.device(get_accelerator().current_device_name())


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


class StopSignal:
    """SIGTERM / SIGUSR1 as a request to save after the current step and exit; `agreed()` decides.

    Create it before anything slow, so a signal during start-up is kept for the first step rather than
    killing the process. The handler only notes the signal; `agreed()` is the decision, the same on every
    rank (any rank signalled = all stop), because the save that follows is collective. The flag is
    reduced over a CPU (gloo) group (NCCL cannot reduce a CPU tensor), asynchronously: each call starts
    a reduction and reads the one the previous call started, so its latency (milliseconds over TCP at
    hundreds of ranks) overlaps a training step instead of adding to it, and a signal stops the run one
    step later. Schedulers send these signals minutes before the kill (`#SBATCH --signal=B:USR1@300`).
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.group = None
        self.pending: tuple[dist.Work, torch.Tensor] | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: self.received.append(signum))

    def agreed(self) -> bool:
        """Whether any rank had received a signal by its previous call; collective: every rank calls it
        after the same steps."""
        if self.group is None:  # new_group is collective too; every rank's first call is at the same step
            self.group = dist.new_group(backend="gloo")
        stop = self.finish()
        flag = torch.tensor([float(bool(self.received))])
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return stop

    def finish(self) -> bool:
        """Wait for the reduction in flight (call once the loop is done); whether it saw a signal."""
        if self.pending is None:
            return False
        work, flag = self.pending
        work.wait()
        self.pending = None
        return bool(flag.item())
