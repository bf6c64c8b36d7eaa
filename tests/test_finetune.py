"""Fine-tuning: token augmentation, the classifier's parameter names, config checks, a real 2-rank ZeRO-3
run on a separable dataset that stops midway, resumes on 1 rank and reaches >= 95% test accuracy, and a
2-rank run stopped by SIGTERM that saves, exits 143 and resumes from the step it saved."""

import json
import os
import signal
import time

import pytest
import torch
from eval_support import check, run_entry, separable_shards, tiny_checkpoint
from pretrain_support import run_ranks, scalars, start_ranks

from igpt_ds.checkpoint import ds_checkpoint, export
from igpt_ds.config import ConfigError, ModelConfig, TrainConfig
from igpt_ds.models.igpt import IGPT
from igpt_ds.train.finetune import FinetuneConfig, FinetuneSection, IGPTClassifier, augment


def test_augment_flip_and_shift():
    image = torch.arange(16).view(1, 16)  # one 4x4 image, token = raster position
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment(image, 4, flip=False, shift=0, gen=gen), image)
    batch = image.repeat(64, 1)
    flipped = augment(batch, 4, flip=True, shift=0, gen=gen)
    mirror = image.view(4, 4).flip(1).reshape(1, 16)
    is_flip = (flipped == mirror).all(1)
    assert ((flipped == image).all(1) | is_flip).all() and 10 < int(is_flip.sum()) < 54
    shifted = augment(batch, 4, flip=False, shift=1, gen=gen).view(64, 4, 4)
    # A translation by at most one pixel, edges repeated: every row/column index moves by <= 1.
    rows, cols = shifted // 4, shifted % 4
    assert (rows - torch.arange(4).view(1, 4, 1)).abs().max() <= 1 and (cols - torch.arange(4)).abs().max() <= 1
    assert (rows.diff(dim=1) >= 0).all() and (cols.diff(dim=2) >= 0).all()  # order kept, no wrap-around
    same = augment(batch, 4, True, 1, torch.Generator().manual_seed(3))
    assert torch.equal(same, augment(batch, 4, True, 1, torch.Generator().manual_seed(3)))


def test_classifier_keeps_igpt_names():
    cfg = ModelConfig(size="igpt-tiny", n_px=8, n_vocab=16)
    names = set(IGPTClassifier(cfg, 4).state_dict())
    assert names - set(IGPT(cfg).state_dict()) == {"clf_head.weight"}
    assert set(IGPTClassifier(cfg, 4, bias=True).state_dict()) - names == {"clf_head.bias"}
    logits, classes, pooled = IGPTClassifier(cfg, 4)(torch.zeros(2, 64, dtype=torch.long))
    assert logits.shape == (2, 64, 16) and classes.shape == (2, 4) and pooled.shape == (2, 32)


def test_the_default_head_is_openais_zero_initialised_bias_free_on_the_raw_pooled_output():
    """src/model.py: wclf (classes, n_embd) ~ N(0, 0) = zeros, clf_logits = mean_t(ln_f(h)) · wclf^T, no bias."""
    torch.manual_seed(0)
    cfg = ModelConfig(size="igpt-tiny", n_px=8, n_vocab=16)
    model = IGPTClassifier(cfg, 4).eval()
    assert model.clf_head.bias is None and not model.clf_head.weight.any()
    tokens = torch.randint(0, 16, (3, 64))
    _, classes, _ = model(tokens)
    assert not classes.any()  # every class equally likely at the start
    torch.nn.init.normal_(model.clf_head.weight)
    pooled = model.ln_f(model.blocks(model.embed(tokens))).mean(dim=1)  # the raw pooled final-norm output
    _, classes, got = model(tokens)
    torch.testing.assert_close(got, pooled)
    torch.testing.assert_close(classes, pooled @ model.clf_head.weight.T)
    # The named departures: a bias, and standardised features (finetune.head_bias, finetune.standardize_features).
    other = IGPTClassifier(cfg, 4, bias=True).eval()
    other.load_state_dict({**model.state_dict(), "clf_head.bias": torch.arange(4.0)})
    other.feat_mean.fill_(0.5)
    other.feat_std.fill_(2.0)
    torch.testing.assert_close(other(tokens)[1], (pooled - 0.5) / 2.0 @ model.clf_head.weight.T + torch.arange(4.0))


def test_a_bert_model_is_evaluated_on_masked_inputs_averaged_over_keyed_masks(one_rank_group):
    """OpenAI's code masks a BERT model's input in every forward, evaluation included; finetune.eval_masks = K
    averages class probabilities over K masks keyed by image index; 0 evaluates unmasked inputs."""
    from types import SimpleNamespace

    from igpt_ds.models.objectives import EVAL_MASK_SEED, keyed_bert_masks
    from igpt_ds.train.finetune import Finetuner

    torch.manual_seed(0)
    cfg = ModelConfig(size="igpt-tiny", n_px=8, n_vocab=16, objective="bert")
    model = IGPTClassifier(cfg, 3).eval()
    torch.nn.init.normal_(model.clf_head.weight, std=30.0)
    model.device = torch.device("cpu")
    idx = torch.arange(5).numpy() + 100  # images 100..104 of the split
    tokens, labels = torch.randint(0, 16, (5, 64)), torch.tensor([0, 1, 2, 0, 1])

    def evaluate(eval_masks: int) -> float:
        ft = SimpleNamespace(
            model_cfg=cfg,
            engine=model,
            cfg=SimpleNamespace(finetune=FinetuneSection(eval_masks=eval_masks)),
            pinned=False,
        )
        ft.eval_mask = lambda i, j: Finetuner.eval_mask(ft, i, j)
        ft.frozen_batches = lambda split, n: iter([(5, idx, tokens, labels)])
        return Finetuner.evaluate(ft, split=[None] * 5)["acc"]

    def by_hand(masks: list) -> float:
        probs = torch.stack([model(tokens, m)[1].softmax(dim=1) for m in masks]).mean(dim=0)
        return 100.0 * (probs.argmax(dim=1) == labels).float().mean().item()

    keyed = [keyed_bert_masks(EVAL_MASK_SEED, 0, j, idx, 64, 0.15) for j in range(4)]
    assert evaluate(1) == pytest.approx(by_hand(keyed[:1]))
    assert evaluate(4) == pytest.approx(by_hand(keyed))
    assert evaluate(0) == pytest.approx(by_hand([None]))
    assert len({by_hand(keyed[:1]), by_hand(keyed), by_hand([None])}) > 1  # the three policies differ here


def test_config_checks():
    with pytest.raises(ConfigError, match="init_from"):
        FinetuneConfig()
    with pytest.raises(ConfigError, match="pipeline"):
        FinetuneConfig(train=TrainConfig(init_from="x", layout="pipeline", pipeline_stages=2))
    with pytest.raises(ConfigError):
        FinetuneSection(gen_weight=-1)


@pytest.mark.multiproc
def test_separable_zero3_two_ranks_then_resume(tmp_path):
    shards = separable_shards(tmp_path / "shards")
    ckpt = tiny_checkpoint(tmp_path / "pretrained", n_vocab=8)
    args = [f"--train.init_from={ckpt}", f"--data.shards={shards}", f"--train.run_root={tmp_path}",
            "--train.name=ft", "--train.ds_config=ds_configs/cpu_zero3.json", "--train.global_batch=32",
            "--train.micro_batch=8", "--train.max_steps=40", "--train.eval_every=10", "--train.log_every=5",
            "--train.save_every=10", "--optim.lr=1e-3", "--optim.warmup_steps=5", "--finetune.shift=1",
            "--finetune.head_lr_mult=10"]  # fmt: skip
    first = check(run_entry("finetune", *args, "--train.stop_at=20", nprocs=2))
    assert "fine-tuning paused at step 20" in first
    second = check(run_entry("finetune", *args))  # one rank: resumes through a universal checkpoint
    assert "resumed from" in second and "fine-tuning done at step 40" in second
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["finished"] and results["start_val_acc"] < 50
    assert results["best"]["val_acc"] >= 95 and results["best"]["test_acc"] >= 95, results
    assert (tmp_path / "ft" / "best" / "latest").is_file()
    logged = scalars(tmp_path / "ft" / "tensorboard")
    for tag in ("train/clf_loss", "train/gen_loss", "train/acc", "val/acc", "val/clf_loss", "test/acc_at_best_val"):
        assert tag in logged, tag
    assert logged["train/acc"][40] > logged["train/acc"][5]


@pytest.mark.multiproc
def test_sigterm_saves_exits_and_resumes(tmp_path):
    """As in pretraining: SIGTERM to every rank (Slurm preemption) -> checkpoint at the current step, exit 143;
    the same command resumes from that step. The run is then readable as its trunk by the eval tools."""
    shards = separable_shards(tmp_path / "shards")
    ckpt = tiny_checkpoint(tmp_path / "pretrained", n_vocab=8)
    preset = "launcher/configs/finetune_digits_cpu.yaml"
    args = [f"--train.init_from={ckpt}", f"--data.shards={shards}", f"--train.run_root={tmp_path}",
            "--train.name=term", "--train.ds_config=ds_configs/cpu_zero3.json", "--train.global_batch=16",
            "--train.micro_batch=8", "--train.max_steps=500", "--train.log_every=1", "--train.eval_every=0",
            "--train.save_every=500", "--finetune.stats_images=64"]  # fmt: skip
    log = tmp_path / "logs"
    log.mkdir()
    procs = start_ranks(preset, *args, log_dir=log, script="finetune")
    deadline = time.time() + 300
    while "step 3/500" not in (log / "rank0.log").read_text() and time.time() < deadline:
        time.sleep(0.05)
    for p in procs:
        os.kill(p.pid, signal.SIGTERM)
    out = (log / "rank0.log").read_text
    assert [p.wait(timeout=120) for p in procs] == [143, 143], out()[-3000:]  # 128 + SIGTERM: saved, not done
    run = tmp_path / "term"
    saved = ds_checkpoint.latest(run / "checkpoints")
    step = ds_checkpoint.read_meta(saved)["step"]
    assert 3 <= step < 500 and f"stopped at step {step} on SIGTERM" in out(), out()[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == step and not results["finished"]

    resumed = run_ranks(preset, *args, f"--train.stop_at={step + 2}", log_dir=tmp_path, script="finetune")
    assert f"resumed from {saved} at step {step}" in resumed
    assert f"step {step + 1}/500" in resumed and f"step {step}/500" not in resumed.split("resumed from")[1]
    assert json.loads((run / "results.json").read_text())["steps"] == step + 2

    model, cfg, palette = export.load_model_for_eval(run)  # a fine-tuned run: its trunk, clf_head dropped
    assert cfg.n_vocab == 8 and palette is not None and "clf_head.weight" not in model.state_dict()


def test_a_changed_head_learning_rate_applies_on_resume(tmp_path):
    """finetune.head_lr_mult (and optim.lr) changed on resume set the head's and the backbone's rates from the
    restored step on; the checkpoint's do not (one process, ZeRO-1)."""
    shards = separable_shards(tmp_path / "shards")
    ckpt = tiny_checkpoint(tmp_path / "pretrained", n_vocab=8)
    args = [f"--train.init_from={ckpt}", f"--data.shards={shards}", f"--train.run_root={tmp_path}",
            "--train.name=ft", "--train.ds_config=ds_configs/cpu.json", "--train.global_batch=16",
            "--train.micro_batch=8", "--train.max_steps=8", "--train.eval_every=0", "--train.log_every=1",
            "--optim.warmup_steps=0", "--finetune.patience=0"]  # fmt: skip
    check(run_entry("finetune", *args, "--optim.lr=1e-3", "--finetune.head_lr_mult=10", "--train.stop_at=4"))
    check(run_entry("finetune", *args, "--optim.lr=5e-4", "--finetune.head_lr_mult=2", "--train.stop_at=6"))
    logged = scalars(tmp_path / "ft" / "tensorboard")
    assert [logged["train/lr"][s] for s in (4, 5)] == pytest.approx([1e-3, 5e-4])
    assert [logged["train/lr_head"][s] for s in (4, 5)] == pytest.approx([1e-2, 1e-3])
