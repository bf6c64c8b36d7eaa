"""No host-device sync in a hot loop but the deliberate ones (igpt_ds.host_sync).

On the CPU nothing synchronises, so the recorder flags the calls that would on a GPU (`.item()`, `nonzero()`,
boolean-mask indexing, blocking copies to the device, ...) when igpt-ds's own code makes them inside a loop's
`hot()` region and outside `deliberate()`. Every loop runs a few real steps here, in-process on one rank:
pretraining (ZeRO-1, ZeRO-3 and the pipeline engine; AR and BERT), fine-tuning, sampling and feature extraction.
tests/gpu/test_gpu.py runs the same loops under CUDA's own sync debug mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from eval_support import separable_shards, tiny_checkpoint
from pretrain_support import digits_shards, in_process_rank, write_config

from igpt_ds import host_sync
from igpt_ds.config import ModelConfig, PretrainConfig, load_config
from igpt_ds.host_sync import SyncRecorder
from igpt_ds.models.igpt import IGPT
from igpt_ds.models.objectives import per_image_loss


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return digits_shards(tmp_path_factory.mktemp("sync") / "shards")


@pytest.fixture(scope="module")
def one_rank():
    """One process group for the module's in-process runs, as a launcher would leave it for DeepSpeed's engine."""
    with in_process_rank():
        yield


def checked(rec: SyncRecorder) -> None:
    assert rec.hot_entries > 0, "no hot() region was entered: nothing was checked"
    assert rec.ours() == [], "host-device syncs in a hot loop:\n" + rec.report()


def test_the_recorder_sees_what_would_sync_and_lets_deliberate_ones_pass():
    x = torch.arange(6.0)
    with SyncRecorder(cuda=False) as rec:
        x.item() if x.numel() == 1 else x.sum().item()  # outside hot(): not a concern
        with host_sync.hot():
            x[x > 2].sum()  # boolean mask: nonzero on the device
            x.to("cpu")  # a blocking copy
            with host_sync.deliberate():
                x.sum().item()
    assert sorted(r.op for r in rec.records) == ["__getitem__[bool mask]", "to(device, blocking)"]
    assert all(r.owner == "other" for r in rec.records)  # this file: not igpt-ds's code


def test_the_bert_loss_takes_no_sync():
    """OpenAI's per-image BERT loss, formerly computed with nonzero() and boolean indexing (a sync every BERT
    step and every pipeline step), now on fixed shapes; its value is unchanged (tests/test_model.py)."""
    logits, targets = torch.randn(4, 16, 8), torch.randint(0, 8, (4, 16))
    scored = torch.rand(4, 16) < 0.3
    scored[2] = False  # an image with nothing masked
    with SyncRecorder(cuda=False) as rec, host_sync.hot():
        loss = per_image_loss(logits, targets, scored)
    checked(rec)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    by_hand = [ce[i][scored[i]].mean() for i in range(4) if scored[i].any()]
    torch.testing.assert_close(loss, torch.stack(by_hand).mean())


PRETRAIN = {
    "zero1-ar": ["--train.ds_config=ds_configs/cpu.json"],
    "zero1-bert": ["--train.ds_config=ds_configs/cpu.json", "--model.objective=bert"],
    "zero3-bert": ["--train.ds_config=ds_configs/cpu_zero3.json", "--model.objective=bert"],
    "pipeline-bert": ["--train.ds_config=ds_configs/cpu.json", "--train.layout=pipeline", "--model.objective=bert"],
    "pipeline-ar": ["--train.ds_config=ds_configs/cpu.json", "--train.layout=pipeline"],
}


@pytest.mark.parametrize("layout", PRETRAIN)
def test_pretraining_steps(layout, shards, tmp_path, one_rank):
    """A few steps with a log line, validation, a stop check and a checkpoint in the loop."""
    from igpt_ds.data.shards import ShardSplit
    from igpt_ds.train.pretrain import train

    config = write_config(tmp_path / "c.yaml", shards, tmp_path / "runs", ShardSplit(shards, "train").n_vocab)
    overrides = ["--train.max_steps=4", "--train.log_every=2", "--train.eval_every=2", "--train.save_every=2",
                 "--train.stop_check_every=2", *PRETRAIN[layout]]  # fmt: skip
    cfg = load_config(PretrainConfig, config, overrides)
    with SyncRecorder(cuda=False) as rec:
        train(cfg)
    checked(rec)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_fine_tuning_steps(objective, tmp_path, one_rank):
    """Steps with augmentation, logging, validation and test on a new best, and checkpoints."""
    from igpt_ds.checkpoint.weights import save_consolidated
    from igpt_ds.config import load_config as load
    from igpt_ds.train.finetune import FinetuneConfig, finetune

    data = separable_shards(tmp_path / "shards")
    pretrained = tmp_path / "pretrained"
    if objective == "ar":
        tiny_checkpoint(pretrained, n_vocab=8)
    else:
        cfg = ModelConfig(size="igpt-tiny", n_px=8, n_vocab=8, objective="bert")
        save_consolidated(pretrained, cfg, IGPT(cfg, seed=0).state_dict())
    cfg = load(FinetuneConfig, None, [f"--train.init_from={pretrained}", f"--data.shards={data}",
               f"--train.run_root={tmp_path}", "--train.ds_config=ds_configs/cpu.json", "--train.global_batch=16",
               "--train.micro_batch=8", "--train.max_steps=4", "--train.log_every=2", "--train.eval_every=2",
               "--finetune.shift=1", "--finetune.standardize_features=true", "--finetune.stats_images=32"])  # fmt: skip
    with SyncRecorder(cuda=False) as rec:
        finetune(cfg)
    checked(rec)


def test_sampling_with_the_cache():
    from igpt_ds.eval.sampling import sample_images

    torch.manual_seed(0)
    model = IGPT(ModelConfig(size="igpt-tiny", n_px=4, n_vocab=16)).eval()
    torch.nn.init.normal_(model.lm_head.weight)
    with SyncRecorder(cuda=False) as rec:
        tokens = sample_images(model, range(3), seed=0, batch_size=2, top_k=4)
    checked(rec)
    assert tokens.shape == (3, 16)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_feature_extraction(objective, shards, tmp_path):
    from igpt_ds.data.shards import ShardSplit
    from igpt_ds.eval.feature_store import prepare_split, split_plan
    from igpt_ds.eval.features import extract_parts

    split = ShardSplit(shards, "val")
    model = IGPT(ModelConfig(size="igpt-tiny", n_px=8, n_vocab=split.n_vocab, objective=objective), seed=0).eval()
    plan = split_plan(split, [0, 2], 32, 16, {"test": objective})
    prepare_split(tmp_path / "val", plan)
    with SyncRecorder(cuda=False) as rec:
        written = extract_parts(model, split, tmp_path / "val", plan, progress=False, bert_masks=2)
    checked(rec)
    assert written >= 1
    features = [np.load(f) for f in sorted((tmp_path / "val").glob("parts/*/features.npy"))]
    assert len(features) == written and all(np.isfinite(f).all() and f.any() for f in features)
