"""Failures users meet, each through the real entry points, with nothing good lost (docs/failures.md).

Divergence stops the run before it writes a checkpoint of a non-finite state; a full or unwritable disk is one
line naming the path; a second launch into a live run's folder is refused; token and label values are checked
where they enter, features before any fit; a damaged checkpoint is one line naming the file (and a fallback only
when asked); a stalled rank ends the job within train.dist_timeout_s plus a margin, naming the rank; a busy
rendezvous port is one line at once."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from eval_support import run_entry, synthetic_features
from pretrain_support import REPO, digits_shards, env, free_port, start_ranks, worker_of, write_config

from igpt_ds.checkpoint import ds_checkpoint
from igpt_ds.checkpoint.weights import save_consolidated
from igpt_ds.config import ModelConfig
from igpt_ds.data.shards import ShardSplit
from igpt_ds.models.igpt import IGPT

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

    # A rerun with nothing left to train says so.
    codes, out = launch(config, "--train.max_steps=15", log_dir=work / "diverge_logs")
    assert codes == [0, 0], out[-3000:]
    assert "nothing to train: the checkpoint is at step 20 and train.max_steps=15" in out


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
    config = config_for(work, shards, "port", dist_timeout_s=20)  # rank 1 stops waiting for the other job soon
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


def in_mount_namespace(mount_sh: str, driver: str) -> dict:
    """Python `driver` run after shell `mount_sh` in a mount namespace of its own (the root of a new user namespace
    may mount a tmpfs or remount a folder read-only: no privilege needed, nothing seen outside); the JSON `driver`
    prints last."""
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-ec", f'{mount_sh}\nexec "$0" -c "$1"',
         sys.executable, driver],
        cwd=REPO, env=env(PYTHONPATH=f"{REPO}:{REPO / 'tests'}"), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_full_disk_is_one_line_before_the_save_and_the_run_resumes_once_there_is_room(work, shards):
    """ChatGLM-6B#1166: run_root on a small tmpfs; the second save failed with a torch traceback ('unexpected pos',
    'iostream error'), never 'No space left on device' nor the path. Nothing was lost: keep that."""
    mnt = work / "small_disk"
    mnt.mkdir()
    config = write_config(work / "full.yaml", shards, mnt, ShardSplit(shards, "train").n_vocab,
                          ds_config="ds_configs/cpu.json", max_steps=10, save_every=5, eval_every=0)  # fmt: skip
    logs = work / "full_logs"
    driver = f"""
import json, subprocess
from pathlib import Path
from test_failures import launch
root = Path({str(mnt)!r}) / "run" / "checkpoints"
full = launch(Path({str(config)!r}), log_dir=Path({str(logs)!r}) / "full")
kept = sorted(p.name for p in root.glob("step_*") if (p / "complete").is_file()), (root / "latest").read_text()
subprocess.run(["mount", "-o", "remount,size=16m", {str(mnt)!r}], check=True)
room = launch(Path({str(config)!r}), log_dir=Path({str(logs)!r}) / "room")
print(json.dumps({{"full": full, "kept": kept, "room": room, "latest": (root / "latest").read_text()}}))
"""
    # A checkpoint of this run is ~1.0 MB: room for the run folder and one, not for a second beside it.
    result = in_mount_namespace(f"mount -t tmpfs -o size=1600k tmpfs {mnt}", driver)
    codes, out = result["full"]
    assert codes == [3, 3], out[-3000:]
    [line] = error_lines(out)
    step_10, step_5 = root_of(mnt) / "step_00000010", root_of(mnt) / "step_00000005"
    assert f"no room for checkpoint {step_10}" in line and "No space left on device" in line, line
    assert f"{step_5} stays latest" in line and "Traceback" not in out
    assert "warning: " in out and "while the next one is written" in out  # said at the start, before any step
    assert result["kept"] == [["step_00000005"], "step_00000005"]
    codes, out = result["room"]
    assert codes == [0, 0], out[-3000:]
    assert "at step 5" in out and result["latest"] == "step_00000010"


def root_of(run_root: Path) -> Path:
    return run_root / "run" / "checkpoints"


def test_a_write_that_fails_mid_checkpoint_names_the_path_and_keeps_latest(work):
    """Another job fills the disk after the room check: torch's writer fails without an errno ('unexpected pos');
    the save says 'No space left on device' and the path, and the previous checkpoint stays latest."""
    mnt = work / "filled_disk"
    mnt.mkdir()
    driver = f"""
import json, os, sys
sys.argv = ["rank_programs.py", "save_on_a_disk_that_fills", {str(mnt)!r}]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str({free_port()}),
                  SYNC_PORT=str({free_port()}))
import rank_programs
rank_programs.save_on_a_disk_that_fills({str(mnt)!r})
"""
    result = in_mount_namespace(f"mount -t tmpfs -o size=2m tmpfs {mnt}", driver)
    ckpt = mnt / "checkpoints"
    assert result["error"].startswith(f"could not write checkpoint {ckpt / 'step_00000002'} (No space left on device)")
    assert f"{ckpt / 'step_00000001'} stays latest" in result["error"]
    assert result["latest"] == "step_00000001" and result["complete"] == ["step_00000001"]


def test_an_unwritable_run_folder_is_one_line_before_the_engine_is_built(work, shards):
    """pytorch-lightning#21800: run_root on a read-only mount, or a file where a folder belongs: 30-39-line
    tracebacks raised after the engine was built."""
    blocker = work / "a_file"
    blocker.write_text("not a folder")
    config = config_for(work, shards, "unwritable")
    codes, out = launch(config, f"--train.run_root={blocker / 'runs'}", log_dir=work / "unwritable_logs")
    assert codes == [2, 2], out[-3000:]
    [line] = error_lines(out)
    assert f"cannot write the run folder {blocker / 'runs' / 'run'} (Not a directory)" in line
    assert "set --train.run_root to a writable folder" in line and "engine:" not in out and "Traceback" not in out

    read_only = work / "read_only"
    read_only.mkdir()
    driver = f"""
import json
from pathlib import Path
from test_failures import launch
logs = Path({str(work)!r}) / "ro_logs"
print(json.dumps(launch(Path({str(config)!r}), "--train.run_root={read_only}", log_dir=logs)))
"""
    remount = f"mount --bind {read_only} {read_only}\nmount -o remount,ro,bind {read_only}"
    codes, out = in_mount_namespace(remount, driver)
    assert codes == [2, 2], out[-3000:]
    [line] = error_lines(out)
    assert f"cannot write the run folder {read_only / 'run'} (Read-only file system)" in line and "engine:" not in out


def test_a_second_launch_into_a_live_run_folder_is_refused_and_a_killed_one_leaves_no_lock(work, shards):
    """torchtune#481: two launches of the same run a second apart both trained into one folder (two sets of
    TensorBoard events; once a crash mid-save)."""
    config = config_for(work, shards, "twice", ds_config="ds_configs/cpu.json", max_steps=100000, save_every=100000,
                        eval_every=0, log_every=20)  # fmt: skip
    logs = work / "twice_logs"
    logs.mkdir()
    first = start_ranks(config, log_dir=logs)
    holder = worker_of(first[0].pid)
    try:
        deadline = time.monotonic() + 240
        while "step 20/" not in (logs / "rank0.log").read_text():
            assert time.monotonic() < deadline and first[0].poll() is None, (logs / "rank0.log").read_text()[-3000:]
            time.sleep(0.2)
        codes, out = launch(config, log_dir=work / "twice_second_logs")
        assert codes == [2, 2], out[-3000:]
        [line] = error_lines(out)
        run_dir = work / "twice" / "run"
        who = f"host {socket.gethostname()}, pid {holder.pid},"
        assert f"the run folder {run_dir} is in use by a live run ({who}" in line
        assert len(list((run_dir / "tensorboard").glob("events.*"))) == 1  # the second wrote nothing
    finally:
        for p in [holder, *(worker_of(p.pid) for p in first if p.poll() is None and p is not first[0])]:
            p.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        for p in first:
            p.kill() if p.poll() is None else None
            p.wait(timeout=60)
    assert (work / "twice" / "run" / ".lock").is_file()
    codes, out = launch(config, "--train.max_steps=5", log_dir=work / "twice_third_logs")
    assert codes == [0, 0], out[-3000:]  # the lock died with its process


def test_a_truncated_checkpoint_is_one_line_naming_the_file_and_a_fallback_only_when_asked(work, shards):
    """metaseq#53: `latest` named a truncated checkpoint; the resume failed with `OSError: [Errno 22] Invalid
    argument` from checkpoint.load, naming no file, with a complete checkpoint beside it."""
    config = config_for(work, shards, "truncated", ds_config="ds_configs/cpu.json", max_steps=10, save_every=5,
                        eval_every=0)  # fmt: skip
    root = work / "truncated" / "run" / "checkpoints"
    codes, out = launch(config, log_dir=work / "truncated_logs")
    assert codes == [0, 0], out[-3000:]
    cut = root / "step_00000010" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(cut, "r+b") as f:  # a copy or a save that stopped half-way
        f.truncate(cut.stat().st_size // 2)

    codes, out = launch(config, "--train.max_steps=15", log_dir=work / "truncated_logs")
    assert codes == [2, 2], out[-3000:]
    [line] = error_lines(out)
    assert f"the checkpoint to resume, {root / 'step_00000010'}, is damaged: {cut} is truncated" in line
    assert "--train.resume_fallback=true" in line and "Traceback" not in out
    assert (root / "latest").read_text() == "step_00000010" and cut.is_file()  # nothing moved without asking

    codes, out = launch(config, "--train.max_steps=15", "--train.resume_fallback=true", log_dir=work / "truncated_logs")
    assert codes == [0, 0], out[-3000:]
    assert f"moved aside to {root / 'damaged_step_00000010'}" in out and "at step 5" in out
    assert (root / "damaged_step_00000010" / cut.name).is_file()  # kept for a look
    assert (root / "latest").read_text() == "step_00000015"
    assert (root / "step_00000010" / "complete").is_file()  # saved again from the resumed run


def test_token_and_label_values_are_checked_where_they_enter(work, shards):
    """nnUNet#291: a token file overwritten with values >= n_vocab (checksums off, the default) ended in
    `IndexError: index out of range in self` mid-training; labels outside the class list went unseen."""
    bad = work / "bad_tokens"
    shutil.copytree(shards, bad)
    tokens = bad / "train" / "shard-00000.tokens"
    tokens.write_bytes(b"\xff" * tokens.stat().st_size)  # same size: only the values tell
    config = write_config(work / "bad_tokens.yaml", bad, work / "bad_tokens_runs", ShardSplit(bad, "train").n_vocab)
    codes, out = launch(config, log_dir=work / "bad_tokens_logs")
    assert codes == [2, 2], out[-3000:]
    [line] = error_lines(out)
    assert re.search(rf"{re.escape(str(tokens))}: row \d+ holds token 65535, not below n_vocab=512", line), line
    assert "Traceback" not in out

    labels = bad / "val" / "shard-00000.labels.npy"
    shutil.copy(shards / "train" / "shard-00000.tokens", tokens)
    values = np.load(labels)
    values[3] = 10  # the manifest names classes 0..9
    np.save(labels, values)
    codes, out = launch(config, log_dir=work / "bad_tokens_logs")
    assert codes == [2, 2], out[-3000:]
    [line] = error_lines(out)
    assert f"{labels}: row 3 has label 10, outside the manifest's 10 classes" in line


def test_non_finite_features_are_an_error_before_any_fit_not_a_lower_accuracy(work):
    """accord-net#803: NaN in a train part ended in `ValueError: cannot convert float NaN to integer`; NaN in 64 of
    360 test rows gave 39.17% instead of 45.00%, exit 0, `complete: true`, no warning."""

    def nan_rows(split: str, x: np.ndarray) -> np.ndarray:
        if split == "test":
            x[::5][:64] = np.nan  # 64 rows spread over both ranks' shares
        return x

    features = synthetic_features(work / "nan_test", {"train": 240, "val": 120, "test": 360}, transform=nan_rows)
    result = run_entry("linear_probe", "--features", str(features), "--pixels=false", nprocs=2)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{features / 'test'}: 64 of 360 rows hold non-finite features (layer 0)" in result.stderr
    assert not (features / "probe" / "probe.json").exists()  # no result reported, complete or not

    inf_train = lambda split, x: np.where(np.arange(len(x))[:, None] == 7, np.inf, x) if split == "train" else x
    features = synthetic_features(work / "inf_train", {"train": 240, "val": 120, "test": 120}, transform=inf_train)
    result = run_entry("linear_probe", "--features", str(features))
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{features / 'train'}: 1 of 240 rows hold non-finite features (layer 0)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_checkpoint_that_gives_non_finite_features_is_refused_at_extraction(work, shards):
    """A checkpoint of a run that diverged (or bf16 overflowing) gives NaN features: refused at extraction, naming
    the split and image, before any part of them is kept."""
    cfg = ModelConfig(size="igpt-tiny", n_px=8, n_vocab=ShardSplit(shards, "train").n_vocab)
    state = IGPT(cfg, seed=0).state_dict()
    state["h.1.mlp.c_fc.weight"][0, 0] = float("nan")
    ckpt = save_consolidated(work / "nan_weights", cfg, state, ShardSplit(shards, "train").palette)
    out = work / "nan_features"
    result = run_entry("extract_features", "--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(out))
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(rf"{re.escape(str(out / 'train'))}: the model gives non-finite features for image \d+",
                     result.stderr)  # fmt: skip
    assert not (out / "train" / "index.json").exists() and "Traceback" not in result.stderr


@pytest.mark.parametrize("job", ["extract_features", "sample", "linear_probe", "build_shards"])
def test_every_entry_point_refuses_an_unwritable_output_in_one_line_before_its_work(work, shards, job):
    """The same kind of fault as the run folder's, at each entry point that writes: a file where the output folder
    belongs."""
    blocker = work / f"file_{job}"
    blocker.write_text("not a folder")
    out = blocker / "out"
    ckpt = work / "any_weights"
    if not ckpt.exists():
        cfg = ModelConfig(size="igpt-tiny", n_px=8, n_vocab=ShardSplit(shards, "train").n_vocab)
        save_consolidated(ckpt, cfg, IGPT(cfg, seed=0).state_dict(), ShardSplit(shards, "train").palette)
    if job == "build_shards":
        cmd = [sys.executable, "-m", "data_tools.build_shards", "digits", "--out", str(out), "--n-px", "8"]
        result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        line = f"cannot write --out {out} (Not a directory)"
    elif job == "linear_probe":
        features = synthetic_features(work / "probe_features", {"train": 40, "val": 20, "test": 20})
        result = run_entry(job, "--features", str(features), "--out", str(out))
        line = f"cannot write --out={out} (Not a directory)"
    else:
        result = run_entry(job, "--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(out))
        line = f"cannot write --out={out} (Not a directory)"
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert line in result.stderr and "Traceback" not in result.stderr


def test_cpu_ranks_split_the_cores_when_nothing_sets_omp_threads(monkeypatch):
    """The deepspeed launcher leaves OMP_NUM_THREADS unset and each rank started one thread per core (20% slower on
    2 CPU ranks, bench/results/cpu_threads.md); a value the user or launcher set is kept."""
    import torch

    from igpt_ds.distributed.process_group import cpu_threads

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        for key in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                    "SLURM_NTASKS_PER_NODE"):  # fmt: skip
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher: 2 ranks on this node
        assert cpu_threads() == max(1, cores // 2) == torch.get_num_threads()
        assert os.environ["OMP_NUM_THREADS"] == str(max(1, cores // 2))
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert cpu_threads() is None  # set by the user: kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("LOCAL_SIZE")
        monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1(x4)")
        assert cpu_threads() is None  # one rank a node: torch's default stands
    finally:
        torch.set_num_threads(before)


def test_a_resume_with_another_global_and_micro_batch_continues_the_data_position(work, shards):
    """Item 10: a resume with another train.global_batch / train.micro_batch works; the data position is counted in
    images, so the resumed run starts at the first image the checkpoint had not consumed."""
    config = config_for(work, shards, "rebatch", ds_config="ds_configs/cpu.json", max_steps=5, save_every=5,
                        eval_every=0)  # fmt: skip
    root = work / "rebatch" / "run" / "checkpoints"
    codes, out = launch(config, log_dir=work / "rebatch_logs")
    assert codes == [0, 0], out[-3000:]
    assert ds_checkpoint.read_meta(root / "step_00000005")["sampler"]["consumed"] == 5 * 16
    codes, out = launch(config, "--train.max_steps=10", "--train.global_batch=32", "--train.micro_batch=8",
                        log_dir=work / "rebatch_logs")  # fmt: skip
    assert codes == [0, 0], out[-3000:]
    assert "at step 5" in out and "step 10/10" in out
    assert ds_checkpoint.read_meta(root / "step_00000010")["sampler"]["consumed"] == 5 * 16 + 5 * 32
