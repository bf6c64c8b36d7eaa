"""Helpers for the pretraining tests: tiny digits shards, tiny configs, launching CPU ranks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = {"size": "igpt-tiny", "n_px": 8}


def digits_shards(out: Path) -> Path:
    """sklearn's 8x8 digits as shards (the real builder; no download)."""
    subprocess.run(
        [sys.executable, "-m", "data_tools.build_shards", "digits", "--out", str(out), "--n-px", "8"],
        cwd=REPO,
        env=env(),
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out


def write_config(path: Path, shards: Path, run_root: Path, n_vocab: int, **train) -> Path:
    """A tiny-model preset: 2 layers, width 32, 8x8 pixels, 16-sample batches of 4-sample micro-batches."""
    cfg = {
        "model": dict(TINY_MODEL, n_vocab=n_vocab),
        "data": {"shards": str(shards)},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {
            "name": "run",
            "run_root": str(run_root),
            "ds_config": "ds_configs/cpu_zero3.json",
            "global_batch": 16,
            "micro_batch": 4,
            "max_steps": 10,
            "log_every": 1,
            "eval_every": 5,
            "eval_batches": 1,
            "save_every": 5,
            "probe_every": 0,  # the live probe costs seconds; the tests that check it turn it on
            **train,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra: str) -> dict[str, str]:
    """The environment of every process a test starts. The virtualenv's bin first on PATH, as `make test` has it:
    DeepSpeed JIT-builds its CPU op with whichever `ninja` comes first, and two ninjas (the virtualenv's and the
    system's) read each other's build log as stale, so alternating between them rebuilds the op (~25 s) at every
    start."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    out = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PATH=path)
    out.update(extra)
    out.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(
    config: Path, *overrides: str, nprocs: int = 2, log_dir: Path, script: str = "pretrain", port: int | None = None
) -> list[subprocess.Popen]:
    """Start `nprocs` ranks of launcher/<script>.py the way torchrun would (env://), logs in `log_dir`."""
    port = str(port or free_port())
    procs = []
    for rank in range(nprocs):
        rank_env = env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nprocs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            LOCAL_SIZE=str(nprocs),  # as the DeepSpeed launcher sets it: all ranks on this node
        )
        log = open(log_dir / f"rank{rank}.log", "a")
        cmd = [sys.executable, f"launcher/{script}.py", "--config", str(config), *overrides]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def run_ranks(
    config: Path, *overrides: str, nprocs: int = 2, log_dir: Path, timeout: float = 300, script: str = "pretrain"
) -> str:
    """Run ranks to completion; rank 0's log. Fails the test on a nonzero exit, and if the run left DeepSpeed's CPU
    shared-memory buffers behind (igpt_ds.distributed.process_group.without_cpu_shm_allreduce)."""
    port = free_port()
    procs = start_ranks(config, *overrides, nprocs=nprocs, log_dir=log_dir, script=script, port=port)
    codes = [p.wait(timeout=timeout) for p in procs]
    out = (log_dir / "rank0.log").read_text()
    assert codes == [0] * nprocs, (
        f"exit codes {codes}\n{out[-4000:]}\n{(log_dir / f'rank{nprocs - 1}.log').read_text()[-3000:]}"
    )
    assert shm_segments(port) == [], "the run left shared memory in /dev/shm"
    return out


def shm_segments(port: int) -> list[str]:
    """DeepSpeed's CPU all-reduce segments of the process group on `port` (/dev/shm/deepspeed_allreduce_buffer_
    <uid>_<addr>_<port>_<rank>)."""
    return sorted(str(p) for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from TensorBoard event files (the last value wins for a repeated step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def losses(run_dir: Path) -> list[float]:
    train = scalars(run_dir / "tensorboard")["train/loss"]
    return [train[s] for s in sorted(train)]


def worker_of(supervisor_pid: int, timeout: float = 120):
    """The worker process (psutil.Process) that the entry point started as `supervisor_pid` runs the job in
    (igpt_ds.distributed.supervisor: found by the supervisor pid in its environment)."""
    import time

    import psutil

    from igpt_ds.distributed.supervisor import WORKER_ENV

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.process_iter():
            try:
                marker = p.environ().get(WORKER_ENV, "")
            except psutil.Error:
                continue
            if marker.endswith(f",{supervisor_pid}"):
                return p
        time.sleep(0.2)
    raise AssertionError(f"no worker of supervisor {supervisor_pid} within {timeout} s")


def processes_of(marker: str) -> list:
    """Live processes (psutil) whose command line names `marker` (a path unique to the test)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if any(marker in arg for arg in p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def drop_deepspeed_groups() -> None:
    """Forget the process-group handles DeepSpeed caches in module globals (deepspeed.utils.groups): an engine built on
    a later group in the same process would otherwise broadcast over a destroyed one ('Group ... is not
    registered')."""
    from deepspeed.utils import groups

    for name, value in vars(groups).items():
        if name.startswith("_") and name.isupper() and name.endswith(("GROUP", "GROUP_RANKS")):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mpu = None


@contextlib.contextmanager
def in_process_rank(backend: str = "gloo"):
    """A world of one in this process for entry points run in-process (`train(cfg)`, `finetune(cfg)`): LOCAL_RANK
    set as a launcher sets it, a `backend` group on a free port, DeepSpeed's cached group handles dropped before and
    after (`drop_deepspeed_groups`); after, the group destroyed and the signal handlers the entry points installed
    restored."""
    import signal

    import torch.distributed as dist

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    drop_deepspeed_groups()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        drop_deepspeed_groups()
        os.environ.pop("LOCAL_RANK", None) if saved is None else os.environ.__setitem__("LOCAL_RANK", saved)
        for s, handler in handlers.items():
            signal.signal(s, handler)
