"""Augmented views (issue 22): made at build time (`igpt-build-shards --views K`), chosen at training time (one view
and a flip per (seed, epoch, image)), never seen by evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import build, folder_bytes
from eval_support import run_entry
from PIL import Image
from pretrain_support import REPO, env, losses, run_ranks, write_config

from data_tools.images import ViewTransform, load_views
from data_tools.inspect_shards import main as inspect_main
from igpt_ds.checkpoint import ds_checkpoint
from igpt_ds.config import DataConfig
from igpt_ds.data import palette as P
from igpt_ds.data.sampler import GlobalBatchSampler
from igpt_ds.data.shards import ShardSplit
from igpt_ds.data.views import choose, flip_left_right, read_training


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """60 labelled 24x20 images with structure (a gradient and a bright square per image), so crops differ."""
    path = tmp_path_factory.mktemp("src") / "d.npz"
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:24, 0:20]
    images = np.empty((60, 24, 20, 3), np.uint8)
    for i in range(60):
        images[i, ..., 0] = (x * 12 + i) % 256
        images[i, ..., 1] = (y * 10) % 256
        images[i, ..., 2] = rng.integers(0, 256)
        top, left = rng.integers(0, 16), rng.integers(0, 12)
        images[i, top : top + 8, left : left + 8] = 255
    np.savez(path, images=images, labels=np.arange(60) % 3)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, source):
    """The same source built with 0 and 3 views (8x8, 16 colours)."""
    root = tmp_path_factory.mktemp("built")
    out = {}
    for k in (0, 3):
        out[k] = root / f"k{k}"
        assert build(source, "--out", out[k], "--n-px", 8, "--k", 16, "--views", k, "--shard-size", 20) == 0
    return out


def test_views_are_byte_identical_for_one_and_two_workers(tmp_path, source, built):
    assert build(source, "--out", tmp_path / "w2", "--n-px", 8, "--k", 16, "--views", 3, "--shard-size", 20,
                 "--workers", 2) == 0  # fmt: skip
    assert folder_bytes(tmp_path / "w2") == folder_bytes(built[3])


def test_views_are_stored_for_train_only_and_leave_the_evaluation_crop_as_it_was(built):
    manifest = json.loads((built[3] / "manifest.json").read_text())
    assert manifest["views"] == {"k": 3, "splits": ["train"], "short_side": [256.0, 384.0], "crop": 224.0, "seed": 0}
    assert manifest["splits"]["train"]["views"] == 3
    assert sorted(manifest["splits"]) == ["train", "val"]
    assert "views" not in manifest["splits"]["val"]
    assert all("views" not in entry for entry in manifest["splits"]["val"]["shards"])
    without = json.loads((built[0] / "manifest.json").read_text())
    assert "views" not in without and "views" not in without["splits"]["train"]
    # The palette and every split's evaluation crop are the same bytes whatever K: views only add files.
    k0, k3 = folder_bytes(built[0]), folder_bytes(built[3])
    added = sorted(set(k3) - set(k0))
    assert added == [f"train/shard-{i:05d}.views.tokens" for i in range(3)]
    assert all(k0[name] == k3[name] for name in k0 if name not in ("manifest.json", "problems.txt"))
    train = ShardSplit(built[3], "train", verify=True)
    assert (
        train.n_views == 3 and ShardSplit(built[3], "val").n_views == 0 and ShardSplit(built[0], "train").n_views == 0
    )
    views = np.stack([train.batch(np.arange(len(train)), np.full(len(train), v))[0] for v in range(3)])
    plain = train.batch(np.arange(len(train)))[0]
    assert not (views == plain).all(axis=2).any(), "a view equal to the evaluation crop"
    assert not (views[0] == views[1]).all(axis=1).any(), "two views of an image alike"


def test_a_view_is_the_configured_crop_of_the_image(tmp_path, source):
    """Stored view v of training image i is `load_views`' crop keyed (seed, i, v) of that image, encoded with the
    palette (no val split held out: row i is source image i)."""
    assert build(source, "--out", tmp_path / "s", "--n-px", 8, "--k", 16, "--views", 3, "--val-fraction", 0,
                 "--seed", 4) == 0  # fmt: skip
    train = ShardSplit(tmp_path / "s", "train")
    with np.load(source) as z:
        images = z["images"]
    lut = P.palette_lut(train.palette, None)
    for v in range(3):
        tokens = train.batch(np.arange(len(images)), np.full(len(images), v))[0]
        expected = [P.encode(load_views(im, 8, ViewTransform(), seed=4, image=i, k=3)[v], lut).reshape(-1)
                    for i, im in enumerate(images)]  # fmt: skip
        np.testing.assert_array_equal(tokens, np.stack(expected))


def test_crop_sizes_follow_the_configured_short_side_range():
    """Measured on a known pattern: red = x, green = y (pixels) on a 256x256 image, so a view's red span gives the
    crop's side s; the paper's transform makes 224·256/s the random short side, uniform in [256, 384]."""
    y, x = np.mgrid[0:256, 0:256]
    pattern = np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8)
    n_px, k = 16, 200
    views = load_views(pattern, n_px, ViewTransform(), seed=5, image=0, k=k).astype(float)
    interior = views[:, 2:-2, :, 0]  # the red channel away from the top and bottom edge (resampling clamps there)
    side = (interior[:, :, -2].mean(1) - interior[:, :, 1].mean(1)) * n_px / (n_px - 3)
    short = 224 * 256 / side
    assert short.min() > 250 and short.max() < 392, (short.min(), short.max())
    hist = np.histogram(short, bins=4, range=(256, 384))[0]
    assert hist.min() > 0.15 * k, hist  # uniform: 50 expected in each quarter
    left = interior[:, :, 1].mean(1) - side * 1.5 / n_px
    assert left.min() > -3 and (left + side).max() < 259  # inside the image
    assert left.std() > 10  # random positions
    narrow = load_views(pattern, n_px, ViewTransform(short_side=(224, 224)), seed=5, image=0, k=4)
    assert all((v == narrow[0]).all() for v in narrow)  # crop = the whole short side of a square: one view


def test_the_flip_is_exact_on_tokens(built):
    train = ShardSplit(built[3], "train")
    tokens, _ = train.batch(np.arange(6))
    which = np.array([True, False, True, True, False, False])
    flipped = flip_left_right(tokens.copy(), 8, which)
    rgb = lambda t: P.decode(t, train.palette).reshape(len(t), 8, 8, 3)
    np.testing.assert_array_equal(rgb(flipped)[which], rgb(tokens)[which][:, :, ::-1])
    np.testing.assert_array_equal(flipped[~which], tokens[~which])
    np.testing.assert_array_equal(flip_left_right(flipped.copy(), 8, which), tokens)


def test_the_view_and_flip_of_a_sample_are_the_same_at_any_world_size_and_across_a_resume(built):
    train = ShardSplit(built[3], "train")
    data = DataConfig(shards=str(built[3]), flip=True)

    def run(world: int, steps: range, consumed: int = 0) -> list[np.ndarray]:
        samplers = [GlobalBatchSampler(len(train), 12, r, world, seed=7) for r in range(world)]
        out = []
        for s in samplers:
            s.consumed = consumed
        for _ in steps:
            parts = [read_training(train, s.indices_at(s.consumed), s.epochs_at(s.consumed), 7, data)[0]
                     for s in samplers]  # fmt: skip
            out.append(np.concatenate(parts))
            for s in samplers:
                s.consumed += 12
        return out

    one = run(1, range(20))  # 20 steps of 12 over 45 images: five epochs
    two = run(2, range(20))
    resumed = run(1, range(10)) + run(2, range(10), consumed=120)
    for a, b, c in zip(one, two, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # Each image is read in every view and both orientations over the epochs, and an epoch's choice is its own.
    sampler = GlobalBatchSampler(len(train), 12, 0, 1, seed=7)
    views, flips = choose(7, np.repeat(np.arange(40), len(train)), np.tile(np.arange(len(train)), 40), 3)
    assert set(views.tolist()) == {0, 1, 2} and 0.4 < flips.mean() < 0.6
    assert (views.reshape(40, -1) != views.reshape(40, -1)[0]).any(axis=0).all()
    assert sampler.epochs_at(len(train) - 6).tolist() == [0] * 6 + [1] * 6


def test_without_views_or_flip_training_reads_the_evaluation_crop(built):
    for k in (0, 3):
        train = ShardSplit(built[k], "train")
        idx, epochs = np.array([4, 1, 30, 4]), np.array([0, 0, 2, 5])
        plain = train.batch(idx)
        off = DataConfig(shards=str(built[k]), views=False) if k else DataConfig(shards=str(built[k]))
        got = read_training(train, idx, epochs, 0, off)
        np.testing.assert_array_equal(got[0], plain[0])
        np.testing.assert_array_equal(got[1], plain[1])
    train = ShardSplit(built[3], "train")
    on = read_training(train, idx, epochs, 0, DataConfig(shards=str(built[3])))[0]
    assert not (on == plain[0]).all(axis=1).any()  # with views, never the evaluation crop


def test_inspect_draws_the_views_of_a_few_images(built, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert inspect_main([str(built[3]), "--out", str(out), "--n", "4", "--views-out", str(tmp_path / "v.png")]) == 0
    assert "views      3 a training image" in capsys.readouterr().out
    grid = np.asarray(Image.open(tmp_path / "v.png").convert("RGB"))
    tile, caption = 8 * 8 + 2, 14  # 8 px upscaled to 64, a 2 px gap; a caption row on top
    assert grid.shape == (caption + 8 * tile, (1 + 2 * 3) * tile + 4, 3)  # 8 images; the crop, 3 views, 3 flipped
    train = ShardSplit(built[3], "train")
    first = lambda tokens: P.decode(tokens, train.palette).reshape(8, 8, 3).repeat(8, 0).repeat(8, 1)
    column = lambda c: grid[caption : caption + 64, c * tile + 1 + (4 if c else 0) :][:, :64]
    np.testing.assert_array_equal(column(0), first(train.batch(np.array([0]))[0][0]))
    view2 = train.batch(np.array([0]), np.array([2]))[0][0]
    np.testing.assert_array_equal(column(3), first(view2))
    np.testing.assert_array_equal(column(6), first(view2)[:, ::-1])
    assert inspect_main([str(built[0]), "--out", str(out), "--views-out", str(tmp_path / "none.png")]) == 2


# --- end to end: training, resume, evaluation ---------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_views(tmp_path_factory):
    """The digits with 4 views, and without (the real builder in a subprocess)."""
    root = tmp_path_factory.mktemp("digits")
    for k in (0, 4):
        cmd = [sys.executable, "-m", "data_tools.build_shards", "digits", "--out", str(root / f"k{k}"), "--n-px", "8",
               "--views", str(k)]  # fmt: skip
        subprocess.run(cmd, cwd=REPO, env=env(), check=True, capture_output=True, timeout=300)
    return root


@pytest.mark.multiproc
def test_training_on_views_is_the_same_at_one_and_two_ranks_and_across_a_resume(digit_views, tmp_path):
    shards = digit_views / "k4"
    n_vocab = ShardSplit(shards, "train").n_vocab
    config = lambda name, **t: write_config(tmp_path / f"{name}.yaml", shards, tmp_path / name, n_vocab,
                                            ds_config="ds_configs/cpu.json", eval_every=0, **t)  # fmt: skip
    over = ["--data.flip=true"]
    run_ranks(config("one", max_steps=8, save_every=100), *over, nprocs=1, log_dir=tmp_path)
    two = config("two", max_steps=8, save_every=4)
    run_ranks(two, *over, "--train.stop_at=4", log_dir=tmp_path)
    out = run_ranks(two, *over, log_dir=tmp_path)
    assert "views: 4 a training image" in out and "at step 4" in out
    np.testing.assert_allclose(losses(tmp_path / "two" / "run"), losses(tmp_path / "one" / "run"), rtol=2e-5)
    # The views made the difference: the evaluation crop trains to other losses.
    run_ranks(config("crop", max_steps=8, save_every=100), *over, "--data.views=false", nprocs=1, log_dir=tmp_path)
    assert not np.allclose(losses(tmp_path / "crop" / "run"), losses(tmp_path / "one" / "run"), rtol=1e-3)
    meta = ds_checkpoint.read_meta(tmp_path / "two" / "run" / "checkpoints" / "step_00000008")
    assert meta["data"]["views"] == 4 and meta["data"]["flip"] is True


@pytest.mark.multiproc
def test_a_resume_against_shards_with_another_number_of_views_is_one_line(digit_views, tmp_path):
    shards = tmp_path / "shards"
    cmd = [sys.executable, "-m", "data_tools.build_shards", "digits", "--out", str(shards), "--n-px", "8", "--views"]
    subprocess.run([*cmd, "2"], cwd=REPO, env=env(), check=True, capture_output=True, timeout=300)
    config = write_config(tmp_path / "c.yaml", shards, tmp_path / "r", ShardSplit(shards, "train").n_vocab,
                          ds_config="ds_configs/cpu.json", eval_every=0, max_steps=2, save_every=2)  # fmt: skip
    run_ranks(config, nprocs=1, log_dir=tmp_path)
    subprocess.run([*cmd, "3", "--overwrite"], cwd=REPO, env=env(), check=True, capture_output=True, timeout=300)
    result = subprocess.run([sys.executable, "launcher/pretrain.py", "--config", str(config), "--train.max_steps=4"],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "3 views a training image now, 2 then" in lines[0] and "reset_data_position" in lines[0]


def test_features_of_shards_with_views_are_those_of_the_evaluation_crop(digit_views, tmp_path):
    from eval_support import tiny_checkpoint

    from igpt_ds.eval.feature_store import FeatureSplit

    split = ShardSplit(digit_views / "k0", "train")
    ckpt = tiny_checkpoint(tmp_path / "ckpt", n_vocab=split.n_vocab, palette=split.palette)
    for k in (0, 4):
        result = run_entry("extract_features", "--checkpoint", str(ckpt), "--shards", str(digit_views / f"k{k}"),
                           "--splits", "[train, val]", "--out", str(tmp_path / f"f{k}"))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    for s in ("train", "val"):
        a, b = FeatureSplit(tmp_path / "f0" / s), FeatureSplit(tmp_path / "f4" / s)
        assert a.layers == b.layers and a.n == b.n
        for what in [*a.layers, "pixels"]:
            np.testing.assert_array_equal(a.read(what, range(a.n)), b.read(what, range(b.n)))


def test_fine_tuning_flips_with_its_own_flag():
    """Fine-tuning has its flip and translations (finetune.flip, finetune.shift); data.flip there is refused in one
    line naming the flag to use, not silently a second flip."""
    from igpt_ds.config import ConfigError, TrainConfig
    from igpt_ds.train.finetune import FinetuneConfig

    with pytest.raises(ConfigError, match="finetune.flip"):
        FinetuneConfig(data=DataConfig(flip=True), train=TrainConfig(init_from="run"))
    assert FinetuneConfig(data=DataConfig(views=True), train=TrainConfig(init_from="run")).data.views
