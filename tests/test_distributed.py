"""Process-group start-up: Slurm variables, nodelists, mpirun."""

import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_support import REPO, digits_shards, env, free_port, write_config

from igpt_ds.config import ConfigError
from igpt_ds.data.shards import ShardSplit
from igpt_ds.distributed import process_group
from igpt_ds.distributed.rank_env import first_host, slurm_env


def test_slurm_env_derives_torch_variables():
    task = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "123456"}
    task["SLURM_JOB_NODELIST"] = "gpu[07-10]"
    derived = slurm_env(task)
    assert (derived["RANK"], derived["LOCAL_RANK"], derived["WORLD_SIZE"]) == ("5", "1", "8")
    assert derived["MASTER_ADDR"] == "gpu07"  # from scontrol when installed, else parsed
    assert derived["MASTER_PORT"] == slurm_env(dict(task, SLURM_PROCID="0"))["MASTER_PORT"]  # same on every task
    assert slurm_env(dict(task, MASTER_ADDR="head", MASTER_PORT="999"))["MASTER_ADDR"] == "head"


@pytest.mark.parametrize(
    "nodelist,first",
    [("node1", "node1"), ("gpu[03-05,9]", "gpu03"), ("gpu[3,5],cpu1", "gpu3"), ("a-b-1,c", "a-b-1")],
)
def test_first_host_of_a_nodelist(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "")  # the parser, not scontrol
    assert first_host(nodelist) == first


@pytest.mark.multiproc
def test_two_ranks_under_mpirun(tmp_path):
    shards = digits_shards(tmp_path / "shards")
    n_vocab = ShardSplit(shards, "train").n_vocab
    config = write_config(tmp_path / "c.yaml", shards, tmp_path / "runs", n_vocab, max_steps=2, eval_every=0)
    names = ["PYTHONPATH", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "MASTER_PORT"]
    mpirun = str(Path(sys.executable).with_name("mpirun"))  # PyPI's Open MPI, in the virtualenv
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", *(a for n in names for a in ("-x", n))]
    cmd += [sys.executable, "launcher/pretrain.py", "--config", str(config)]
    out = subprocess.run(
        cmd, cwd=REPO, env=env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 2/2" in out.stdout and (tmp_path / "runs" / "run" / "checkpoints" / "step_00000002").is_dir()


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "visible,local_ranks,devices",
    [(1, (5, 6), (0, 0)), (8, (0, 1), (0, 1)), (4, (4, 5), (0, 1))],
    ids=["one-device-per-task", "all-devices-visible", "a-socket-of-4-per-4-tasks"],
)
def test_each_rank_starts_on_its_own_visible_device(visible, local_ranks, devices):
    """DeepSpeed's start-up hands init_process_group `device_id=cuda:$LOCAL_RANK` (eager NCCL), so the device is
    chosen before it: tasks 5 and 6 of a node that see one device each (Slurm --gpus-per-task=1) both start on
    their cuda:0, where DeepSpeed 0.19 would have asked for cuda:5 and cuda:6; with every device visible, task r
    takes cuda:r."""
    results = run_program("device_binding", str(visible), local_ranks=local_ranks)
    for rank, (result, device) in enumerate(zip(results, devices, strict=True)):
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().splitlines()[-1] == (
            f"rank {rank} of 2: device_id cuda:{device}, bound [{device}], LOCAL_RANK {device}"
        )


def run_program(
    name: str, *args: str, nprocs: int = 2, timeout: float = 120, local_ranks: tuple[int, ...] | None = None
) -> list[subprocess.CompletedProcess]:
    """tests/rank_programs.py NAME ARGS as `nprocs` ranks (env://); every rank's completed process. `local_ranks`:
    each rank's LOCAL_RANK (default: its rank)."""
    port, sync = str(free_port()), str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "tests/rank_programs.py", name, *args],
            cwd=REPO,
            env=env(
                RANK=str(r),
                LOCAL_RANK=str(local_ranks[r] if local_ranks else r),
                WORLD_SIZE=str(nprocs),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                SYNC_PORT=sync,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(nprocs)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.multiproc
def test_rank0_work_longer_than_the_collective_timeout():
    """Rank 0 works 12 s under a 5 s collective timeout. A barrier times out (the fault this guards against);
    on_rank0 and the weight consolidation that uses it finish on both ranks."""
    naive = run_program("slow_then_barrier", "12", "5")
    assert any(r.returncode != 0 for r in naive), [r.stdout for r in naive]  # the timeout is real
    for result in run_program("slow_on_rank0", "12", "5"):
        assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "rank 0 finished", result.stderr[
            -2000:
        ]


@pytest.mark.multiproc
def test_slow_consolidation_does_not_time_out(tmp_path):
    ckpt = tmp_path / "step_00000003"
    ckpt.mkdir()
    (ckpt / "run.json").write_text('{"step": 3}')
    for result in run_program("slow_consolidation", str(tmp_path), "12", "5"):
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"loaded 2 layers from {ckpt.resolve()}" in result.stdout


@pytest.mark.multiproc
def test_a_config_error_on_rank0_reaches_every_rank():
    for result in run_program("config_error_on_rank0", "30"):
        assert (
            result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "ConfigError: rank 0 found a bad input"
        )


def test_device_index_of_each_binding():
    assert [process_group.device_index(r, 8) for r in range(8)] == list(range(8))  # every device visible
    assert {process_group.device_index(r, 1) for r in range(8)} == {0}  # one device per task
    assert [process_group.device_index(r, 4) for r in range(8)] == [0, 1, 2, 3] * 2  # a socket's 4 per 4 tasks
    with pytest.raises(ConfigError, match="no accelerator device is visible"):
        process_group.device_index(0, 0)


def test_two_ranks_on_one_gpu_are_refused():
    """Slurm's default block:cyclic distribution with --gpu-bind=closest deals tasks 0, 2, 4, 6 to one socket's 4 GPUs:
    LOCAL_RANK mod 4 would put two ranks on one GPU; the job stops at start-up, on every rank, naming them."""
    assert process_group.duplicate_devices([("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a")]) is None
    message = process_group.duplicate_devices([("n1", "GPU-a"), ("n1", "GPU-b"), ("n1", "GPU-a")])
    assert message.startswith("ranks 0 and 2 on n1 both use GPU GPU-a: give each task its own GPU")


def test_node_local_checkpoints_are_refused_when_tasks_share_a_local_rank(tmp_path, monkeypatch):
    import json

    from igpt_ds.config import OptimConfig, TrainConfig
    from igpt_ds.train.engine import build_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "checkpoint": {"use_node_local_storage": True}}))
    train = TrainConfig(ds_config=str(path))
    build_ds_config(train, OptimConfig(), 1)
    monkeypatch.setattr(process_group, "local_rank_rewritten", True)
    with pytest.raises(ConfigError, match="checkpoint.use_node_local_storage in .* with one GPU per task"):
        build_ds_config(train, OptimConfig(), 1)
