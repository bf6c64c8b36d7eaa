"""Resuming is decided once, by rank 0, and refused in one line when the checkpoint no longer fits the run.

A rank that sees no checkpoint (a stale listing) still resumes with the others; ranks that parsed different
configurations stop before training; a checkpoint whose shards, seed, palette, model or engine policy changed
is a one-line error before the engine starts (or, for new data, resumes with `train.reset_data_position`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_support import check, run_entry
from pretrain_support import REPO, digits_shards, env, run_ranks, scalars, write_config
from sklearn.datasets import load_digits
from test_distributed import run_program

from data_tools.build_shards import main as build_shards
from igpt_ds.checkpoint import ds_checkpoint, resume
from igpt_ds.config import ConfigError, DataConfig, ModelConfig
from igpt_ds.data.shards import ShardSplit

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def shards(work) -> Path:
    return digits_shards(work / "shards")


@pytest.fixture(scope="module")
def stopped(work, shards) -> tuple[Path, Path]:
    """(config, run folder) of a 2-rank ZeRO-3 run checkpointed at step 4 of 10."""
    config = write_config(work / "c.yaml", shards, work / "runs", ShardSplit(shards, "train").n_vocab)
    logs = work / "logs"
    logs.mkdir()
    run_ranks(config, "--train.stop_at", "4", log_dir=logs)
    return config, work / "runs" / "run"


def test_a_rank_blind_to_the_checkpoint_resumes_with_the_others(work, stopped):
    config, run = stopped
    copy = work / "blind"
    shutil.copytree(run.parent, copy)
    results = run_program("pretrain_ranks", str(config), f"--train.run_root={copy} --train.stop_at=6", "", "1")
    for rank, result in enumerate(results):
        assert result.returncode == 0 and f"rank {rank} exit 0" in result.stdout, result.stdout[-3000:] + result.stderr
    assert "at step 4" in results[0].stdout  # "resumed from .../step_00000004 at step 4", rank 1 included
    assert ds_checkpoint.read_meta(ds_checkpoint.latest(copy / "run" / "checkpoints"))["step"] == 6


def test_ranks_with_different_configurations_stop_before_training(work, stopped):
    config, _ = stopped
    args = f"--train.run_root={work / 'differ'}"
    results = run_program("pretrain_ranks", str(config), args, "--train.max_steps=20", "0")
    for rank, result in enumerate(results):
        assert result.returncode == 2 and f"rank {rank} exit 2" in result.stdout, result.stderr[-3000:]
        assert "train.max_steps: 10 on rank 0, 20 on rank 1" in result.stderr
    assert not (work / "differ").exists()


def plan_for(run: Path, **changes):
    """resume.decide for `run` as the fixture's config would call it, with `changes` applied."""
    split = changes.pop("split", None) or ShardSplit(run.parent.parent / "shards", "train")
    args = dict(model=ModelConfig(size="igpt-tiny", n_px=8, n_vocab=split.n_vocab), layout="zero", world=2, dp=2,
                ds_config=json.loads((REPO / "ds_configs" / "cpu_zero3.json").read_text()),
                data=resume.data_identity(split, DataConfig()), seed=0, reset_data_position=False)  # fmt: skip
    args.update(changes)
    return resume.decide(run / "checkpoints", **args)


def test_the_plan_of_an_unchanged_run_and_of_another_topology(stopped):
    _, run = stopped
    plan = plan_for(run)
    assert plan.meta["step"] == 4 and not plan.universal and plan.meta["data"]["n"] == plan_for(run).meta["data"]["n"]
    assert plan_for(run, world=1, dp=1).universal  # another rank count: supported through the universal form
    assert plan_for(run, model=None).meta["step"] == 4  # fine-tuning takes the model from the checkpoint


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(seed=1), "train.seed=1, 0 then"),
        (dict(model=ModelConfig(size="igpt-tiny", n_px=8, n_layer=3)), "model.n_layer=2 then, 3 now"),
        (dict(layout="pipeline"), "train.layout=zero then, pipeline now"),
        (dict(ds_config={"zero_optimization": {"stage": 1}}), "ZeRO stage 3 then, 1 now"),
        (dict(ds_config={"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}), "precision fp32 then, bf16"),
    ],
)
def test_what_no_longer_fits_is_one_line_naming_it(stopped, change, message):
    _, run = stopped
    if "model" in change:
        change["model"].n_vocab = ShardSplit(run.parent.parent / "shards", "train").n_vocab
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        plan_for(run, **change)
    assert "\n" not in str(caught.value) and "step_00000004" in str(caught.value)


def test_rebuilt_shards_are_refused_then_continued_with_a_fresh_data_position(work, stopped):
    """The issue's case: shards rebuilt with more training images (same palette), the same command rerun."""
    config, run = stopped
    copy = work / "rebuilt"
    shutil.copytree(run.parent, copy)
    shards = digits_with_more_train(work, work / "shards" / "palette.npy")
    n = len(ShardSplit(shards, "train"))
    cmd = [sys.executable, "launcher/pretrain.py", "--config", str(config), f"--train.run_root={copy}",
           f"--data.shards={shards}", "--train.stop_at=5"]  # fmt: skip
    refused = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"the train split has {n:,} images, 1,257 then" in refused.stderr
    assert "--train.reset_data_position=true" in refused.stderr
    assert ds_checkpoint.read_meta(ds_checkpoint.latest(copy / "run" / "checkpoints"))["step"] == 4  # nothing ran
    resumed = subprocess.run([*cmd, "--train.reset_data_position=true"], cwd=REPO, env=env(), capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "at step 4 (universal checkpoint), data order started afresh" in resumed.stdout
    meta = ds_checkpoint.read_meta(ds_checkpoint.latest(copy / "run" / "checkpoints"))
    assert meta["step"] == 5 and meta["data"]["n"] == n and meta["sampler"]["n_samples"] == n


def test_another_palette_is_refused(work, stopped):
    """The same colours in another order: every token would mean another colour."""
    _, run = stopped
    reversed_palette = work / "reversed.npy"
    np.save(reversed_palette, np.load(work / "shards" / "palette.npy")[::-1].copy())
    split = ShardSplit(digits_with_more_train(work, reversed_palette, "reversed"), "train")
    with pytest.raises(ConfigError, match="another palette"):
        plan_for(run, split=split)


def digits_with_more_train(work: Path, palette: Path, name: str = "more") -> Path:
    """The digits as shards with 1,400 training images (the digits source holds 1,257), tokenised with
    `palette`."""
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    cut = {"train": slice(0, 1400), "val": slice(1400, 1550), "test": slice(1550, None)}
    arrays = {
        f"{k}_{kind}": data[c] for k, c in cut.items() for kind, data in (("images", images), ("labels", digits.target))
    }
    np.savez(work / f"{name}.npz", **arrays)
    out = work / f"shards_{name}"
    assert build_shards([str(work / f"{name}.npz"), "--out", str(out), "--n-px", "8", "--palette", str(palette),
                         "--workers", "1"]) == 0  # fmt: skip
    return out


def test_a_changed_learning_rate_and_betas_apply_from_the_restored_step(work, shards):
    """Lowering the LR after a loss spike is the usual intervention at scale: the resumed run steps at the new
    optim.lr and optim.betas, not at those the checkpoint's scheduler and optimizer state hold (one process,
    ZeRO-1, constant schedule)."""
    config = write_config(work / "lr.yaml", shards, work / "lr_runs", ShardSplit(shards, "train").n_vocab,
                          ds_config="ds_configs/cpu.json", max_steps=20, save_every=10, eval_every=0)  # fmt: skip
    args = ["--config", str(config), "--optim.schedule=constant", "--optim.warmup_steps=0"]
    check(run_entry("pretrain", *args, "--optim.lr=1e-3", "--train.stop_at=10"))
    check(run_entry("pretrain", *args, "--optim.lr=5e-4", "--optim.betas=[0.8,0.9]", "--train.stop_at=12"))
    lr = scalars(work / "lr_runs" / "run" / "tensorboard")["train/lr"]
    assert [lr[s] for s in (10, 11, 12)] == pytest.approx([1e-3, 5e-4, 5e-4])
    ckpt = work / "lr_runs" / "run" / "checkpoints" / "step_00000012"
    state = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    (group,) = state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert (group["lr"], tuple(group["betas"])) == (5e-4, (0.8, 0.9))
