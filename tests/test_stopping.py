"""Every way of stopping a run ends in a checkpoint and a clean exit (igpt_ds.distributed.supervisor and .stop).

The signal goes to the command a user launched, nothing else: `python launcher/pretrain.py` alone (SIGTERM,
SIGINT), `deepspeed --num_gpus 2` (whose runner does not forward SIGTERM), and `mpirun` (Open MPI 5 kills the
ranks 0.2 s after forwarding SIGTERM). Each time: a complete checkpoint at the step reached, the rerun resumes
from it, and no process of the run remains. Fine-tuning and feature extraction under the deepspeed launcher
too. The deepspeed launcher over a hostfile (pdsh) and Slurm's scancel are in tests/test_cluster.py.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eval_support import check, run_entry, separable_shards, tiny_checkpoint
from pretrain_support import REPO, digits_shards, env, free_port, processes_of, write_config

from igpt_ds.checkpoint import ds_checkpoint
from igpt_ds.data.shards import ShardSplit
from igpt_ds.eval.feature_store import INDEX_FILE, FeatureSplit

pytestmark = pytest.mark.multiproc

VENV_BIN = Path(sys.executable).parent
TIMEOUT = 300
LONG = ["--train.max_steps=100000", "--train.save_every=100000", "--train.eval_every=0", "--train.log_every=10"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return digits_shards(tmp_path_factory.mktemp("stopping") / "shards")


def config_for(tmp_path: Path, shards: Path) -> Path:
    n_vocab = ShardSplit(shards, "train").n_vocab
    return write_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs", n_vocab, global_batch=8, micro_batch=4)


def wait_for(check_fn, timeout: float, what: str, details=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check_fn():
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")


def as_from_a_terminal() -> None:
    """The signal dispositions of a command typed at a terminal. A test runner started in the background of a
    script (`make test &`, CI wrappers) inherits SIGINT ignored, and a run started ignoring SIGINT ignores it,
    as any Python program does: the SIGINT cases must not depend on how the suite was started."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def launch_and_signal(cmd: list[str], log: Path, sig: int, marker: str, started: str = r"^step [1-9]\d*/") -> int:
    """Start `cmd` (its output in `log`), send `sig` to that process alone once `started` appears in the log,
    wait for it to exit and for every process naming `marker` to be gone; its exit status."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(PATH=f"{VENV_BIN}:{env()['PATH']}", OMPI_ALLOW_RUN_AS_ROOT="1",
                                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", MASTER_PORT=str(free_port())), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=as_from_a_terminal)  # fmt: skip
    try:
        wait_for(lambda: re.search(started, log.read_text(), re.M), TIMEOUT, "training", log.read_text)
        proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR2)  # the worker prints every thread's stack into the log
            time.sleep(5)
            pytest.fail(f"the run did not exit within {TIMEOUT} s of {signal.Signals(sig).name}; its log and "
                        f"stacks:\n{log.read_text()[-12000:]}")  # fmt: skip
        left = lambda: "\n".join(" ".join(p.cmdline()) for p in processes_of(marker)) + "\n" + log.read_text()
        wait_for(lambda: not processes_of(marker), 120, "every process of the run to end", left)
    finally:
        for p in processes_of(marker):
            p.kill()
    return rc


def stopped_step(run: Path, log: Path) -> int:
    saved = ds_checkpoint.latest(run / "checkpoints")
    assert saved is not None, log.read_text()[-3000:]
    step = ds_checkpoint.read_meta(saved)["step"]
    assert 0 < step < 100000 and step % 10 == 0, step  # stopped at a check step, long before the end
    return step


def resume_two_more_steps(config: Path, run: Path, step: int, *extra: str, script: str = "pretrain") -> None:
    cmd = [
        sys.executable,
        f"launcher/{script}.py",
        "--config",
        str(config),
        *LONG,
        *extra,
        f"--train.stop_at={step + 2}",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"step_{step:08d} at step {step}" in out.stdout, out.stdout[-2000:]  # "resumed from .../step_N at step N"
    assert ds_checkpoint.read_meta(ds_checkpoint.latest(run / "checkpoints"))["step"] == step + 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_python_alone(sig, shards, tmp_path):
    config = config_for(tmp_path, shards)
    log = tmp_path / "run.log"
    rc = launch_and_signal([sys.executable, "launcher/pretrain.py", "--config", str(config), *LONG], log, sig,
                           str(config))  # fmt: skip
    assert rc == 128 + sig, log.read_text()[-3000:]  # documented: 143 / 130, the run is not finished
    step = stopped_step(tmp_path / "runs" / "run", log)
    assert f"stopped at step {step} on {signal.Signals(sig).name}" in log.read_text()
    resume_two_more_steps(config, tmp_path / "runs" / "run", step)


def test_deepspeed_one_node_sigterm_to_the_command(shards, tmp_path):
    """DeepSpeed's runner dies on SIGTERM without telling its per-node agent; the supervisors see it go."""
    config = config_for(tmp_path, shards)
    log = tmp_path / "run.log"
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launcher/pretrain.py",
           "--config", str(config), *LONG]  # fmt: skip
    rc = launch_and_signal(cmd, log, signal.SIGTERM, str(config))
    assert rc == -signal.SIGTERM  # the runner itself: killed at once, before the ranks saved
    step = stopped_step(tmp_path / "runs" / "run", log)
    assert f"stopped at step {step} on SIGTERM" in log.read_text()
    resume_two_more_steps(config, tmp_path / "runs" / "run", step)


def test_mpirun_sigterm_to_the_command(shards, tmp_path):
    """Open MPI 5 SIGKILLs its ranks 0.2 s after it forwards SIGTERM: the detached workers still save."""
    config = config_for(tmp_path, shards)
    log = tmp_path / "run.log"
    mpirun = [str(VENV_BIN / "mpirun"), "--oversubscribe", "-np", "2"]
    mpirun += [a for name in ("PYTHONPATH", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "MASTER_PORT")
               for a in ("-x", name)]  # fmt: skip
    rc = launch_and_signal([*mpirun, sys.executable, "launcher/pretrain.py", "--config", str(config), *LONG], log,
                           signal.SIGTERM, str(config))  # fmt: skip
    assert rc != 0
    step = stopped_step(tmp_path / "runs" / "run", log)
    assert ds_checkpoint.read_meta(ds_checkpoint.latest(tmp_path / "runs" / "run" / "checkpoints"))["world_size"] == 2
    resume_two_more_steps(config, tmp_path / "runs" / "run", step)


def test_deepspeed_fine_tuning_sigterm_to_the_command(tmp_path):
    shards = separable_shards(tmp_path / "shards")
    ckpt = tiny_checkpoint(tmp_path / "pretrained", n_vocab=8)
    preset = "launcher/configs/finetune_digits_cpu.yaml"
    args = [f"--train.init_from={ckpt}", f"--data.shards={shards}", f"--train.run_root={tmp_path}", "--train.name=ft",
            "--train.ds_config=ds_configs/cpu_zero3.json", "--train.global_batch=16", "--train.micro_batch=8",
            "--finetune.stats_images=64", "--finetune.patience=0"]  # fmt: skip
    log = tmp_path / "run.log"
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launcher/finetune.py",
           "--config", preset, *args, *LONG]  # fmt: skip
    launch_and_signal(cmd, log, signal.SIGTERM, str(tmp_path), started=r"^step [1-9]\d*/100000 clf")
    step = stopped_step(tmp_path / "ft", log)
    assert f"stopped at step {step} on SIGTERM" in log.read_text()
    run = subprocess.run([sys.executable, "launcher/finetune.py", "--config", preset, *args, *LONG,
                          f"--train.stop_at={step + 2}"], cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=TIMEOUT)  # fmt: skip
    assert run.returncode == 0 and f"at step {step}" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


def test_deepspeed_feature_extraction_leaves_no_process_and_resumes(shards, tmp_path):
    palette = ShardSplit(shards, "train").palette
    ckpt = tiny_checkpoint(tmp_path / "ckpt", n_vocab=len(palette), palette=palette)
    out = tmp_path / "features"
    args = ["--checkpoint", str(ckpt), "--shards", str(shards), "--splits", "[train]", "--batch_size", "1",
            "--out", str(out)]  # fmt: skip
    log = tmp_path / "run.log"
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "launcher/extract_features.py", *args]  # fmt: skip
    launch_and_signal(cmd, log, signal.SIGTERM, str(out), started=r"features train \(rank 0\):\s+[1-9]")
    assert not (out / "train" / INDEX_FILE).exists()  # stopped midway, every rank gone
    check(run_entry("extract_features", *args))
    assert FeatureSplit(out / "train").n == len(ShardSplit(shards, "train"))
