"""Atomic outputs: a reader sees the old complete file or folder, or the new one, never half of one; and why a
folder cannot take an output, asked before the work (`unwritable`) or after a failed write (`write_failure`).

Files are written to a hidden temporary sibling, synced and `os.replace`d into place. Folders are
built in a hidden temporary sibling and renamed into place; an existing folder is renamed aside
first and deleted after, so the destination is always absent, old-and-complete or new-and-complete.
Imports the standard library only (shard-building workers import this package).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def publish_dir(tmp: Path, final: Path, aside: Path | None = None) -> None:
    """Rename the finished folder `tmp` to `final`, replacing an older one (moved to `aside` meanwhile)."""
    old = None
    if final.exists():
        old = aside or final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    fd = os.open(final.parent, os.O_RDONLY)  # make the renames durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it becomes `out_dir` only if the block succeeds."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                errno.EFBIG, errno.EIO}  # fmt: skip
"""The errnos of a write that failed for want of space or permission, or for a file where a folder belongs."""


def free_bytes(folder: str | Path) -> int:
    """Bytes an unprivileged writer may still use on `folder`'s filesystem (statvfs: f_bavail x f_frsize); quotas
    are not seen here (a write fails with EDQUOT)."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def unwritable(folder: str | Path, need_bytes: int = 0) -> str | None:
    """Why `folder` cannot take an output of `need_bytes`, as the end of a sentence naming it ('Read-only file
    system', 'Not a directory', '12.0 MiB free, 20.0 MiB needed (No space left on device)'); None when it can.
    Asks `folder`, or the nearest folder above it that exists when it is missing (the one a job's mkdir would write
    in): writes and removes a small probe file there and reads the free space. Makes nothing, so a job that then
    refuses its inputs leaves no empty output folder behind. A few system calls, once before a job's work (and
    before each checkpoint)."""
    here = Path(folder)
    while not here.exists() and here != here.parent:  # a file on the path stops the walk: Not a directory
        here = here.parent
    if not here.is_dir():
        return os.strerror(errno.ENOTDIR)
    try:
        probe = here / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
        with open(probe, "xb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        free = free_bytes(here)
    except OSError as e:
        return e.strerror or str(e)
    if free < need_bytes:
        return f"{gib(free)} free, {gib(need_bytes)} needed ({os.strerror(errno.ENOSPC)})"
    return None


def write_failure(path: str | Path, error: BaseException) -> str | None:
    """Why writing under `path` failed, when for want of space or permission: the errno's meaning ('No space left on
    device', 'Permission denied', ...). A writer that reports no errno (torch's zip writer: 'unexpected pos',
    'iostream error') is explained by asking `path`'s folder (`unwritable`). None when the failure is something
    else (the caller re-raises it)."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        return error.strerror
    if isinstance(error, (OSError, RuntimeError)):
        folder = Path(path)
        while not folder.is_dir() and folder != folder.parent:
            folder = folder.parent
        return unwritable(folder, need_bytes=1 << 20)
    return None
