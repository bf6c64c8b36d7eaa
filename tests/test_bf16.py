"""Mixed precision on the CPU: every entry point through a bf16 DeepSpeed engine, against the same run in fp32.

DeepSpeed's CPU accelerator trains in bf16 (`get_accelerator().is_bf16_supported()`), so what a GPU run does with
dtypes — parameters cast to bf16 but buffers not, fp32 master weights, heads and losses cast to fp32 — runs here:
pretraining under ZeRO-0/1/2/3 and the pipeline layout, AR and BERT; fine-tuning under ZeRO-1 and ZeRO-3 with and
without standardised features; feature extraction and sampling from bf16-trained checkpoints. In-process, one rank,
a handful of steps each.

Tolerances, measured then about doubled (`python -m pytest tests/test_bf16.py`; one run on 2 CPU cores): from the
same initial weights and batches, bf16's training loss stays within 0.01 nats/pixel of fp32's at each of 6 steps
(largest difference measured 0.0017, ZeRO-0 to 3 and the pipeline, AR and BERT); fine-tuning's losses within 0.025
nats (measured 0.0005 L_CLF, 0.0112 L_GEN, whose random test head has large logits) and validation accuracy within
10 points (measured 1.6: one image of 64).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_support import separable_shards, tiny_checkpoint
from pretrain_support import digits_shards, in_process_rank, scalars, write_config

from igpt_ds.config import PretrainConfig, load_config

PRETRAIN_TOLERANCE = 0.01  # nats/pixel
FINETUNE_TOLERANCE = 0.025  # nats


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bf16")


@pytest.fixture(scope="module")
def rank():
    with in_process_rank():
        yield


@pytest.fixture(scope="module")
def shards(work) -> Path:
    return digits_shards(work / "shards")


def policy(work: Path, stage: int, bf16: bool, pipeline: bool = False) -> Path:
    """A DeepSpeed JSON: ZeRO `stage`, bf16 or fp32 (the pipeline's bf16 accumulates gradients in fp32, as
    ds_configs/pipeline_zero1_bf16.json does)."""
    cfg = {"bf16": {"enabled": bf16}, "zero_optimization": {"stage": stage}}
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even these tiny layers
    if pipeline and bf16:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    path = work / f"policy_{stage}_{'bf16' if bf16 else 'fp32'}{'_pipe' if pipeline else ''}.json"
    path.write_text(json.dumps(cfg))
    return path


LAYOUTS = {"zero0": (0, False), "zero1": (1, False), "zero2": (2, False), "zero3": (3, False), "pipeline": (1, True)}


def pretrain(work: Path, shards: Path, layout: str, objective: str, bf16: bool) -> tuple[Path, list[float]]:
    """A 6-step run (warmup 2, lr 3e-3) from seed 0; (run folder, training loss at every step)."""
    from igpt_ds.data.shards import ShardSplit
    from igpt_ds.train.pretrain import train

    stage, pipeline = LAYOUTS[layout]
    name = f"{layout}_{objective}_{'bf16' if bf16 else 'fp32'}"
    config = write_config(work / f"{name}.yaml", shards, work / "runs", ShardSplit(shards, "train").n_vocab)
    overrides = [f"--train.name={name}", f"--train.ds_config={policy(work, stage, bf16, pipeline)}",
                 f"--model.objective={objective}", "--train.max_steps=6", "--train.log_every=1",
                 "--train.eval_every=6", "--train.save_every=6"]  # fmt: skip
    if pipeline:
        overrides.append("--train.layout=pipeline")
    train(load_config(PretrainConfig, config, overrides))
    run = work / "runs" / name
    train_loss = scalars(run / "tensorboard")["train/loss"]
    return run, [train_loss[s] for s in sorted(train_loss)]


@pytest.mark.parametrize("objective", ["ar", "bert"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pretraining_in_bf16_follows_fp32(layout, objective, work, shards, rank):
    run, bf16 = pretrain(work, shards, layout, objective, bf16=True)
    _, fp32 = pretrain(work, shards, layout, objective, bf16=False)
    engine = json.loads((run / "ds_config.json").read_text())
    assert engine["bf16"]["enabled"] is True
    assert len(bf16) == len(fp32) == 6 and all(np.isfinite(bf16))
    assert max(abs(a - b) for a, b in zip(bf16, fp32, strict=True)) <= PRETRAIN_TOLERANCE, (bf16, fp32)
    assert bf16[-1] < bf16[0]  # it learns


@pytest.mark.parametrize("standardize", [False, True], ids=["raw-features", "standardised"])
@pytest.mark.parametrize("stage", [1, 3])
def test_fine_tuning_in_bf16_follows_fp32(stage, standardize, work, rank):
    """The head reads bf16 pooled features standardised in fp32 (fp32 buffers under ZeRO 0-2; zero.Init would have
    made them bf16 under ZeRO-3): bf16 fine-tuning once crashed here with 'expected m1 and m2 to have the same
    dtype'."""
    from igpt_ds.train.finetune import FinetuneConfig, Finetuner

    data = work / "separable"
    if not data.exists():
        separable_shards(data)
        tiny_checkpoint(work / "pretrained", n_vocab=8)
    results = {}
    for bf16 in (True, False):
        name = f"ft_{stage}_{standardize}_{bf16}"
        cfg = load_config(FinetuneConfig, None, [
            f"--train.init_from={work / 'pretrained'}", f"--data.shards={data}", f"--train.run_root={work}",
            f"--train.name={name}", f"--train.ds_config={policy(work, stage, bf16)}", "--train.global_batch=16",
            "--train.micro_batch=8", "--train.max_steps=6", "--train.log_every=1", "--train.eval_every=6",
            "--optim.lr=1e-3", "--optim.warmup_steps=1", f"--finetune.standardize_features={standardize}",
            "--finetune.stats_images=64", "--finetune.head_lr_mult=10"])  # fmt: skip
        tuner = Finetuner(cfg)
        module = tuner.engine.module
        assert module.clf_head.weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert module.feat_mean.dtype == module.feat_std.dtype == torch.float32  # the statistics keep fp32
        if standardize:
            assert torch.equal(module.feat_mean.cpu().double(), torch.tensor(tuner.state["feat_stats"][0]).double())
        tuner.run()
        results[bf16] = scalars(work / name / "tensorboard")
    bf16, fp32 = results[True], results[False]
    for tag in ("train/clf_loss", "train/gen_loss", "val/clf_loss", "val/gen_loss"):
        assert np.isfinite(list(bf16[tag].values())).all(), tag
        assert max(abs(bf16[tag][s] - fp32[tag][s]) for s in fp32[tag]) <= FINETUNE_TOLERANCE, (
            tag,
            bf16[tag],
            fp32[tag],
        )
    assert abs(bf16["val/acc"][6] - fp32["val/acc"][6]) <= 10.0


@pytest.mark.parametrize("layout", ["zero1", "zero3", "pipeline"])
def test_features_and_samples_from_a_bf16_run(layout, work, shards, rank):
    """A bf16 checkpoint's fp32 master weights are what evaluation loads (ZeRO's fp32 partitions; the pipeline's
    through the universal form): features and samples come out finite, and equal to those of the same weights
    exported and loaded as a consolidated folder."""
    from igpt_ds.checkpoint import export
    from igpt_ds.eval.features import ExtractConfig, extract
    from igpt_ds.eval.sampling import SampleConfig, sample

    run = work / "runs" / f"{layout}_ar_bf16"
    if not run.exists():
        pretrain(work, shards, layout, "ar", bf16=True)
    out = work / f"eval_{layout}"
    extract(ExtractConfig(checkpoint=str(run), shards=str(shards), splits=["val"], out=str(out / "features"),
                          batch_size=32))  # fmt: skip
    feats = np.concatenate([np.load(f) for f in sorted((out / "features" / "val").glob("parts/*/features.npy"))], 1)
    assert feats.shape[0] == 3 and np.isfinite(feats).all() and feats.std() > 0
    model, _, _ = export.load_model_for_eval(run)
    exported = export.export_consolidated(run, out / "weights")
    again, _, _ = export.load_model_for_eval(exported)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    paths = sample(SampleConfig(checkpoint=str(run), shards=str(shards), n_images=2, n_completions=2,
                                n_unconditional=2, out=str(out / "samples")))  # fmt: skip
    tokens = np.load(paths["tokens"])
    assert tokens["completions"].shape == (4, 64) and tokens["unconditional"].shape == (2, 64)
