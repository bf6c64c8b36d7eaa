"""Feature extraction: the parts equal the model's own features row by row, 2 ranks write bit for bit what 1 rank
writes, a killed extraction resumes without recomputing finished parts, pixels keep the images' real channels,
and bad inputs (among them shards tokenised with another palette than the checkpoint's) give one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from eval_support import check, run_entry, separable_shards, tiny_checkpoint
from pretrain_support import REPO, digits_shards, env

from data_tools.build_shards import main as build_shards
from igpt_ds.checkpoint.export import load_model_for_eval
from igpt_ds.config import ConfigError
from igpt_ds.data.shards import ShardSplit
from igpt_ds.eval.feature_store import (
    FEATURES_FILE,
    INDEX_FILE,
    PARTS_DIR,
    FeatureSplit,
    finish_split,
    part_rows_for,
    prepare_split,
    split_plan,
)
from igpt_ds.eval.features import extract_parts, resolve_layers


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


def test_part_layout_depends_on_the_split_only():
    assert part_rows_for(1000, 64) == 64  # small splits: one batch a part
    assert part_rows_for(1_281_167, 64) == 320  # ImageNet train: 5 batches a part, ~4000 parts
    assert 1_281_167 / part_rows_for(1_281_167, 64) <= 4096


def extract_one_process(model, split, layers, out, batch_size, source="x"):
    plan = split_plan(split, layers, model.cfg.n_embd, batch_size, {"path": source})
    assert prepare_split(out, plan) == "new"
    extract_parts(model, split, out, plan, precision="fp32", progress=False)
    finish_split(out, plan, split.labels, split.class_names, {"n_layer": model.cfg.n_layer}, timeout_s=0)
    return FeatureSplit(out)


def test_parts_hold_the_models_features(digits, tmp_path):
    shards, ckpt = digits
    model, cfg, _ = load_model_for_eval(ckpt)
    split = ShardSplit(shards, "val")
    feats = extract_one_process(model, split, [0, 2], tmp_path / "val", batch_size=7)
    assert feats.n == len(split) and feats.meta["dim"] == cfg.n_embd and feats.meta["source"] == {"path": "x"}
    assert len(feats.meta["parts"]) == -(-len(split) // 7) and not list((tmp_path / "val" / PARTS_DIR).glob(".*"))
    rows = np.array([0, 5, 6, 7, len(split) - 1])  # across part boundaries
    with torch.no_grad():
        want = model.features(torch.from_numpy(split.batch(rows)[0]), [0, 2])
    for l in (0, 2):
        got = feats.read(l, range(len(split)))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got[rows], want[l].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(feats.read(l, range(5, 9)), got[5:9])
    np.testing.assert_array_equal(feats.labels, split.labels)
    with pytest.raises(ConfigError, match="not extracted"):
        feats.read(1, range(3))


def test_pixels_keep_the_images_real_channels(digits, tmp_path):
    """Digits are grey: one channel (64 values an 8x8 image, not 192); a colour dataset keeps three."""
    shards, ckpt = digits
    model, _, _ = load_model_for_eval(ckpt)
    grey = extract_one_process(model, ShardSplit(shards, "test"), [0], tmp_path / "grey", batch_size=64)
    assert grey.meta["channels"] == 1 and grey.read("pixels", range(3)).shape == (3, 64)
    split = ShardSplit(shards, "test")
    rgb = split.palette[split.batch(np.arange(3))[0]]  # decoded colours: R = G = B
    np.testing.assert_array_equal(grey.read("pixels", range(3)), np.rint(127.5 * (rgb[..., 0] + 1)).astype(np.uint8))
    colour = separable_shards(tmp_path / "colour")
    palette = ShardSplit(colour, "val").palette
    model = load_model_for_eval(tiny_checkpoint(tmp_path / "c", n_vocab=len(palette), palette=palette))[0]
    rgb = extract_one_process(model, ShardSplit(colour, "val"), [0], tmp_path / "rgb", batch_size=64)
    assert rgb.meta["channels"] == 3 and rgb.read("pixels", range(3)).shape == (3, 192)


def test_unlabelled_split_is_refused(digits, tmp_path):
    _, ckpt = digits
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    assert build_shards([str(tmp_path / "images.npy"), "--out", str(tmp_path / "s"), "--n-px", "8", "--k", "8",
                         "--workers", "1"]) == 0  # fmt: skip
    result = run_entry("extract_features", "--checkpoint", str(ckpt), "--shards", str(tmp_path / "s"), "--splits",
                       "[train]", "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2 and "unlabelled" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.multiproc
def test_two_ranks_write_bit_for_bit_what_one_rank_writes(digits, tmp_path):
    shards, ckpt = digits
    args = ["--checkpoint", str(ckpt), "--shards", str(shards), "--splits", "[val, test]", "--batch_size", "16"]
    check(run_entry("extract_features", *args, "--out", str(tmp_path / "one")))
    check(run_entry("extract_features", *args, "--out", str(tmp_path / "two"), nprocs=2))
    for split in ("val", "test"):
        one, two = FeatureSplit(tmp_path / "one" / split), FeatureSplit(tmp_path / "two" / split)
        assert one.layers == two.layers == [0, 1, 2] and two.meta["world_size"] == 2
        assert one.meta["parts"] == two.meta["parts"] and len(one.meta["parts"]) > 2
        for what in [*one.layers, "pixels"]:
            np.testing.assert_array_equal(two.read(what, range(two.n)), one.read(what, range(one.n)), err_msg=what)
        np.testing.assert_array_equal(two.labels, one.labels)
    again = check(run_entry("extract_features", *args, "--out", str(tmp_path / "two")))
    assert "val: already extracted" in again and "test: already extracted" in again


def test_a_killed_extraction_resumes_where_it_stopped(digits, tmp_path):
    """SIGKILL once some parts are written; the rerun keeps them (same files) and ends equal to a run that was
    never stopped."""
    shards, ckpt = digits
    args = ["--checkpoint", str(ckpt), "--shards", str(shards), "--splits", "[train]", "--batch_size", "1"]
    out, parts = tmp_path / "killed", tmp_path / "killed" / "train" / PARTS_DIR
    cmd = [sys.executable, "launcher/extract_features.py", *args, "--out", str(out)]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), start_new_session=True, **quiet)
    deadline = time.monotonic() + 240
    while not (parts.is_dir() and len([p for p in os.listdir(parts) if not p.startswith(".")]) >= 20):
        assert proc.poll() is None and time.monotonic() < deadline, "extraction ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "train" / INDEX_FILE).exists()  # stopped midway
    finished = {p.name: (p / FEATURES_FILE).stat().st_ino for p in parts.iterdir() if not p.name.startswith(".")}
    assert 20 <= len(finished) < 1257
    check(run_entry("extract_features", *args, "--out", str(out)))
    assert all((parts / name / FEATURES_FILE).stat().st_ino == ino for name, ino in finished.items())  # kept
    check(run_entry("extract_features", *args, "--out", str(tmp_path / "whole")))
    resumed, whole = FeatureSplit(out / "train"), FeatureSplit(tmp_path / "whole" / "train")
    for what in [*whole.layers, "pixels"]:
        np.testing.assert_array_equal(resumed.read(what, range(resumed.n)), whole.read(what, range(whole.n)))
    assert json.loads((out / "train" / INDEX_FILE).read_text())["parts"] == whole.meta["parts"]


def test_changed_inputs_start_the_split_over(digits, tmp_path):
    shards, ckpt = digits
    args = ["--checkpoint", str(ckpt), "--shards", str(shards), "--splits", "[val]", "--out", str(tmp_path / "f")]
    check(run_entry("extract_features", *args, "--layers", "[0]"))
    check(run_entry("extract_features", *args, "--layers", "[1, 2]"))
    assert FeatureSplit(tmp_path / "f" / "val").layers == [1, 2]
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["val"]  # the old parts are gone


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
