"""A run's folder: claimed by one run at a time (`claim`: locked, writable; `check_room`: space for a checkpoint),
and what the run writes into it besides checkpoints: the resolved config, the DeepSpeed JSON actually used, the
code's revision, and the TensorBoard writer with the run's header line.

    run_folder.claim(run_dir)                          # first: locked for this run, writable; ConfigError otherwise
    run_folder.check_room(run_dir, checkpoint_bytes, keep)  # room for a checkpoint, before the engine is built
    files = run_folder.run_files(resolved_config, ds_config)
    run_folder.write_run_files(run_dir, files, rank)   # config.yaml, ds_config.json, git_rev.txt (rank 0, atomically)
    writer = run_folder.open_tensorboard(run_dir, rank, step, files, engine_line)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from igpt_ds.atomic import free_bytes, gib, unwritable, write_text
from igpt_ds.config import ConfigError
from igpt_ds.distributed.rank0 import on_rank0

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}
"""Run folders this process holds the lock of, and the open descriptor holding it: closing any descriptor of the
file would drop a POSIX lock, so there is one per folder for the life of the process."""


def claim(run_dir: Path, flag: str = "train.run_root") -> None:
    """Make `run_dir` this run's, before anything is read or built in it: ConfigError, on every rank, when it cannot
    be made or written (naming the errno's meaning) or when another live run holds it. Rank 0 holds an exclusive
    POSIX record lock (fcntl F_SETLK) on `<run_dir>/.lock` until its process ends, and writes its host and pid
    there for the next launch's message. Collective (rank 0 works, every rank hears).

    Why this lock: the kernel drops it when its process ends, however it ends (a crash or SIGKILL leaves a file,
    never a stale lock); on NFS (v3 through the lock manager, v4 in the protocol, whose server releases a dead
    client's lock when its lease expires, 90 s by default) and on GPFS/Spectrum Scale it is coherent across nodes;
    Lustre needs the `flock` mount option (`localflock` only sees locks on the same node, `noflock` refuses them:
    the claim then warns and goes on unlocked). A warning, not an error, there: refusing every run on such a
    mount would be worse than the race it guards against."""

    def work() -> None:
        why = unwritable(run_dir)
        if why is not None:
            raise ConfigError(f"cannot write the run folder {run_dir} ({why}); set --{flag} to a writable folder")
        run_dir.mkdir(parents=True, exist_ok=True)
        hold_lock(run_dir)

    on_rank0(work)


def check_room(run_dir: Path, checkpoint_bytes: int, keep: int, flag: str = "train.run_root") -> None:
    """ConfigError, on every rank, when `run_dir`'s filesystem has less free space than one checkpoint
    (`checkpoint_bytes`, from `plan.memory.checkpoint_bytes`); a warning when it cannot hold the `keep` checkpoints
    kept plus the one being written. Collective (rank 0 asks, one statvfs)."""

    def work() -> None:
        why = unwritable(run_dir, need_bytes=checkpoint_bytes)
        if why is not None:
            raise ConfigError(f"the run folder {run_dir} has no room for a checkpoint ({why}); free space there or "
                              f"set --{flag} to another filesystem")  # fmt: skip
        free, rotation = free_bytes(run_dir), (keep + 1) * checkpoint_bytes
        if free < rotation:
            print(f"warning: {run_dir} has {gib(free)} free; keeping train.keep_checkpoints={keep} checkpoints "
                  f"takes {gib(rotation)} while the next one is written", flush=True)  # fmt: skip

    on_rank0(work)


def hold_lock(run_dir: Path) -> None:
    """Take `<run_dir>/.lock` for this process (see `claim`); ConfigError naming the holder when a live run has it."""
    run_dir = run_dir.resolve()
    if run_dir in _held:
        return
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            holder = path.read_text().strip() or "a process that has not written its name yet"
            os.close(fd)
            raise ConfigError(f"the run folder {run_dir} is in use by a live run ({holder}); wait for it to end or "
                              "stop it, or pick another --train.name") from None  # fmt: skip
        os.close(fd)
        print(f"warning: cannot lock {path} ({e.strerror}: a Lustre mount without the flock option?); nothing "
              "stops a second launch into this run folder", flush=True)  # fmt: skip
        return
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n".encode(), 0)
    _held[run_dir] = fd


def run_files(resolved: dict[str, Any], ds_config: dict[str, Any]) -> dict[str, str]:
    """The files that say what ran: the resolved config, the DeepSpeed config actually used, the code's revision
    (asked of git by rank 0 alone, for every rank: two git processes per job, not per rank). Written into the run
    folder and into every checkpoint. Collective."""
    plain = json.loads(json.dumps(resolved))  # tuples -> lists for YAML
    return {
        "config.yaml": yaml.safe_dump(plain, sort_keys=False),
        "ds_config.json": json.dumps(ds_config, indent=2),
        "git_rev.txt": on_rank0(git_revision),
    }


def write_run_files(run_dir: Path, files: dict[str, str], rank: int) -> None:
    """Rank 0 writes `files` into the run folder, each atomically."""
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            write_text(run_dir / name, text)


def open_tensorboard(run_dir: Path, rank: int, step: int, files: dict[str, str], engine_line: str):
    """Rank 0's SummaryWriter on `<run_dir>/tensorboard` (None elsewhere), holding the config and the engine header
    as text at `step`; the header is also printed: one line per run saying how it runs (`train.engine.describe`)."""
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    writer.add_text("config", f"```\n{files['config.yaml']}\n```", step)
    writer.add_text("engine", engine_line, step)
    writer.flush()
    print(engine_line, flush=True)
    return writer


def open_run(
    run_dir: Path, resolved: dict[str, Any], ds_config: dict[str, Any], rank: int, step: int, header: str
) -> tuple[dict[str, str], Any]:
    """(files, writer) of a run starting or resuming at `step`: the files that say what ran (`run_files`), written into
    the run folder by rank 0, and rank 0's TensorBoard writer holding them and the engine `header` (None elsewhere).
    Collective (git is asked by rank 0)."""
    files = run_files(resolved, ds_config)
    write_run_files(run_dir, files, rank)
    return files, open_tensorboard(run_dir, rank, step, files, header)


def resumed_line(resuming: Any, step: int, reset_data_position: bool) -> str:
    """The console line of a run resuming checkpoint `resuming` (a `checkpoint.resume.Resume`) at `step`."""
    how = (" (universal checkpoint)" if resuming.universal else "") + (
        ", data order started afresh" if reset_data_position else ""
    )
    return f"resumed from {resuming.ckpt} at step {step}{how}"


def git_revision() -> str:
    """The commit of the code that ran, '+dirty' when the tree had changes; 'unknown' outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], cwd=here, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown\n"
    if rev.returncode != 0:
        return "unknown\n"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") + "\n"
