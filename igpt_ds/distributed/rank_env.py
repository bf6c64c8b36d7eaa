"""What each way of launching a run tells a rank, and which processes above a rank are its launcher.

`rank_env()` gives RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT under
- the DeepSpeed launcher or torchrun (`deepspeed --hostfile hosts launcher/pretrain.py ...`): they set them;
- Slurm (`srun python launcher/pretrain.py ...`, one task per device): DeepSpeed reads no SLURM_* variables
  itself, so they are translated here (`slurm_env`);
- mpirun (`mpirun -np 4 -x MASTER_PORT python launcher/pretrain.py ...`): Open MPI's rank through mpi4py, rank
  0's address broadcast, the local rank counted among the ranks on the same host; the port is MASTER_PORT,
  else 29500 (the same discovery as DeepSpeed's `deepspeed.comm.mpi_discovery`);
- nothing at all (`python launcher/pretrain.py ...`): a world of one on this machine, on a free port.

`launcher_processes()` finds the launcher processes above this one (the `deepspeed` command and its per-node
agent, torchrun, mpirun and Open MPI's daemons, slurmstepd), which `igpt_ds.distributed.supervisor` watches: the
exit of any of them means the run is being stopped.

Standard library only (mpi4py and psutil imported when needed): the supervisor process imports this, and it
must start in milliseconds without torch or DeepSpeed.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping

MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
RANK_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_PORT = 29500
"""torch.distributed's and DeepSpeed's default master port."""

LAUNCHER_PROGRAMS = {
    "deepspeed",  # DeepSpeed's runner (the command users type)
    "torchrun",
    "mpirun",
    "mpiexec",
    "orterun",
    "prterun",  # Open MPI 5's mpirun
    "prted",  # Open MPI 5's per-node daemon
    "orted",
    "hydra_pmi_proxy",  # MPICH / Intel MPI
    "mpiexec.hydra",
    "slurmstepd",
}
LAUNCHER_MODULES = {
    "deepspeed.launcher.launch",  # DeepSpeed's per-node agent
    "deepspeed.launcher.runner",
    "torch.distributed.run",
    "torch.distributed.launch",
}


def rank_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables of this process (see the module docstring); {} when already set."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return {}
    # mpirun inside a Slurm job starts its daemons with srun, so every rank inherits its daemon's
    # SLURM_PROCID: Open MPI's own rank variables (which srun never sets) win over Slurm's.
    if "SLURM_PROCID" in env and "OMPI_COMM_WORLD_SIZE" not in env:
        return slurm_env(env)
    if any(k in env for k in MPI_MARKERS):
        return mpi_env(env)
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}  # fmt: skip


LAUNCH_RANKS = (
    ("RANK", "WORLD_SIZE"),  # torchrun, the DeepSpeed launcher, a test harness
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI's mpirun (before Slurm's: see rank_env)
    ("PMI_RANK", "PMI_SIZE"),  # MPICH, Intel MPI (Hydra)
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),  # MVAPICH2
    ("SLURM_PROCID", "SLURM_NTASKS"),  # srun
)


def launch_rank(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) a launcher gave this process through its environment alone (no MPI initialisation, no
    process group): for jobs whose ranks coordinate through files, such as a shard build. (0, 1) when none."""
    env = os.environ if env is None else env
    for rank, size in LAUNCH_RANKS:
        if rank in env and size in env:
            return int(env[rank]), int(env[size])
    return 0, 1


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
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


def mpi_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed variables of an MPI rank, through mpi4py (collective over MPI_COMM_WORLD)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    master = None
    if rank == 0:
        try:  # the first address of this host, as DeepSpeed's discovery takes it
            master = subprocess.check_output(["hostname", "-I"], timeout=30).decode().split()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            master = socket.gethostbyname(socket.gethostname())
    master = comm.bcast(master, root=0)
    hosts = comm.allgather(MPI.Get_processor_name())
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(hosts[:rank].count(hosts[rank])),
        "WORLD_SIZE": str(comm.Get_size()),
        "MASTER_ADDR": master,
        "MASTER_PORT": env.get("MASTER_PORT") or str(DEFAULT_PORT),
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


def launcher_name(name: str, cmdline: list[str]) -> str | None:
    """The launcher a process is ('deepspeed', 'deepspeed.launcher.launch', 'prted', ...), or None: its
    program, the script an interpreter runs, or the module `-m` names."""
    if name in LAUNCHER_PROGRAMS:
        return name
    for i, arg in enumerate(cmdline[:6]):
        if os.path.basename(arg) in LAUNCHER_PROGRAMS:
            return os.path.basename(arg)
        if arg == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] in LAUNCHER_MODULES:
            return cmdline[i + 1]
    return None


def launcher_processes() -> list:
    """psutil.Process objects of the launchers above this process, nearest first."""
    import psutil

    found = []
    for p in psutil.Process().parents():
        try:
            if launcher_name(p.name(), p.cmdline()):
                found.append(p)
        except psutil.Error:  # gone, or not ours to read
            continue
    return found
