"""Host-device synchronisation in the hot loops: the deliberate ones marked, the accidental ones found.

A GPU step runs at the GPU's pace only while the host queues work ahead of it. Whatever makes the host wait for
the device — `.item()`, `.tolist()`, `.cpu()`, `nonzero()` and boolean-mask indexing (their output size lives on
the device), a blocking copy from pageable host memory — drains that queue; once per step it can cost several
percent of a small model's step time, and it costs nothing to avoid. The training, fine-tuning, sampling and
feature-extraction loops mark their per-step work `hot()` and the few syncs they mean `deliberate()` (the loss at
log steps, the stop agreement, evaluation results, checkpoints, a batch of features leaving the device).

`SyncRecorder` finds the others. On a CUDA device it turns on `torch.cuda.set_sync_debug_mode("warn")` and
records each synchronising call PyTorch reports; on a CPU, where nothing synchronises, it records the calls that
would (the list above, by a `TorchFunctionMode`), so the CPU test suite catches a new `.item()` in a hot loop
before any GPU sees it. Either way a record is kept only inside `hot()` and outside `deliberate()`, and is
attributed to the innermost caller outside torch: igpt-ds's own code (a defect) or DeepSpeed's engine (its own
business, counted apart). tests/test_host_sync.py and tests/gpu/ run every loop under it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

_state = threading.local()
PACKAGE = Path(__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent


def _depth(name: str) -> int:
    return getattr(_state, name, 0)


@contextlib.contextmanager
def hot() -> Iterator[None]:
    """A loop's per-step work: no host-device sync is meant here but inside `deliberate()`."""
    for recorder in getattr(_state, "recorders", ()):
        recorder.hot_entries += 1
    _state.hot = _depth("hot") + 1
    try:
        yield
    finally:
        _state.hot -= 1


@contextlib.contextmanager
def deliberate() -> Iterator[None]:
    """A sync the loop means to make. Costs a thread-local counter; with CUDA's sync debug mode on (a recorder),
    turns it off for the duration so that the sync is neither reported nor raised."""
    _state.deliberate = _depth("deliberate") + 1
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        _state.deliberate -= 1
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def _accidental() -> bool:
    return _depth("hot") > 0 and _depth("deliberate") == 0


@dataclass
class Sync:
    op: str
    """The synchronising call (`item`, `nonzero`, `to(device, blocking)`, or CUDA's warning text)."""
    where: str
    """file:line of the innermost caller outside torch."""
    owner: str
    """'igpt_ds', 'deepspeed' or 'other'."""


def _caller(skip: tuple[Path, ...]) -> tuple[str, str]:
    """(file:line, owner) of the innermost frame outside torch, this module and `skip`."""
    frame = sys._getframe(1)
    here = Path(__file__).resolve()
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        inside = path == here or path.is_relative_to(TORCH) or any(path.is_relative_to(s) for s in skip)
        if not inside and "contextlib" not in path.name and path.name != "warnings.py":
            owner = "igpt_ds" if path.is_relative_to(PACKAGE) else "deepspeed" if "deepspeed" in path.parts else "other"
            return f"{path}:{frame.f_lineno}", owner
        frame = frame.f_back
    return "?", "other"


# Calls that make a CUDA host wait for the device, named as `TorchFunctionMode` sees them.
SYNCING = {"item", "tolist", "cpu", "numpy", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
           "__bool__", "__int__", "__float__", "__index__", "equal", "allclose", "is_nonzero"}  # fmt: skip
NEW_FROM_HOST = {"tensor", "new_tensor", "as_tensor"}


def _would_sync(func, args, kwargs) -> str | None:
    """The name of a call that synchronises on CUDA (see SYNCING), or None."""
    name = getattr(func, "__name__", "")
    if name in SYNCING:
        return name
    if name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
        index = args[1] if len(args) > 1 else None
        parts = index if isinstance(index, (tuple, list)) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            return f"{name}[bool mask]"
    if name in ("to", "cuda") and not kwargs.get("non_blocking", False):
        target = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (torch.device, str))]
        if target or name == "cuda":
            return f"{name}(device, blocking)"
    if name in NEW_FROM_HOST and kwargs.get("device") is not None:
        return f"{name}(host data, device=)"
    if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) > 1:
        if isinstance(args[1], torch.Tensor):
            return "repeat_interleave(tensor repeats)"
    return None


class _WouldSync(TorchFunctionMode):
    def __init__(self, recorder: SyncRecorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _accidental():
            op = _would_sync(func, args, kwargs)
            if op is not None:
                self.recorder.add(op)
        return func(*args, **kwargs)


@dataclass
class SyncRecorder:
    """Record the host-device syncs made inside `hot()` and outside `deliberate()`, in this thread:

        with SyncRecorder() as rec:
            train(cfg)
        assert rec.ours() == [], rec.report()

    `cuda`: watch real CUDA syncs (sync debug mode "warn"); default: when a CUDA device is available. Otherwise the
    calls that would synchronise on one are recorded (`TorchFunctionMode`). `skip`: more folders whose frames are
    looked through when attributing a call (a test's own helpers)."""

    cuda: bool | None = None
    skip: tuple[Path, ...] = ()
    records: list[Sync] = field(default_factory=list)
    hot_entries: int = 0
    """How many times a `hot()` region was entered while recording: 0 means nothing was checked."""

    def add(self, op: str) -> None:
        where, owner = _caller(self.skip)
        self.records.append(Sync(op, where, owner))

    def ours(self) -> list[Sync]:
        return [r for r in self.records if r.owner == "igpt_ds"]

    def report(self) -> str:
        counts: dict[tuple[str, str, str], int] = {}
        for r in self.records:
            counts[(r.owner, r.op, r.where)] = counts.get((r.owner, r.op, r.where), 0) + 1
        return "\n".join(f"{n:5d} x {owner:9s} {op:28s} {where}" for (owner, op, where), n in sorted(counts.items()))

    def __enter__(self) -> SyncRecorder:
        self.cuda = torch.cuda.is_available() if self.cuda is None else self.cuda
        self._stack = contextlib.ExitStack()
        _state.recorders = (*getattr(_state, "recorders", ()), self)
        self._stack.callback(lambda: setattr(_state, "recorders", _state.recorders[:-1]))
        if self.cuda:
            self._stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("always")
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            self._stack.callback(torch.cuda.set_sync_debug_mode, previous)
            shown = warnings.showwarning

            def hook(message, category, filename, lineno, file=None, line=None):
                if "synchronizing" in str(message).lower():
                    if _accidental():
                        self.add(str(message).split("\n")[0][:60])
                    return
                shown(message, category, filename, lineno, file, line)

            warnings.showwarning = hook
        else:
            self._stack.enter_context(_WouldSync(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
