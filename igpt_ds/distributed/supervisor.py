"""Every entry point runs as a supervisor and a detached worker, so that however a run is stopped, it ends in a
checkpoint and leaves no process behind.

Launchers stop ranks in ways a training process cannot survive on its own:
- `deepspeed` on one node ignores SIGTERM's meaning: the command dies and its per-node agent and the ranks
  keep running;
- DeepSpeed's per-node agent (multi-node over pdsh, or Ctrl-C) sends SIGTERM to the ranks and SIGKILL 30 s
  later, and Open MPI 5's mpirun sends SIGKILL 0.2 s after SIGTERM (measured): less than a checkpoint of a
  large model takes to write;
- over ssh (pdsh), the ranks' stdout goes away with the launcher, and the next print would end the rank.

So the process a launcher starts is only a *supervisor*. It works out its rank (`rank_env.rank_env`: the
launcher's variables, Slurm's, or Open MPI's through mpi4py), starts the *worker* — the same command — in a
new session, reparented away from the launcher's process tree (a double fork), forwards SIGTERM, SIGINT,
SIGUSR1 and SIGUSR2 to it (SIGHUP as SIGTERM; SIGUSR2 makes the worker print every thread's stack and go on,
`dump_stacks_on`), and exits with the worker's status. It also watches the launcher processes above it
(`rank_env.launcher_processes`) and turns the exit of any of them into a SIGTERM for the worker. The supervisor
imports neither torch nor DeepSpeed and holds no device.

The worker treats the loss of its supervisor (a pipe it holds reaches end-of-file, whatever killed the
supervisor) as SIGTERM: pretraining and fine-tuning save a checkpoint and exit, evaluation exits at once
(it keeps what it finished). Its console goes quiet instead of failing if it went with the launcher, and it
has `ORPHAN_TIMEOUT_S` (environment IGPT_DS_ORPHAN_TIMEOUT_S) to finish before it exits regardless.

A task that srun started runs its job in-process: Slurm signals every task itself and kills only after its
KillWait, and a detached worker could escape the job step's process tracking. IGPT_DS_SUPERVISE=0 runs an
entry point in the launched process itself (debuggers, profilers).
"""

from __future__ import annotations

import faulthandler
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from igpt_ds.distributed.rank_env import launcher_processes, rank_env

WORKER_ENV = "IGPT_DS_WORKER"
"""In the worker: '<read fd of the supervisor's life line>,<write fd of the status line>,<supervisor pid>'
(also how tools find a supervisor's worker: /proc/<pid>/environ)."""
DISABLE_ENV = "IGPT_DS_SUPERVISE"
ORPHAN_TIMEOUT_S = float(os.environ.get("IGPT_DS_ORPHAN_TIMEOUT_S", "1800"))
"""How long a worker whose supervisor is gone may take to save and exit."""
FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGUSR1: signal.SIGUSR1,
             signal.SIGUSR2: signal.SIGUSR2, signal.SIGHUP: signal.SIGTERM}  # fmt: skip
WATCH_S = 1.0
"""Seconds between looks at the launcher processes."""

# The double fork: the intermediate process exits at once, so the worker is reparented to init (or the
# nearest subreaper) and is no descendant of the launcher, whose process-tree kill then does not reach it.
DETACH = "import os, sys\nif os.fork():\n    os._exit(0)\nos.execv(sys.argv[1], sys.argv[1:])"


def supervised(main: Callable[[], int]) -> int:
    """Run `main` (an entry point's main, returning its exit status) in a supervised, detached worker; in the
    worker, as a Slurm task (srun), or with IGPT_DS_SUPERVISE=0, run it here."""
    if os.environ.get(WORKER_ENV):
        return run_worker(main)
    if os.environ.get(DISABLE_ENV) == "0" or slurm_task():
        dump_stacks_on(signal.SIGUSR2)
        return main()
    return supervise()


def dump_stacks_on(sig: int) -> None:
    """`sig` prints every thread's Python stack to stderr and the run goes on: `kill -USR2 <launched pid>` shows
    where a rank that seems stuck is (the supervisor forwards it to the worker)."""
    faulthandler.register(sig, file=sys.__stderr__, all_threads=True)


def slurm_task() -> bool:
    """Whether srun started this process as a task of a job step. Slurm signals every task itself (scancel,
    --signal) and kills only after the cluster's KillWait; a worker detached from the task could escape the
    step's process tracking (proctrack/linuxproc), so a task runs its job in-process."""
    return "SLURM_STEP_ID" in os.environ and not any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "RANK"))


def supervise() -> int:
    """The launched process: start the worker, relay signals and launcher exits to it, return its status."""
    life_r, life_w = os.pipe()  # the supervisor holds life_w until it dies: the worker sees EOF then
    status_r, status_w = os.pipe()  # the worker writes 'pid N' and 'exit N'
    env = {**os.environ, **rank_env(), WORKER_ENV: f"{life_r},{status_w},{os.getpid()}"}
    cmd = [sys.executable, "-c", DETACH, sys.executable, *sys.orig_argv[1:]]
    subprocess.run(cmd, env=env, pass_fds=(life_r, status_w), start_new_session=True, check=True)
    os.close(life_r)
    os.close(status_w)
    worker: list[int] = []
    pending: list[int] = []

    def relay(sig: int) -> None:
        if worker:
            try:
                os.kill(worker[0], sig)
            except ProcessLookupError:
                pass
        else:
            pending.append(sig)

    for sig, as_sig in FORWARDED.items():
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup: a SIGHUP the user asked to ignore stays ignored
            signal.signal(sig, lambda signum, frame, s=as_sig: relay(s))
    threading.Thread(target=watch_launchers, args=(relay,), daemon=True, name="igpt-launcher-watch").start()
    code = None
    with os.fdopen(status_r) as lines:
        for line in lines:  # blocks until the worker is gone; signal handlers run meanwhile
            kind, value = line.split()
            if kind == "pid":
                worker.append(int(value))
                for sig in pending:
                    relay(sig)
            elif kind == "exit":
                code = int(value)
    os.close(life_w)
    if code is None:
        print(f"igpt-ds: worker {worker[0] if worker else '?'} ended without an exit status (killed)", file=sys.stderr)
        return 1
    return code


def watch_launchers(relay: Callable[[int], None]) -> None:
    """Turn the exit of any launcher process above the supervisor into one SIGTERM for the worker."""
    try:
        watched = launcher_processes()
    except Exception:  # noqa: BLE001 - no psutil view of the parents (odd platform): nothing to watch
        return
    while True:
        time.sleep(WATCH_S)
        gone = [p for p in watched if not p.is_running()]
        if gone:
            print(f"igpt-ds: launcher process {gone[0].pid} exited; stopping the run", file=sys.stderr, flush=True)
            relay(signal.SIGTERM)
            return


def run_worker(main: Callable[[], int]) -> int:
    """The worker: report to the supervisor, stop when it is gone, run `main`, report its status."""
    life_r, status_w, _ = (int(v) for v in os.environ.pop(WORKER_ENV).split(","))
    for fd in (life_r, status_w):  # programs this worker starts must not hold the supervisor's pipes open
        os.set_inheritable(fd, False)
    os.write(status_w, f"pid {os.getpid()}\n".encode())
    dump_stacks_on(signal.SIGUSR2)
    sys.stdout, sys.stderr = Console(sys.stdout), Console(sys.stderr)
    threading.Thread(target=watch_supervisor, args=(life_r,), daemon=True, name="igpt-supervisor-watch").start()
    code = 1
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
        raise
    finally:
        try:
            os.write(status_w, f"exit {code}\n".encode())
        except OSError:  # the supervisor is gone
            pass
    return code


def watch_supervisor(life_r: int) -> None:
    """Block until the supervisor's end of the life line closes; then SIGTERM to this process, and after
    ORPHAN_TIMEOUT_S an exit regardless."""
    while os.read(life_r, 1):
        pass
    print("igpt-ds: the launched process is gone; stopping the run", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_TIMEOUT_S)
    os._exit(128 + signal.SIGTERM)


class Console(io.TextIOBase):
    """A text stream that goes quiet instead of raising when what it writes to is gone (BrokenPipeError, EIO:
    a launcher's pipe or ssh session that ended): a rank must not die of a print while it saves."""

    def __init__(self, stream: io.TextIOBase):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError:
            self.silence()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            self.silence()

    def silence(self) -> None:
        self.stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str):  # anything else (buffer, errors, ...) is the stream's
        return getattr(self.stream, name)
