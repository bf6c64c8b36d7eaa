"""The supervisor and its detached worker (igpt_ds.distributed.supervisor), with a stand-in job that waits for SIGTERM:
signals reach the worker, its exit status comes back, a SIGKILLed supervisor still lets the worker finish,
a closed console does not kill it; launcher processes are recognised by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from pretrain_support import REPO, env

from igpt_ds.distributed.rank_env import launcher_name
from igpt_ds.distributed.supervisor import Console


def start(out: Path, code: int = 7, **kwargs) -> subprocess.Popen:
    out.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "tests/supervised_program.py", str(out), str(code)], cwd=REPO, env=env(),
                            **kwargs)  # fmt: skip


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_a_signal_reaches_the_worker_and_its_status_comes_back(tmp_path):
    proc = start(tmp_path, code=7, stdout=subprocess.PIPE, text=True)
    wait_for(tmp_path / "worker.pid")
    worker = psutil.Process(int((tmp_path / "worker.pid").read_text()))
    assert worker.pid != proc.pid and proc.pid not in [p.pid for p in worker.parents()]  # detached
    assert worker.ppid() != proc.pid and os.getsid(worker.pid) != os.getsid(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 7 and "saved; exiting" in proc.stdout.read()
    assert (tmp_path / "got_sigterm").exists()


def test_sigusr2_prints_the_workers_stacks_and_the_run_goes_on(tmp_path):
    """`kill -USR2` on the launched command: where a seemingly stuck run is, without stopping it."""
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = start(tmp_path, code=7, stdout=out, stderr=subprocess.STDOUT)
    wait_for(tmp_path / "worker.pid")
    proc.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while "Current thread" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    assert 'supervised_program.py", line' in log.read_text() and proc.poll() is None  # its stack; still running
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 7


def test_a_killed_supervisor_still_lets_the_worker_finish(tmp_path):
    """What mpirun and DeepSpeed's agent do 0.2 s / 30 s after SIGTERM; the console (a pipe) closes with it."""
    proc = start(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(tmp_path / "worker.pid")
    worker = psutil.Process(int((tmp_path / "worker.pid").read_text()))
    proc.kill()
    proc.wait()
    proc.stdout.close()  # nobody reads the worker's console any more
    wait_for(tmp_path / "done")  # it got SIGTERM from losing its supervisor, and its print did not kill it
    assert worker.wait(timeout=60) is None or not worker.is_running()


def test_a_worker_that_never_reports_is_an_error(tmp_path):
    proc = start(tmp_path, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "worker.pid")
    os.kill(int((tmp_path / "worker.pid").read_text()), signal.SIGKILL)
    assert proc.wait(timeout=60) == 1 and "ended without an exit status" in proc.stderr.read()


@pytest.mark.parametrize(
    "name,cmdline,found",
    [
        ("python3", ["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", "train.py"], "deepspeed"),
        (
            "python3",
            ["/usr/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"],
            "deepspeed.launcher.launch",
        ),
        ("prterun", ["prterun", "--oversubscribe", "-np", "2"], "prterun"),
        ("slurmstepd", ["slurmstepd: [12.0]"], "slurmstepd"),
        ("torchrun", ["/venv/bin/python", "/venv/bin/torchrun", "--nproc-per-node", "8"], "torchrun"),
        ("bash", ["bash", "-c", "cd /home/deepspeed-project && python train.py"], None),
        ("python3", ["python", "/home/me/deepspeed_experiments/train.py"], None),
        ("tmux: server", ["tmux"], None),
    ],
)
def test_launcher_processes_are_recognised(name, cmdline, found):
    assert launcher_name(name, cmdline) == found


def test_console_goes_quiet_when_its_pipe_closes():
    read, write = os.pipe()
    console = Console(os.fdopen(write, "w"))
    os.close(read)
    console.write("x" * 100_000)  # more than a pipe buffer: EPIPE
    console.flush()
    assert console.write("still here\n") == len("still here\n")
