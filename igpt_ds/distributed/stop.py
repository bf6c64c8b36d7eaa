"""Stop requests: SIGTERM / SIGINT / SIGUSR1 (and, through `igpt_ds.distributed.supervisor`, the end of the
launcher process) turned into one decision shared by every rank at a step they all reach, so pretraining and
fine-tuning save a checkpoint together and exit; and, in the same all-reduce, whether any rank saw a non-finite
loss or gradient since the last check (training diverged: stop without saving).
"""

from __future__ import annotations

import signal
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from igpt_ds import host_sync
from igpt_ds.distributed.process_group import collective_device


class Agreement(NamedTuple):
    """What every rank decided together at a check."""

    signal: int
    """The largest stop signal number any rank received (0: none)."""
    diverged: bool = False
    """Some rank saw a non-finite loss or a step skipped for non-finite gradients since the last check."""


class StopSignal:
    """SIGTERM / SIGINT / SIGUSR1 as a request to save a checkpoint and exit; `check(step)` decides, together.

    Create it before anything slow, so a signal during start-up is kept for the first check rather than
    killing the process. The handler only notes the signal (a second SIGINT raises KeyboardInterrupt at once,
    as Ctrl-C twice does). `check` is the decision, the same on every rank (any rank signalled = all stop),
    because the save that follows is collective. It communicates only at steps that are multiples of
    `every` and before each checkpoint: one three-element all-reduce (MAX of the signal numbers and of the
    divergence flags) over the main process group, NCCL on GPUs, whose cost grows with log(ranks) and is paid
    once every `every` steps, with no group or sockets of its own. A signal therefore stops the run within
    `every` steps.
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

    def check(self, step: int, force: bool = False, unhealthy: Tensor | None = None, skipped: int = 0) -> Agreement:
        """At steps divisible by `every`, and at any step when `force` (a checkpoint is due: its state must be
        known good), the decision every rank reads alike: the largest signal number any rank received and whether
        any rank's `unhealthy` (a device flag the loop keeps: some loss since the last check was not finite) or
        `skipped` (steps DeepSpeed skipped for non-finite gradients since the last check) says training diverged.
        Collective there, every rank calls it after the same steps, with the same `force`; one all-reduce of
        three numbers and one device-to-host read. Elsewhere Agreement(0) without communicating."""
        if step % self.every and not force:
            return Agreement(0)
        with host_sync.deliberate():  # the one sync of a check: every rank must read the same answer
            device = collective_device()
            flag = torch.tensor([float(max(self.received, default=0)), float(skipped > 0), 0.0], device=device)
            if unhealthy is not None:
                flag[2] = unhealthy.to(device=device, dtype=flag.dtype)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            sig, skips, nonfinite = flag.tolist()
            return Agreement(int(sig), bool(skips or nonfinite))


def stop_exit_code(signum: int) -> int:
    """The exit status of a run stopped by signal `signum` after saving: 128 + signum, what a process ended
    by that signal reports, so shells and schedulers see a run that did not finish (0 when not stopped)."""
    return 128 + signum if signum else 0
