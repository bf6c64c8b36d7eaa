"""Weights in and out of checkpoints without a process group: a fine-tuned model loads as its trunk, weights
that do not fit are one-line errors naming the checkpoint and the keys, `load_weights` keeps a new head's
initialisation, and shards tokenised with another palette than the checkpoint's are refused.
(Checkpoints written by DeepSpeed ranks: test_pretrain_distributed.py, test_finetune.py.)"""

import numpy as np
import pytest
import torch
from eval_support import separable_shards, tiny_checkpoint

from igpt_ds.checkpoint.ds_checkpoint import check_palette
from igpt_ds.checkpoint.export import load_model_for_eval
from igpt_ds.checkpoint.weights import (
    TensorFile,
    load_consolidated,
    load_weights,
    open_consolidated,
    save_consolidated,
    tensor_shapes,
)
from igpt_ds.config import ConfigError, ModelConfig
from igpt_ds.data.shards import ShardSplit
from igpt_ds.models.igpt import IGPT
from igpt_ds.train.finetune import IGPTClassifier

CFG = ModelConfig(size="igpt-tiny", n_px=8, n_vocab=8)


def one_line_error(path, state, *keys: str) -> str:
    save_consolidated(path, CFG, state)
    with pytest.raises(ConfigError) as e:
        load_model_for_eval(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and all(k in message for k in keys), message
    return message


def test_fine_tuned_weights_load_as_the_trunk(tmp_path):
    torch.manual_seed(0)
    classifier = IGPTClassifier(CFG, n_classes=4)
    save_consolidated(tmp_path / "ft", CFG, classifier.state_dict())
    model, cfg, _ = load_model_for_eval(tmp_path / "ft")
    assert type(model) is IGPT and cfg == CFG
    trunk = {k: v for k, v in classifier.state_dict().items() if not k.startswith("clf_head.")}
    assert model.state_dict().keys() == trunk.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trunk.items())


def test_weights_that_do_not_fit_name_the_checkpoint_and_keys(tmp_path):
    state = IGPT(CFG).state_dict()
    missing = {k: v for k, v in state.items() if k != "ln_f.weight"}
    assert "missing: ln_f.weight" in one_line_error(tmp_path / "missing", missing, "ln_f.weight")
    extra = dict(state, **{"h.9.mlp.c_fc.weight": torch.zeros(2, 2)})
    assert "unexpected: h.9.mlp.c_fc.weight" in one_line_error(tmp_path / "extra", extra)
    wide = dict(state, **{"wte.weight": torch.zeros(9, 32)})  # a 9-colour embedding in an 8-colour model
    assert "wrong shape: wte.weight (9, 32) != (8, 32)" in one_line_error(tmp_path / "shape", wide)


def test_load_weights_keeps_the_head_and_checks_keys():
    torch.manual_seed(0)
    state = IGPT(CFG).state_dict()
    model = IGPTClassifier(CFG, n_classes=3, bias=True)  # the bias shows in the missing keys too
    torch.nn.init.normal_(model.clf_head.weight)
    head = model.clf_head.weight.clone()
    load_weights(model, state, "pretrained")  # the head keeps its initialisation by default
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(model.clf_head.weight, head)
    with pytest.raises(ConfigError, match=r"^pretrained: .*missing: clf_head\.bias, clf_head\.weight"):
        load_weights(model, state, "pretrained", keep_init=())  # the head is not in a pretrained state dict


def test_weights_read_tensor_by_tensor_load_like_the_whole_file(tmp_path):
    """`open_consolidated` reads shapes from the header and each tensor when it is looked up; loading through
    it gives the same model as the whole state dict, and a fine-tuned run's head is ignored, not an error."""
    torch.manual_seed(0)
    classifier = IGPTClassifier(CFG, n_classes=4)
    save_consolidated(tmp_path / "ft", CFG, classifier.state_dict())
    cfg, lazy, _ = open_consolidated(tmp_path / "ft")
    _, whole, _ = load_consolidated(tmp_path / "ft")
    assert isinstance(lazy, TensorFile) and cfg == CFG and len(lazy) == len(whole)
    assert tensor_shapes(lazy) == {k: v.shape for k, v in whole.items()}
    assert torch.equal(lazy["h.1.attn.c_proj.weight"], whole["h.1.attn.c_proj.weight"])
    with pytest.raises(KeyError):
        lazy["h.7.attn.c_proj.weight"]
    model = IGPTClassifier(CFG, n_classes=4)
    load_weights(model, lazy, "lazy", keep_init=("clf_head.",))
    trunk = {k: v for k, v in whole.items() if not k.startswith("clf_head.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trunk.items())
    assert torch.equal(model.clf_head.weight, torch.zeros_like(model.clf_head.weight))  # kept its zero init


def test_shards_with_another_palette_are_refused(tmp_path):
    shards = separable_shards(tmp_path / "shards")
    split = ShardSplit(shards, "val")
    same = tiny_checkpoint(tmp_path / "same", n_vocab=8, palette=split.palette)
    check_palette(load_consolidated(same)[2], split, same)
    check_palette(None, split, same)  # a checkpoint without a palette decodes with the shards'
    other = tiny_checkpoint(tmp_path / "other", n_vocab=8, palette=split.palette[::-1].copy())
    with pytest.raises(ConfigError) as e:
        check_palette(load_consolidated(other)[2], split, other)
    assert f"--palette {other / 'palette.npy'}" in str(e.value) and str(shards) in str(e.value)
    assert np.array_equal(load_consolidated(other)[2][::-1], split.palette)  # same colours, other token order


@pytest.mark.multiproc
def test_a_rank_with_a_stale_listing_does_not_save_alone(tmp_path):
    """Rank 1 cannot see that step 1 is already saved; rank 0 decides for both, so neither enters the collective
    save alone (which hung the other ranks, or failed when rank 0 exited), and nothing is rewritten."""
    from test_distributed import run_program

    for result in run_program("save_twice", str(tmp_path), "1", timeout=180):
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().splitlines()[-1] == "saved twice; rewritten: False"


def test_old_checkpoints_are_deleted_in_the_background(tmp_path, monkeypatch, one_rank_group):
    """Rank 0 moves what it prunes aside at once and deletes it on another thread: the other ranks, waiting at the
    next collective, do not wait for tens of GB to be deleted. A killed process's leftovers go the same way."""
    import threading

    from igpt_ds.checkpoint import ds_checkpoint
    from igpt_ds.config import OptimConfig, TrainConfig
    from igpt_ds.train.engine import build_ds_config, initialize

    monkeypatch.setenv("LOCAL_RANK", "0")
    train = TrainConfig(ds_config="ds_configs/cpu.json", global_batch=1, micro_batch=1)
    engine = initialize(IGPT(CFG, seed=0), build_ds_config(train, OptimConfig(), 1), OptimConfig(), 10)
    deleted_on = []
    real = ds_checkpoint.shutil.rmtree
    monkeypatch.setattr(ds_checkpoint.shutil, "rmtree", lambda p, **kw: deleted_on.append(threading.current_thread()) or
                        real(p, **kw))  # fmt: skip
    root = tmp_path / "checkpoints"
    (root / "step_00000000").mkdir(parents=True)  # the leftovers of a save killed midway
    (root / "step_00000000" / "mp_rank_00_model_states.pt").write_text("half")
    for step in (1, 2, 3):
        ds_checkpoint.save(engine, root, step, {"step": step}, {}, None, keep=1)
    ds_checkpoint.wait_for_deletions()
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003"]
    assert list((root / ds_checkpoint.TRASH).iterdir()) == []
    assert deleted_on and all(t is not threading.main_thread() for t in deleted_on)
