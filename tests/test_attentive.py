"""The attentive probe (issue 25): AIM's attention-pooling head trained on a frozen trunk with the fine-tuning
machinery (launcher/finetune.py --finetune.head=attentive)."""

from __future__ import annotations

import json

import pytest
import torch
from eval_support import check, run_entry, tiny_checkpoint
from pretrain_support import digits_shards

from igpt_ds.checkpoint import ds_checkpoint
from igpt_ds.checkpoint.weights import load_consolidated
from igpt_ds.config import ConfigError, ModelConfig
from igpt_ds.data.shards import ShardSplit
from igpt_ds.train.finetune import FinetuneSection, IGPTClassifier


def test_the_attentive_head_reads_every_position_of_its_layer_and_the_trunk_is_frozen():
    torch.manual_seed(0)
    cfg = ModelConfig(size="igpt-tiny", n_px=8, n_vocab=16)
    model = IGPTClassifier(cfg, 4, head="attentive", probe_layer=1).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"clf_head.query", "clf_head.k.weight", "clf_head.v.weight", "clf_head.linear.weight"}
    tokens = torch.randint(0, 16, (3, 64))
    logits, classes, h = model(tokens)
    assert logits is None and classes.shape == (3, 4) and h.shape == (3, 64, 32)
    torch.testing.assert_close(h, model.h[1].ln_1(model.h[0](model.embed(tokens))))  # LN(h^1), every position
    # The head attends: permuting positions leaves the class logits unchanged (attention pooling is a set
    # function of the positions), while changing one position's features changes them.
    pooled = model.clf_head(h)
    torch.testing.assert_close(model.clf_head(h[:, torch.randperm(64)]), pooled)
    bumped = h.clone()
    bumped[:, 5] += 3.0
    assert not torch.allclose(model.clf_head(bumped), pooled)
    classes.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("clf_head."))


def test_attentive_probe_config_checks():
    with pytest.raises(ConfigError, match="gen_weight=0"):
        FinetuneSection(head="attentive")  # L_GEN would train nothing on a frozen trunk
    with pytest.raises(ConfigError, match="'linear' or 'attentive'"):
        FinetuneSection(head="mlp")
    assert FinetuneSection(head="attentive", gen_weight=0).head == "attentive"
    with pytest.raises(ConfigError, match="probe_layer"):
        IGPTClassifier(ModelConfig(size="igpt-tiny", n_px=8, n_vocab=16), 4, head="attentive", probe_layer=7)


@pytest.mark.multiproc
def test_the_attentive_probe_beats_chance_on_the_digits_and_leaves_the_trunk_bit_identical(tmp_path):
    shards = digits_shards(tmp_path / "shards")
    palette = ShardSplit(shards, "train").palette
    ckpt = tiny_checkpoint(tmp_path / "pretrained", n_vocab=len(palette), palette=palette)
    args = [f"--train.init_from={ckpt}", f"--data.shards={shards}", f"--train.run_root={tmp_path}",
            "--train.name=attentive", "--train.ds_config=ds_configs/cpu.json", "--train.global_batch=64",
            "--train.micro_batch=16", "--train.max_steps=100", "--train.eval_every=25", "--train.log_every=25",
            "--train.save_every=100", "--optim.lr=1e-2", "--optim.warmup_steps=5", "--finetune.flip=false",
            "--finetune.head=attentive", "--finetune.gen_weight=0", "--finetune.probe_layer=1",
            "--finetune.patience=0"]  # fmt: skip
    out = check(run_entry("finetune", *args, nprocs=2))
    assert "fine-tuning done at step 100" in out
    results = json.loads((tmp_path / "attentive" / "results.json").read_text())
    # Chance is 10% (10 digits; 360 test images, a standard error of ~1.6 points there): a random 2-layer trunk's
    # features, pooled by the learned query, reach ~31% in 100 steps; 25% is 9 standard errors above chance.
    assert results["best"]["test_acc"] > 25 and results["best"]["val_acc"] > results["start_val_acc"] + 10, results
    assert results["attentive"]["probe_layer"] == 1 and results["attentive"]["seconds_per_epoch"] > 0
    # The engine's module as saved (ZeRO-1 fp32: every parameter, frozen ones included, in the model states file).
    latest = ds_checkpoint.latest(tmp_path / "attentive" / "checkpoints")
    trained = torch.load(latest / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    _, initial, _ = load_consolidated(ckpt)
    trunk = [k for k in trained if not k.startswith("clf_head.")]
    assert sorted(trunk) == sorted(initial)
    for k in trunk:
        assert torch.equal(trained[k].float(), initial[k].float()), k  # frozen: not one bit moved
    assert trained["clf_head.linear.weight"].abs().sum() > 0
