"""Cluster launches with the real programs (issue 5), all on this one machine.

- Slurm: a one-node cluster (munge, slurmctld, slurmd from Debian's slurm-wlm) runs
  launcher/slurm/pretrain.sbatch to the end; a second job gets USR1 mid-training, checkpoints,
  requeues itself and the requeued run resumes from that step and finishes.
- mpirun: PyPI's Open MPI starts 2 ranks; DeepSpeed finds them through mpi4py.
- The deepspeed launcher with a hostfile naming two hosts, igpt-node1 and igpt-node2: loopback
  aliases served by a local sshd (each session under its own host name), one rank per host, over
  pdsh and over Open MPI's mpirun.
- A rank SIGKILLed mid-training: the launcher exits non-zero within 2 minutes; the rerun resumes
  from the last complete checkpoint.

tests/cluster/cluster.sh sets up and tears down the daemons, host aliases and ssh client config; it
installs slurm-wlm, munge, pdsh and openssh-server with apt-get when they are missing. Needs root.
Each training run is the tiny model (2 layers, width 32) on 8x8 digits with 2 CPU ranks: ~20-40 s
on 2 cores, mostly start-up.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from pretrain_support import REPO, digits_shards, env, free_port, processes_of, scalars, worker_of, write_config

from igpt_ds.checkpoint import ds_checkpoint

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

CLUSTER = REPO / "tests" / "cluster" / "cluster.sh"
# The host aliases and the ssh client drop-in are machine-wide: one cluster at a time per machine.
LOCK = Path("/tmp/igpt-ds-test-cluster.lock")
HOSTS = ("igpt-node1", "igpt-node2")
VENV_BIN = Path(sys.executable).parent  # deepspeed, mpirun and the `python` the sbatch script runs
# This machine as a Slurm node: 2 CPU tasks instead of the scripts' GPU defaults.
SLURM_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10"]
# Open MPI refuses to start as root unless told twice.
MPI_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
# Start-up (imports, process group, DeepSpeed engine) dominates; under load it takes a few times longer.
RUN_TIMEOUT = 300


def cluster(*args: str | Path) -> None:
    out = subprocess.run(["bash", str(CLUSTER), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"cluster.sh {' '.join(map(str, args))} failed:\n{out.stdout}{out.stderr}"


def launch_env(**extra: str) -> dict[str, str]:
    """The pretraining tests' environment (CPU accelerator, op cache, PYTHONPATH) with the venv first on PATH."""
    out = env(**extra)
    out["PATH"] = f"{VENV_BIN}{os.pathsep}{out['PATH']}"
    return out


def wait_until(check: Callable[[], object], timeout: float, what: str, details: Callable[[], str] = str) -> object:
    """Poll `check` until it returns something truthy; fail with `details()` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")


def latest_step(run_dir: Path) -> int | None:
    ckpt = ds_checkpoint.latest(run_dir / "checkpoints")
    return None if ckpt is None else ds_checkpoint.read_meta(ckpt)["step"]


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else f"({path} does not exist)"


@pytest.fixture(scope="module")
def machine() -> Iterator[None]:
    """Root, the machine-wide lock, and the packages installed."""
    if os.geteuid() != 0:
        pytest.skip("starts daemons and edits /etc/hosts: run as root (CI does)")
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cluster("install")
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return digits_shards(tmp_path_factory.mktemp("cluster") / "shards")


@pytest.fixture(scope="module")
def n_vocab(shards) -> int:
    from igpt_ds.data.shards import ShardSplit

    return ShardSplit(shards, "train").n_vocab


@pytest.fixture
def slurm(machine) -> Iterator[dict[str, str]]:
    """A running one-node Slurm cluster; yields the environment its commands (and jobs) use."""
    folder = Path(tempfile.mkdtemp(prefix="igpt-slurm.", dir="/tmp"))  # short: munge's socket path is limited
    try:
        cluster("slurm-up", folder)
        yield launch_env(SLURM_CONF=str(folder / "slurm.conf"))
    finally:
        cluster("down", folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def two_hosts(machine, tmp_path) -> Iterator[Path]:
    """igpt-node1 and igpt-node2 reachable by ssh and pdsh; yields a DeepSpeed hostfile naming them."""
    folder = Path(tempfile.mkdtemp(prefix="igpt-ssh.", dir="/tmp"))
    try:
        cluster("ssh-up", folder)
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"{host} slots=1\n" for host in HOSTS))
        yield hostfile
    finally:
        cluster("down", folder)
        shutil.rmtree(folder, ignore_errors=True)


def deepspeed_env_file(path: Path, **extra: str) -> Path:
    """What the ranks on the other hosts need: DeepSpeed forwards only a few variables by itself."""
    base = launch_env()
    keep = ("PATH", "PYTHONPATH", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")
    path.write_text("".join(f"{k}={v}\n" for k, v in {**{k: base[k] for k in keep}, **extra}.items()))
    return path


# ---------------------------------------------------------------------------------------------- Slurm


def sbatch(slurm: dict[str, str], log: Path, config: Path, run_name: str) -> str:
    cmd = ["sbatch", "--parsable", *SLURM_NODE, f"--output={log}", "launcher/slurm/pretrain.sbatch"]
    job_env = {**slurm, "CONFIG": str(config), "RUN_NAME": run_name}
    out = subprocess.run(cmd, cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job(slurm: dict[str, str], job_id: str) -> dict[str, str]:
    cmd = ["scontrol", "-o", "show", "job", job_id]
    out = subprocess.run(cmd, env=slurm, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def job_details(slurm: dict[str, str], job_id: str, log: Path) -> str:
    """The job's record, its output and slurmctld's log, for failure messages."""
    ctld_log = Path(slurm["SLURM_CONF"]).parent / "slurmctld.log"
    return f"{job(slurm, job_id)}\n--- job output:\n{tail(log)}\n--- slurmctld.log:\n{tail(ctld_log, 3000)}"


def wait_job_done(slurm: dict[str, str], job_id: str, log: Path) -> None:
    def done() -> dict[str, str] | None:
        info = job(slurm, job_id)
        return info if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None

    info = wait_until(done, RUN_TIMEOUT, f"job {job_id} to end", lambda: job_details(slurm, job_id, log))
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_details(slurm, job_id, log)


def test_sbatch_pretrain_runs_to_the_end(slurm, shards, n_vocab, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs", n_vocab, max_steps=10)
    log = tmp_path / "slurm.out"
    job_id = sbatch(slurm, log, config, "slurm")
    wait_job_done(slurm, job_id, log)
    run = tmp_path / "runs" / "slurm"
    assert latest_step(run) == 10, tail(log)
    assert 10 in scalars(run / "tensorboard")["train/loss"]
    assert "restart 0: 2 ranks" in log.read_text()


def test_sbatch_preempted_checkpoints_requeues_and_resumes(slurm, shards, n_vocab, tmp_path):
    # Saves only on the signal and at the end, so the checkpoint found after the requeue is the signal's.
    config = write_config(
        tmp_path / "tiny.yaml", shards, tmp_path / "runs", n_vocab, max_steps=40, save_every=40, eval_every=40
    )
    log, run = tmp_path / "slurm.out", tmp_path / "runs" / "preempted"
    job_id = sbatch(slurm, log, config, "preempted")
    # The ranks install their signal handler before the first step: signal only once they are training.
    wait_until(lambda: re.search(r"^step [2-9]/40 loss", tail(log), re.M), RUN_TIMEOUT, "training", lambda: tail(log))
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm, check=True, timeout=30)

    # USR1 -> batch shell -> srun -> ranks save and exit 138 -> `scontrol requeue`: restarts 1, then
    # pending on a BeginTime delay once the first run's processes are gone.
    def requeued() -> bool:
        info = job(slurm, job_id)
        return (info["JobState"], info["Reason"], info["Restarts"]) == ("PENDING", "BeginTime", "1")

    wait_until(requeued, 120, "the requeue", lambda: job_details(slurm, job_id, log))
    step = latest_step(run)
    assert step is not None and step < 40, tail(log)
    assert f"stopped at step {step} on SIGUSR1" in log.read_text()

    # A requeued job waits out a BeginTime delay; release it now. Not within the requeue's second:
    # slurmd refuses a launch credential no newer than the revocation of the first run's ("Job
    # credential revoked") and the job fails.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm, check=True, timeout=30)
    wait_job_done(slurm, job_id, log)
    text = log.read_text()
    assert "restart 1: 2 ranks" in text
    assert re.search(rf"resumed from \S+step_{step:08d} at step {step}(?!\d)", text), tail(log)
    assert latest_step(run) == 40


# --------------------------------------------------------------------------------------------- mpirun


def test_mpirun_pretrain(shards, n_vocab, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs", n_vocab, max_steps=10)
    mpirun = [VENV_BIN / "mpirun", "--oversubscribe", "-np", "2", "-x", "MASTER_PORT"]
    cmd = [*mpirun, sys.executable, "launcher/pretrain.py", "--config", config]
    log = tmp_path / "mpirun.log"
    with open(log, "w") as out:
        rc = subprocess.run(
            list(map(str, cmd)),
            cwd=REPO,
            env=launch_env(MASTER_PORT=str(free_port()), **MPI_ROOT),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=RUN_TIMEOUT,
        ).returncode
    assert rc == 0, tail(log)
    ckpt = ds_checkpoint.latest(tmp_path / "runs" / "run" / "checkpoints")
    assert ckpt is not None, tail(log)
    meta = ds_checkpoint.read_meta(ckpt)
    assert (meta["step"], meta["world_size"]) == (10, 2)


# ------------------------------------------------------------------------- deepspeed launcher, 2 hosts


def run_deepspeed(args: list[str], log: Path, ds_env: Path, **extra: str) -> int:
    """Run the deepspeed launcher: stdout (the launchers' logs, pdsh's host-prefixed lines) to `log`,
    stderr to `log`.err. pdsh and mpirun buffer stdout in blocks when it is a file; sharing the file
    with stderr would let stderr writes land inside a stdout line."""
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        cmd = [str(VENV_BIN / "deepspeed"), *args]
        env = launch_env(DS_ENV_FILE=str(ds_env), **extra)
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=err, timeout=RUN_TIMEOUT).returncode


def outputs(log: Path) -> str:
    return f"{tail(log)}\n--- stderr:\n{tail(log.with_suffix('.err'))}"


def test_deepspeed_pdsh_one_rank_per_host(two_hosts, shards, n_vocab, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs", n_vocab, max_steps=10)
    log = tmp_path / "deepspeed.log"
    launcher = ["--hostfile", str(two_hosts), "--master_addr", HOSTS[0], "--master_port", str(free_port())]
    args = [*launcher, "launcher/pretrain.py", "--config", str(config)]
    assert run_deepspeed(args, log, deepspeed_env_file(tmp_path / "deepspeed_env")) == 0, outputs(log)
    text = log.read_text()
    # pdsh prefixes each host's output with its name; each host's launcher started one local rank.
    for node_rank, host in enumerate(HOSTS):
        assert re.search(rf"^{host}: .*nnodes=2, num_local_procs=1, node_rank={node_rank}$", text, re.M), outputs(log)
    assert latest_step(tmp_path / "runs" / "run") == 10


def test_deepspeed_exclude_picks_the_hosts(two_hosts, tmp_path):
    # `hostname` instead of training: which hosts ran something is all that is asked here. One host
    # left would be launched locally without --force_multi.
    launcher = ["--hostfile", str(two_hosts), "--exclude", HOSTS[0], "--force_multi", "--master_port", str(free_port())]
    args = [*launcher, "--no_python", "--no_local_rank", "hostname"]
    log = tmp_path / "deepspeed.log"
    assert run_deepspeed(args, log, deepspeed_env_file(tmp_path / "deepspeed_env")) == 0, outputs(log)
    ran = re.findall(r"^(\S+): (\S+)$", log.read_text(), re.M)
    assert ran == [(HOSTS[1], HOSTS[1])], outputs(log)


def test_deepspeed_openmpi_one_rank_per_host(two_hosts, shards, n_vocab, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs", n_vocab, max_steps=10)
    log = tmp_path / "deepspeed.log"
    # This launcher passes no port of its own: DeepSpeed's MPI discovery takes MASTER_PORT from the env file.
    ds_env = deepspeed_env_file(tmp_path / "deepspeed_env", MASTER_PORT=str(free_port()))
    launcher = ["--hostfile", str(two_hosts), "--launcher", "openmpi", "--launcher_args", "--display map"]
    args = [*launcher, "launcher/pretrain.py", "--config", str(config)]
    assert run_deepspeed(args, log, ds_env, **MPI_ROOT) == 0, outputs(log)
    # Open MPI's map: one node per host, rank 0 on the first and rank 1 on the second.
    nodes = re.findall(r"Data for node: (\S+).*?App rank: (\d+)", log.read_text(), re.S)
    assert nodes == [(HOSTS[0], "0"), (HOSTS[1], "1")], outputs(log)
    assert latest_step(tmp_path / "runs" / "run") == 10


# ---------------------------------------------------------------------------------------- a dead rank


def test_killed_rank_fails_the_launch_and_the_rerun_resumes(shards, n_vocab, tmp_path):
    config = write_config(
        tmp_path / "tiny.yaml", shards, tmp_path / "runs", n_vocab, max_steps=200, save_every=5, eval_every=100
    )
    run, log = tmp_path / "runs" / "run", tmp_path / "first.log"
    deepspeed = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd = [*deepspeed, "launcher/pretrain.py", "--config", str(config)]
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        past_checkpoint = re.compile(r"^step (?:[7-9]|\d\d+)/200 loss", re.M)
        wait_until(
            lambda: (latest_step(run) or 0) >= 5 and past_checkpoint.search(tail(log)),
            RUN_TIMEOUT,
            "a checkpoint and steps past it",
            lambda: tail(log),
        )
        rank1 = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
        assert len(rank1) == 1, [p.cmdline() for p in psutil.Process(launcher.pid).children(recursive=True)]
        killed_at = time.monotonic()
        worker_of(rank1[0].pid).send_signal(signal.SIGKILL)  # the process that trains, not its supervisor
        rc = launcher.wait(timeout=120)
        took = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:  # only when the launcher hung: end it and its ranks
            for p in [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]:
                p.kill()
    assert rc != 0, tail(log)
    print(f"launcher exited with {rc} {took:.1f} s after rank 1 was killed")

    step = latest_step(run)
    assert step is not None and step >= 5
    rerun = tmp_path / "rerun.log"
    with open(rerun, "w") as out:
        rc = subprocess.run(
            [*cmd, f"--train.stop_at={step + 2}"],
            cwd=REPO,
            env=launch_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=RUN_TIMEOUT,
        ).returncode
    assert rc == 0, tail(rerun)
    assert re.search(rf"resumed from \S+step_{step:08d} at step {step}(?!\d)", rerun.read_text()), tail(rerun)
    assert latest_step(run) == step + 2


# ------------------------------------------------------------------------------------- stopping a run


def rerun_resumes(config: Path, run: Path, log: Path) -> int:
    """The step of the stop checkpoint, after checking that one process resumes from it."""
    saved = ds_checkpoint.latest(run / "checkpoints")
    assert saved is not None, tail(log)
    step = ds_checkpoint.read_meta(saved)["step"]
    assert 0 < step < 100000 and step % 10 == 0, step  # a stop-check step, long before the end
    cmd = [sys.executable, "launcher/pretrain.py", "--config", str(config), f"--train.stop_at={step + 1}"]
    out = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert out.returncode == 0 and f"step_{step:08d} at step {step}" in out.stdout, out.stdout[-3000:] + out.stderr
    return step


def long_config(tmp_path: Path, shards: Path, n_vocab: int) -> Path:
    return write_config(tmp_path / "long.yaml", shards, tmp_path / "runs", n_vocab, max_steps=100000,
                        save_every=100000, eval_every=0, log_every=10)  # fmt: skip


def test_deepspeed_pdsh_sigterm_to_the_command(two_hosts, shards, n_vocab, tmp_path):
    """DeepSpeed's runner answers SIGTERM by killing pdsh and pkill-ing its agents, which SIGKILL the ranks 30 s
    later and cut their ssh consoles: every rank still saves (distributed.supervisor) and nothing stays behind."""
    config = long_config(tmp_path, shards, n_vocab)
    log = tmp_path / "deepspeed.log"
    launcher = ["--hostfile", str(two_hosts), "--master_addr", HOSTS[0], "--master_port", str(free_port())]
    cmd = [str(VENV_BIN / "deepspeed"), *launcher, "launcher/pretrain.py", "--config", str(config)]
    env_file = deepspeed_env_file(tmp_path / "deepspeed_env")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(DS_ENV_FILE=str(env_file)), stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_until(lambda: re.search(r"^\S+: step [1-9]\d*/100000 loss", tail(log), re.M), RUN_TIMEOUT, "training",
                   lambda: tail(log))  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=RUN_TIMEOUT) != 0
        wait_until(lambda: not processes_of(str(config)), 120, "every process of the run to end",
                   lambda: "\n".join(" ".join(p.cmdline()) for p in processes_of(str(config))))  # fmt: skip
    finally:
        for p in processes_of(str(config)):
            p.kill()
    rerun_resumes(config, tmp_path / "runs" / "run", log)


def test_sbatch_scancel_checkpoints_and_ends(slurm, shards, n_vocab, tmp_path):
    """scancel sends SIGTERM to every task (and SIGKILL after KillWait): the ranks save at the step reached."""
    config = long_config(tmp_path, shards, n_vocab)
    log = tmp_path / "slurm.out"
    job_id = sbatch(slurm, log, config, "run")
    wait_until(lambda: re.search(r"^step [1-9]\d*/100000 loss", tail(log), re.M), RUN_TIMEOUT, "training",
               lambda: tail(log))  # fmt: skip
    subprocess.run(["scancel", job_id], env=slurm, check=True, timeout=30)
    wait_until(lambda: job(slurm, job_id)["JobState"] == "CANCELLED" and not processes_of(str(config)), RUN_TIMEOUT,
               "the job and its processes to end", lambda: job_details(slurm, job_id, log))  # fmt: skip
    step = rerun_resumes(config, tmp_path / "runs" / "run", log)
    assert f"stopped at step {step} on SIGTERM" in log.read_text(), tail(log)


# ----------------------------------------------------------------- a shard build over ranks (issue 23)


def test_sbatch_and_mpirun_shard_builds_equal_one_process(machine, tmp_path):
    """launcher/slurm/build_shards.sbatch (2 tasks) and `mpirun -np 2` convert a WebDataset source part by part
    over their ranks: byte for byte what one process writes."""
    from data_helpers import folder_bytes, tar_source

    src = tar_source(tmp_path / "wds", 200, files=5)
    args = ["--n-px", "6", "--k", "8", "--palette-samples", "2000"]
    one = subprocess.run([sys.executable, "-m", "data_tools.build_shards", str(src), "--out", str(tmp_path / "one"),
                          "--workers", "1", *args], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                         timeout=RUN_TIMEOUT)  # fmt: skip
    assert one.returncode == 0, one.stderr

    log = tmp_path / "mpirun.log"
    mpirun = [str(VENV_BIN / "mpirun"), "--oversubscribe", "-np", "2", sys.executable, "-m", "data_tools.build_shards"]
    with open(log, "w") as out:
        rc = subprocess.run([*mpirun, str(src), "--out", str(tmp_path / "mpi"), "--workers", "1", *args], cwd=REPO,
                            env=launch_env(**MPI_ROOT), stdout=out, stderr=subprocess.STDOUT,
                            timeout=RUN_TIMEOUT).returncode  # fmt: skip
    assert rc == 0, tail(log)
    assert "rank 1 of 2: 2 of its 2 parts to convert (5 in all)" in log.read_text(), tail(log)
    assert folder_bytes(tmp_path / "mpi") == folder_bytes(tmp_path / "one")

    folder = Path(tempfile.mkdtemp(prefix="igpt-slurm.", dir="/tmp"))
    try:
        cluster("slurm-up", folder)
        slurm = launch_env(SLURM_CONF=str(folder / "slurm.conf"), SOURCE=str(src), OUT=str(tmp_path / "slurm"))
        log = tmp_path / "slurm.out"
        cmd = ["sbatch", "--parsable", *SLURM_NODE, f"--output={log}", "launcher/slurm/build_shards.sbatch", *args]
        out = subprocess.run(cmd, cwd=REPO, env=slurm, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        wait_job_done(slurm, out.stdout.strip().split(";")[0], log)
        assert "rank 1 of 2: 2 of its 2 parts" in log.read_text(), tail(log)
    finally:
        cluster("down", folder)
        shutil.rmtree(folder, ignore_errors=True)
    assert folder_bytes(tmp_path / "slurm") == folder_bytes(tmp_path / "one")
