"""Feature extraction: the per-layer arrays equal the model's own features row by row, 2 ranks write exactly
what 1 rank writes in the same order, outputs appear whole, and bad inputs (among them shards tokenised with
another palette than the checkpoint's) give one-line errors (exit 2)."""

import numpy as np
import pytest
import torch
from eval_support import check, run_entry, tiny_checkpoint
from pretrain_support import digits_shards

from data_tools.build_shards import main as build_shards
from igpt_ds.checkpoint import load_model_for_eval
from igpt_ds.config import ConfigError
from igpt_ds.features import FeatureSplit, extract_split, layer_file, resolve_layers
from igpt_ds.shards import ShardSplit


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(shards, random tiny checkpoint with the shards' palette)."""
    root = tmp_path_factory.mktemp("features")
    shards = digits_shards(root / "shards")
    palette = ShardSplit(shards, "val").palette
    return shards, tiny_checkpoint(root / "ckpt", n_vocab=len(palette), palette=palette)


def test_resolve_layers():
    assert resolve_layers([], 2) == [0, 1, 2]
    assert resolve_layers([2, 0, 2], 4) == [0, 2]
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layers([0, 5], 4)


def test_extract_split_matches_model(digits, tmp_path):
    shards, ckpt = digits
    model, cfg, _ = load_model_for_eval(ckpt)
    split = ShardSplit(shards, "val")
    out = tmp_path / "val"
    (out / "stale.npy").parent.mkdir()
    (out / "stale.npy").write_bytes(b"")  # an older extraction is replaced whole
    extract_split(model, split, [0, 2], out, range(len(split)), batch_size=7, metadata={"checkpoint": "x"})
    assert not (out / "stale.npy").exists() and not list(tmp_path.glob(".val*"))
    feats = FeatureSplit(out)
    assert feats.meta["n"] == len(split) and feats.meta["dim"] == cfg.n_embd and feats.meta["checkpoint"] == "x"
    rows = np.array([0, 5, len(split) - 1])
    with torch.no_grad():
        want = model.features(torch.from_numpy(split.batch(rows)[0]), [0, 2])
    for l in (0, 2):
        assert feats.layer(l).dtype == np.float32
        np.testing.assert_allclose(feats.layer(l)[rows], want[l].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(feats.labels, split.labels)
    assert feats.pixels().shape == (len(split), 64 * 3) and feats.pixels().dtype == np.uint8
    with pytest.raises(ConfigError, match="not extracted"):
        feats.layer(1)


def test_unlabelled_split_is_refused(digits, tmp_path):
    _, ckpt = digits
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    assert build_shards([str(tmp_path / "images.npy"), "--out", str(tmp_path / "s"), "--n-px", "8", "--k", "8",
                         "--workers", "1"]) == 0  # fmt: skip
    model, _, _ = load_model_for_eval(ckpt)
    split = ShardSplit(tmp_path / "s", "train")
    with pytest.raises(ConfigError, match="unlabelled"):
        extract_split(model, split, [0], tmp_path / "out", range(len(split)))


@pytest.mark.multiproc
def test_two_ranks_equal_one_rank(digits, tmp_path):
    shards, ckpt = digits
    args = ["--checkpoint", str(ckpt), "--shards", str(shards), "--splits", "[val, test]", "--batch_size", "16"]
    check(run_entry("extract_features", *args, "--out", str(tmp_path / "one")))
    check(run_entry("extract_features", *args, "--out", str(tmp_path / "two"), nprocs=2))
    for split in ("val", "test"):
        one, two = FeatureSplit(tmp_path / "one" / split), FeatureSplit(tmp_path / "two" / split)
        assert one.layers == two.layers == [0, 1, 2] and two.meta["world_size"] == 2
        for l in one.layers:
            np.testing.assert_allclose(two.layer(l), one.layer(l), rtol=1e-6, atol=1e-7, err_msg=layer_file(l))
        np.testing.assert_array_equal(two.pixels(), one.pixels())
        np.testing.assert_array_equal(two.labels, one.labels)


def test_cli_errors_are_one_line(digits, tmp_path):
    shards, ckpt = digits
    missing = run_entry("extract_features", "--checkpoint", str(tmp_path / "nothing"), "--shards", str(shards))
    assert missing.returncode == 2 and "holds no complete checkpoint" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    layers = run_entry("extract_features", "--checkpoint", str(ckpt), "--shards", str(shards), "--layers", "[7]")
    assert layers.returncode == 2 and "out of range" in layers.stderr.strip().splitlines()[-1]
    split = run_entry("extract_features", "--checkpoint", str(ckpt), "--shards", str(shards), "--splits", "[nope]")
    assert split.returncode == 2 and "no split 'nope'" in split.stderr.strip().splitlines()[-1]
    palette = ShardSplit(shards, "val").palette[::-1].copy()  # same colours, other tokens: silently wrong features
    other = tiny_checkpoint(tmp_path / "other", n_vocab=len(palette), palette=palette)
    mismatch = run_entry("extract_features", "--checkpoint", str(other), "--shards", str(shards))
    assert mismatch.returncode == 2 and f"--palette {other / 'palette.npy'}" in mismatch.stderr.strip().splitlines()[-1]
