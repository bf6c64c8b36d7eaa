"""Pretraining through the real DeepSpeed engine: 2 CPU ranks on gloo, a tiny model on digits shards.

Runs (each a few seconds of training): ZeRO-3 for 10 steps through the `deepspeed` launcher;
pipeline (2 stages, ZeRO-1) for 10 steps; ZeRO-3 compiled with fused AdamW; BERT on both layouts;
ZeRO-3 stopped at step 5 and resumed; the step-5 checkpoint resumed on 1 rank through the
universal format; a save killed with SIGKILL; a SIGTERM. All runs start from the same consolidated
initial weights (train.init_from).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_support import (
    REPO,
    digits_shards,
    env,
    free_port,
    losses,
    run_ranks,
    scalars,
    start_ranks,
    worker_of,
    write_config,
)

from igpt_ds.checkpoint import ds_checkpoint, export
from igpt_ds.checkpoint.weights import save_consolidated
from igpt_ds.config import ModelConfig
from igpt_ds.models.igpt import IGPT

pytestmark = pytest.mark.multiproc

# Same weights, same batches, different reduction orders (ZeRO-3 reduce-scatter over 2 ranks, pipeline
# stages, one process): fp32 losses agree to rounding. Measured: at most 6e-7 nats over 10 steps.
LAYOUT_ATOL = 1e-5


# The live probe at steps 0, 5 and 10 on 400 train and 200 validation digits, layers 0-2 (2 = final norm).
LIVE_PROBE = ("--train.probe_every", "5", "--train.probe_at_start", "true", "--train.probe_images", "400",
              "--train.probe_val_images", "200")  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pretrain")


@pytest.fixture(scope="module")
def shards(work) -> Path:
    return digits_shards(work / "shards")


@pytest.fixture(scope="module")
def n_vocab(shards) -> int:
    from igpt_ds.data.shards import ShardSplit

    return ShardSplit(shards, "train").n_vocab


@pytest.fixture(scope="module")
def init(work, n_vocab) -> Path:
    torch.manual_seed(123)
    cfg = ModelConfig(size="igpt-tiny", n_px=8, n_vocab=n_vocab)
    return save_consolidated(work / "init", cfg, IGPT(cfg).state_dict())


@pytest.fixture(scope="module")
def config(work, shards, n_vocab, init) -> Path:
    return write_config(work / "tiny.yaml", shards, work / "runs", n_vocab, init_from=str(init))


def logs(work: Path, name: str) -> Path:
    path = work / "logs" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def zero3_run(work, config) -> Path:
    """10 steps of ZeRO-3 on 2 ranks, started by the real launcher: `deepspeed --num_gpus 2 launcher/pretrain.py`."""
    deepspeed = Path(sys.executable).parent / "deepspeed"  # the virtualenv's launcher script
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "launcher/pretrain.py"]
    cmd += ["--config", str(config), "--train.name", "zero3", *LIVE_PROBE]
    out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return work / "runs" / "zero3"


@pytest.fixture(scope="module")
def pipe_run(work, config) -> Path:
    run_ranks(
        config,
        "--train.name",
        "pipe",
        "--train.layout",
        "pipeline",
        "--train.pipeline_stages",
        "2",
        "--train.ds_config",
        "ds_configs/cpu.json",
        "--train.activation_checkpointing",
        "true",
        *LIVE_PROBE,
        log_dir=logs(work, "pipe"),
    )
    return work / "runs" / "pipe"


@pytest.fixture(scope="module")
def compiled_run(work, config) -> Path:
    """ZeRO-3 on 2 ranks with the speed levers on: torch.compile through engine.compile(), fused AdamW."""
    overrides = ("--train.name", "compiled", "--train.compile", "true", "--optim.fused", "true")
    run_ranks(config, *overrides, log_dir=logs(work, "compiled"))
    return work / "runs" / "compiled"


def bert_run(work: Path, config: Path, name: str, *overrides: str) -> Path:
    common = ("--model.objective", "bert", "--train.max_steps", "4", "--train.eval_every", "2")
    run_ranks(config, "--train.name", name, *common, *overrides, log_dir=logs(work, name))
    return work / "runs" / name


def reference_losses(config: Path, steps: int) -> list[float]:
    """The same training in one process with plain PyTorch: no DeepSpeed at all."""
    from igpt_ds.checkpoint.weights import load_consolidated
    from igpt_ds.config import PretrainConfig, load_config
    from igpt_ds.data.sampler import GlobalBatchSampler
    from igpt_ds.data.shards import ShardSplit
    from igpt_ds.train.engine import lr_at

    cfg = load_config(PretrainConfig, config)
    model = IGPT(cfg.model)
    model.load_state_dict(load_consolidated(cfg.train.init_from)[1])
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg.optim, cfg.train.max_steps) / cfg.optim.lr)
    train = ShardSplit(cfg.data.shards, "train")
    sampler = GlobalBatchSampler(len(train), cfg.train.global_batch, 0, 1, cfg.train.seed)
    out = []
    for _ in range(steps):
        micro = np.split(np.asarray(sampler.next_indices()), cfg.train.global_batch // cfg.train.micro_batch)
        total = 0.0
        for idx in micro:
            loss = model.loss(torch.from_numpy(train.batch(idx)[0]))
            (loss / len(micro)).backward()
            total += loss.item() / len(micro)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad()
        sched.step()
        out.append(total)
    return out


def test_live_probe_in_zero3_and_pipeline_runs(zero3_run, pipe_run):
    """Both layouts log the live probe (per layer, best layer and accuracy, the layer-curve image) at steps 0, 5
    and 10, leave live_probe.{json,png}, and agree at step 0, where both hold the same initial weights: the
    pipeline's stage-by-stage extraction and per-stage fits give ZeRO-3's numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {}
    for run in (zero3_run, pipe_run):
        logged = scalars(run / "tensorboard")
        for l in range(3):
            assert set(logged[f"probe/val_acc/layer_{l:02d}"]) == {0, 5, 10}, run
        assert set(logged["probe/best_val_acc"]) == {0, 5, 10} and set(logged["probe/best_layer"]) == {0, 5, 10}
        images = set()
        for events in (run / "tensorboard").glob("events.out.tfevents.*"):
            acc = EventAccumulator(str(events))
            acc.Reload()
            images |= set(acc.Tags()["images"])
        assert {"probe/acc_vs_layer", "probe/acc_vs_val_loss"} <= images, (run, images)
        report = json.loads((run / "live_probe.json").read_text())
        assert [h["step"] for h in report["history"]] == [0, 5, 10]
        assert report["train_images"] == 400 and report["val_images"] == 180 and report["classes"] == 10  # val: 180
        assert all(10.0 <= h["best_acc"] <= 100.0 for h in report["history"])
        assert 0 < report["overhead"]["share"] < 1 and (run / "live_probe.png").stat().st_size > 10_000
        runs[run.name] = report["history"]
    zero_acc, pipe_acc = runs["zero3"][0]["acc"], runs["pipe"][0]["acc"]
    assert all(abs(zero_acc[l] - pipe_acc[l]) <= 0.5 for l in zero_acc), (zero_acc, pipe_acc)  # <= 1 image


def test_zero3_and_pipeline_train_with_falling_loss(zero3_run, pipe_run):
    for run in (zero3_run, pipe_run):
        curve = losses(run)
        assert len(curve) == 10 and curve[0] == pytest.approx(math.log(512), abs=0.05)
        assert curve[-1] < curve[0] - 0.3, curve


def test_reference_zero3_and_pipeline_losses_agree(config, zero3_run, pipe_run, compiled_run):
    reference = reference_losses(config, 10)
    for run in (zero3_run, pipe_run, compiled_run):
        np.testing.assert_allclose(losses(run), reference, rtol=0, atol=LAYOUT_ATOL, err_msg=str(run))
    assert json.loads((compiled_run / "ds_config.json").read_text())["optimizer"]["params"]["fused"] is True


def test_bert_objective_sees_the_same_masks_on_both_layouts(work, config):
    """Masks keyed by sample, not by rank or batch: 2 data-parallel ranks and 2 pipeline stages (one
    data-parallel rank, which also builds the masked input on stage 0 and the labels on stage 1) train the
    same BERT steps and validate on the same masked pixels."""
    zero3 = bert_run(work, config, "bert_zero3")
    pipe = bert_run(
        work, config, "bert_pipe", "--train.layout", "pipeline", "--train.pipeline_stages", "2",
        "--train.ds_config", "ds_configs/cpu.json",
    )  # fmt: skip
    assert losses(zero3)[0] < math.log(512) + 0.1  # the BERT loss starts near ln(vocabulary)
    np.testing.assert_allclose(losses(pipe), losses(zero3), rtol=0, atol=LAYOUT_ATOL)
    val = [scalars(run / "tensorboard")["val/loss"] for run in (zero3, pipe)]
    assert sorted(val[0]) == [2, 4] and val[0][4] == pytest.approx(val[1][4], abs=LAYOUT_ATOL)


def test_tensorboard_holds_the_scalars(zero3_run):
    tags = scalars(zero3_run / "tensorboard")
    expected = {
        "train/loss",
        "train/bits_per_pixel",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/samples_per_s",
        "perf/step_time_s",
        "memory/max_rss_gib",
        "val/loss",
        "val/bits_per_pixel",
    }
    assert expected <= set(tags)
    assert sorted(tags["train/loss"]) == list(range(1, 11))
    assert sorted(tags["val/loss"]) == [0, 5, 10]  # 0: the live probe's first point is scored at initialisation
    loss, bpp = tags["train/loss"][3], tags["train/bits_per_pixel"][3]
    assert bpp == pytest.approx(loss / math.log(2), rel=1e-6)
    for name in ("config.yaml", "ds_config.json", "git_rev.txt"):
        assert (zero3_run / name).is_file()


@pytest.fixture(scope="module")
def stopped_at_5(work, config) -> Path:
    """A 2-rank run stopped (and checkpointed) at step 5 of 10; a pristine copy sits in runs_at_5/."""
    run_ranks(config, "--train.name", "resumed", "--train.stop_at", "5", log_dir=logs(work, "resume"))
    run = work / "runs" / "resumed"
    assert ds_checkpoint.latest(run / "checkpoints").name == "step_00000005"
    shutil.copytree(run, work / "runs_at_5" / "resumed")
    return run


def test_stop_and_resume_equals_straight_run(work, config, zero3_run, stopped_at_5):
    run = stopped_at_5
    out = run_ranks(config, "--train.name", "resumed", log_dir=logs(work, "resume"))
    assert "resumed from" in out and "at step 5" in out
    assert losses(run) == losses(zero3_run)  # fp32 on CPU: bit for bit
    a, b = (export.load_model_for_eval(r)[0].state_dict() for r in (run, zero3_run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_two_ranks_on_one_through_universal_checkpoint(work, config, zero3_run, stopped_at_5):
    out = run_ranks(
        config,
        "--train.name",
        "resumed",
        "--train.run_root",
        str(work / "runs_at_5"),
        nprocs=1,
        log_dir=logs(work, "universal"),
    )
    assert "(universal checkpoint)" in out
    # Same data in the same order (the sampler position is world-size independent); one rank sums
    # the batch in another order than two, so equal to rounding, not bit for bit.
    np.testing.assert_allclose(losses(work / "runs_at_5" / "resumed")[5:], losses(zero3_run)[5:], atol=LAYOUT_ATOL)


def test_rank_killed_during_save_leaves_the_previous_checkpoint(work, config):
    """SIGKILL rank 1 while a checkpoint is being written: rank 0 fails on its own (no hang), the
    half-written checkpoint is never picked, and the rerun resumes from the one before it."""
    root = work / "runs" / "killed" / "checkpoints"
    args = ["--train.name", "killed", "--train.save_every", "1", "--train.max_steps", "200", "--train.eval_every", "0"]
    procs = start_ranks(config, *args, "--train.dist_timeout_s", "30", log_dir=logs(work, "killed"))
    rank1 = worker_of(procs[1].pid)
    caught = None
    deadline = time.time() + 300
    while caught is None and time.time() < deadline and all(p.poll() is None for p in procs):
        done = ds_checkpoint.latest(root) if root.is_dir() else None
        partial = [p for p in root.glob("step_*") if not (p / ds_checkpoint.COMPLETE).exists()] if done else []
        if partial and any(partial[0].iterdir()):  # DeepSpeed is writing into it
            rank1.kill()  # the process that trains (igpt_ds.distributed.supervisor), not its supervisor
            caught = partial[0]
        time.sleep(0.001)
    assert caught is not None, "no save in progress was caught"
    try:
        assert procs[0].wait(timeout=90) != 0  # the survivor errors out instead of hanging
    finally:
        for p in procs:
            p.kill()
            p.wait()
    previous = ds_checkpoint.latest(root)
    assert previous is not None and previous.name < caught.name
    assert not (caught / ds_checkpoint.COMPLETE).exists()
    step = int(previous.name[5:])
    out = run_ranks(config, *args, "--train.stop_at", str(step + 1), log_dir=logs(work, "killed"))
    assert f"resumed from {previous} at step {step}" in out
    assert ds_checkpoint.latest(root).name == caught.name and (caught / ds_checkpoint.COMPLETE).is_file()


def test_sigterm_saves_and_stops(work, config):
    log = logs(work, "sigterm")
    procs = start_ranks(
        config,
        "--train.name",
        "term",
        "--train.max_steps",
        "500",
        "--train.save_every",
        "1000",
        "--train.eval_every",
        "0",
        log_dir=log,
    )
    deadline = time.time() + 300
    while "step 3/500" not in (log / "rank0.log").read_text() and time.time() < deadline:
        time.sleep(0.05)
    for p in procs:
        os.kill(p.pid, signal.SIGTERM)
    # 128 + SIGTERM: stopped with a checkpoint, not finished
    assert [p.wait(timeout=120) for p in procs] == [143, 143], (log / "rank0.log").read_text()[-3000:]
    saved = ds_checkpoint.latest(work / "runs" / "term" / "checkpoints")
    assert saved is not None and 3 <= int(saved.name[5:]) < 500
    assert f"stopped at step {int(saved.name[5:])} on SIGTERM" in (log / "rank0.log").read_text()


def test_export_and_load_for_eval_from_both_layouts(work, zero3_run, pipe_run):
    from igpt_ds.data.shards import ShardSplit

    val = ShardSplit(work / "shards", "val")
    tokens = torch.from_numpy(val.batch(np.arange(16))[0])  # what the runs validated on (1 batch, no shuffle)
    for run in (zero3_run, pipe_run):
        out = export.export_consolidated(run, work / "export" / run.name)
        for source in (run, ds_checkpoint.latest(run / "checkpoints"), out):
            model, cfg, palette = export.load_model_for_eval(source)
            assert not model.training and cfg.n_layer == 2 and palette is not None
            with torch.no_grad():
                loss = model.loss(tokens).item()
            assert loss == pytest.approx(scalars(run / "tensorboard")["val/loss"][10], abs=1e-5)


def test_bf16_pipeline_exports_fp32_masters_and_resumes_on_one_stage(work, config):
    """bf16 pipeline (the GPU recipe, here on CPU): export reads the fp32 masters from the ZeRO-1 shards
    (through the universal form), not the bf16 layer files; 2 stages resume as 1 stage on 1 rank."""
    policy = work / "cpu_pipeline_bf16.json"
    policy.write_text(
        '{"zero_optimization": {"stage": 1}, "bf16": {"enabled": true}, "data_types": {"grad_accum_dtype": "fp32"}}'
    )
    args = ["--train.name", "bf16pipe", "--train.layout", "pipeline", "--train.ds_config", str(policy)]
    args += ["--train.max_steps", "4", "--train.eval_every", "0"]
    run_ranks(config, *args, "--train.pipeline_stages", "2", "--train.stop_at", "2", log_dir=logs(work, "bf16"))
    ckpt = ds_checkpoint.latest(work / "runs" / "bf16pipe" / "checkpoints")
    exported = export.consolidated_state_dict(ckpt)
    bf16 = torch.load(ckpt / "layer_01-model_states.pt")["attn.c_attn.weight"]
    master = exported["h.0.attn.c_attn.weight"]
    assert bf16.dtype == torch.bfloat16 and master.dtype == torch.float32
    assert not torch.equal(master, bf16.float()) and torch.equal(master.bfloat16(), bf16)
    out = run_ranks(config, *args, "--train.pipeline_stages", "1", nprocs=1, log_dir=logs(work, "bf16"))
    assert "at step 2 (universal checkpoint)" in out and "step 4/4" in out
