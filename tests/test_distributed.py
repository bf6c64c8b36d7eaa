"""Process-group start-up: Slurm variables, nodelists, mpirun."""

import os
import subprocess
import sys

import pytest
from pretrain_support import REPO, digits_shards, env, free_port, write_config

from igpt_ds import distributed
from igpt_ds.distributed import first_host, slurm_env
from igpt_ds.shards import ShardSplit


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
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", *(a for n in names for a in ("-x", n))]
    cmd += [sys.executable, "launcher/pretrain.py", "--config", str(config)]
    out = subprocess.run(
        cmd, cwd=REPO, env=env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 2/2" in out.stdout and (tmp_path / "runs" / "run" / "checkpoints" / "step_00000002").is_dir()


class OneDeviceAccelerator:
    """What a task sees when the scheduler binds it one GPU: a CUDA accelerator with one device."""

    def __init__(self):
        self.bound: list[int] = []

    def device_name(self, index=None):
        return "cuda"

    def device_count(self):
        return 1

    def set_device(self, index):
        self.bound.append(index)


def test_a_task_bound_to_one_device_uses_it_whatever_its_local_rank(one_rank_group, monkeypatch):
    accelerator = OneDeviceAccelerator()
    monkeypatch.setattr(distributed, "get_accelerator", lambda: accelerator)
    monkeypatch.setenv("LOCAL_RANK", "3")  # the 4th task of its node (SLURM_LOCALID=3)
    assert distributed.init_distributed(60) == (0, 1)
    assert accelerator.bound == [0] and os.environ["LOCAL_RANK"] == "0"  # DeepSpeed's engine reads LOCAL_RANK
