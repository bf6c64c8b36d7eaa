"""Failures users meet, each through the real entry points, with nothing good lost (docs/failures.md).

Divergence stops the run before it writes a checkpoint of a non-finite state; a full or unwritable disk is one
line naming the path; a second launch into a live run's folder is refused; token and label values are checked
where they enter, features before any fit; a damaged checkpoint is one line naming the file (and a fallback only
when asked); a stalled rank ends the job within train.dist_timeout_s plus a margin, naming the rank; a busy
rendezvous port is one line at once."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from pretrain_support import digits_shards, start_ranks, worker_of, write_config

from igpt_ds.checkpoint import ds_checkpoint
from igpt_ds.data.shards import ShardSplit

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("failures")


@pytest.fixture(scope="module")
def shards(work) -> Path:
    return digits_shards(work / "shards")


def launch(config: Path, *overrides: str, log_dir: Path, nprocs: int = 2, timeout: float = 300,
           script: str = "pretrain", port: int | None = None) -> tuple[list[int], str]:  # fmt: skip
    """Run `nprocs` ranks of launcher/<script>.py; (exit codes, rank 0's output)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("rank*.log"):
        old.unlink()
    procs = start_ranks(config, *overrides, nprocs=nprocs, log_dir=log_dir, script=script, port=port)
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return codes, (log_dir / "rank0.log").read_text()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("igpt-pretrain: error:")]


def config_for(work: Path, shards: Path, name: str, **train) -> Path:
    return write_config(work / f"{name}.yaml", shards, work / name, ShardSplit(shards, "train").n_vocab, **train)


def test_a_diverged_run_stops_before_saving_and_keeps_its_good_checkpoints(work, shards):
    """open_lm#7: --optim.lr=1e4 gave infinite gradients from step 3; the run trained on to its end, exited 0 and
    rotated the good checkpoints out. ZeRO-1 fp32 (DeepSpeed skips the overflowing steps) as in the report."""
    config = config_for(work, shards, "diverge", ds_config="ds_configs/cpu.json", max_steps=10, save_every=5,
                        keep_checkpoints=2, eval_every=0)  # fmt: skip
    root = work / "diverge" / "run" / "checkpoints"
    codes, out = launch(config, log_dir=work / "diverge_logs")
    assert codes == [0, 0], out[-3000:]
    good = sorted(p.name for p in root.glob("step_*"))
    assert good == ["step_00000005", "step_00000010"]

    codes, out = launch(config, "--train.max_steps=40", "--optim.lr=1e4", log_dir=work / "diverge_logs")
    assert codes == [3, 3], out[-3000:]
    [line] = error_lines(out)
    assert "training diverged after step 10, by step 15" in line and "step 10, whose checkpoint stays latest" in line
    assert "Traceback" not in out
    assert sorted(p.name for p in root.glob("step_*")) == good  # none written, none rotated out
    assert (root / "latest").read_text().strip() == "step_00000010"

    # What the line says to do works: a lower rate resumes from the good checkpoint and finishes.
    codes, out = launch(config, "--train.max_steps=20", "--optim.lr=1e-3", log_dir=work / "diverge_logs")
    assert codes == [0, 0], out[-3000:]
    assert "at step 10" in out and "step 20/20" in out
    assert ds_checkpoint.read_meta(ds_checkpoint.latest(root))["step"] == 20


def test_a_stalled_rank_ends_the_job_within_its_timeout_naming_the_rank(work, shards):
    """DeepSpeed#7044: SIGSTOP one worker of a 2-rank ZeRO-1 run; the other waited in ZeRO's gradient all-reduce
    for 11+ minutes under --train.dist_timeout_s=30 (DeepSpeed's groups took torch's 30-minute default)."""
    config = config_for(work, shards, "stall", ds_config="ds_configs/cpu.json", max_steps=100000,
                        save_every=100000, eval_every=0, log_every=20, dist_timeout_s=15)  # fmt: skip
    logs = work / "stall_logs"
    logs.mkdir()
    procs = start_ranks(config, log_dir=logs)
    stalled = worker_of(procs[1].pid)
    try:
        deadline = time.monotonic() + 240
        while "step 20/" not in (logs / "rank0.log").read_text():
            assert time.monotonic() < deadline and procs[0].poll() is None, (logs / "rank0.log").read_text()[-3000:]
            time.sleep(0.2)
        stalled.suspend()
        since = time.monotonic()
        code = procs[0].wait(timeout=300)
        waited = time.monotonic() - since
    finally:
        stalled.kill()
        for p in procs:
            p.kill() if p.poll() is None else None
            p.wait(timeout=60)
    out = (logs / "rank0.log").read_text()
    assert code == 3, out[-3000:]
    [line] = error_lines(out)
    assert "longer than train.dist_timeout_s; rank(s) 1 stopped answering" in line
    assert "Traceback" not in out
    # The bound: the timeout, the roll call (15 s) and shutting down; far from the hang of more than 11 minutes.
    assert 15 <= waited < 120, waited


def test_a_busy_rendezvous_port_is_one_line_at_once(work, shards):
    """DeepSpeed#3916: a port another job holds ended in a DistNetworkError traceback (EADDRINUSE) after 28 s."""
    config = config_for(work, shards, "port")
    with socket.socket() as other_job:
        other_job.bind(("", 0))
        other_job.listen()
        port = other_job.getsockname()[1]
        logs = work / "port_logs"
        logs.mkdir()
        procs = start_ranks(config, log_dir=logs, port=port)
        try:
            code = procs[0].wait(timeout=120)
        finally:
            for p in procs:
                p.kill() if p.poll() is None else None
                p.wait(timeout=60)
    out = (logs / "rank0.log").read_text()
    assert code == 2, out[-3000:]
    [line] = error_lines(out)
    assert f"MASTER_PORT {port} on {socket.gethostname()} is in use" in line and "pick a free port" in line
    assert "Traceback" not in out and not (work / "port").exists()  # refused before anything was written
