"""Shard builder, reader, sampler and inspect: contents, determinism, atomicity, errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_helpers import build, folder_bytes, write_image_tree
from PIL import Image

from data_tools.inspect_shards import main as inspect_main
from igpt_ds.data import palette as P
from igpt_ds.data.sampler import GlobalBatchSampler, rank_rows
from igpt_ds.data.shards import ShardError, ShardSplit

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    """40 labelled 4x4 images in an .npz."""
    path = tmp_path_factory.mktemp("src") / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8), labels=np.arange(40) % 3)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory, arrays, palette_file):
    """Shards of at most 7 images, so splits span several files."""
    out = tmp_path_factory.mktemp("shards") / "out"
    assert build(arrays, "--out", out, "--n-px", 4, "--palette", palette_file, "--shard-size", 7) == 0
    return out


def test_reader_equals_numpy_of_the_written_data(shards, arrays, palette_file):
    manifest = json.loads((shards / "manifest.json").read_text())
    split = ShardSplit(shards, "train", verify=True)
    assert (split.n_px, split.seq_len, split.n_vocab) == (4, 16, 32) and len(split) == 36
    assert [s["n"] for s in manifest["splits"]["train"]["shards"]] == [7, 7, 7, 7, 7, 1]
    np.testing.assert_array_equal(split.palette, np.load(palette_file))
    raw = np.concatenate([np.fromfile(shards / s["tokens"], "<u2") for s in manifest["splits"]["train"]["shards"]])
    expected = raw.reshape(36, 16)
    with np.load(arrays) as z:  # the tokens are the palette encoding of the source images, raster order
        images, labels = z["images"], z["labels"]
    lut = P.palette_lut(split.palette, palette_file)
    rows = [np.flatnonzero((P.encode(images, lut).reshape(40, 16) == t).all(1))[0] for t in expected]
    np.testing.assert_array_equal(split.labels, labels[rows])
    for i in (0, 6, 7, 35, -1):
        row = split[i]
        assert row.dtype == np.uint16 and not row.flags.owndata and not row.flags.writeable  # a view
        np.testing.assert_array_equal(row, expected[i])
    idx = np.array([35, 0, 8, 8, 20, 3, 14])
    tokens, got_labels = split.batch(idx)
    assert tokens.dtype == np.int64 and got_labels.dtype == np.int64
    np.testing.assert_array_equal(tokens, expected[idx])
    np.testing.assert_array_equal(got_labels, split.labels[idx])
    with pytest.raises(IndexError):
        split[36]
    with pytest.raises(IndexError):
        split.batch([36])


def test_one_and_two_workers_write_identical_bytes(tmp_path):
    write_image_tree(tmp_path / "src", per_class=8)
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert build(tmp_path / "src", "--out", out, "--n-px", 6, "--k", 16, "--workers", workers) == 0
    one, two = folder_bytes(tmp_path / "w1"), folder_bytes(tmp_path / "w2")
    assert one == two and "train/shard-00000.tokens" in one and json.loads(one["manifest.json"])["skipped"] == 3


def test_damaged_shards_are_named(tmp_path, shards):
    root = tmp_path / "copy"
    shutil.copytree(shards, root)
    tokens = root / "train" / "shard-00001.tokens"
    data = bytearray(tokens.read_bytes())
    data[5] ^= 1
    tokens.write_bytes(bytes(data))
    ShardSplit(root, "train")  # same size: only the checksum can tell
    with pytest.raises(ShardError, match="shard-00001.tokens: sha256 does not match"):
        ShardSplit(root, "train", verify=True)
    tokens.write_bytes(bytes(data[:-2]))
    with pytest.raises(ShardError, match="shard-00001.tokens: .* truncated"):
        ShardSplit(root, "train")
    labels = root / "val" / "shard-00000.labels.npy"
    labels.write_bytes(labels.read_bytes()[:-8] + (99).to_bytes(8, "little"))
    with pytest.raises(ShardError, match="val/shard-00000.labels.npy: sha256"):
        ShardSplit(root, "val", verify=True)
    with pytest.raises(ShardError, match="no split 'test'"):
        ShardSplit(root, "test")
    (root / "manifest.json").write_text("{")
    with pytest.raises(ShardError, match="manifest.json: not a readable manifest"):
        ShardSplit(root, "val")
    with pytest.raises(ShardError, match="manifest.json not found"):
        ShardSplit(tmp_path, "train")


KILL_AFTER_FIRST_SHARD = """
import os, signal, sys
import data_tools.build_shards as b
close = b._ShardWriter._close
def close_then_die(self):
    close(self)
    os.kill(os.getpid(), signal.SIGKILL)
b._ShardWriter._close = close_then_die
sys.exit(b.main(sys.argv[1:]))
"""


def workers_gone(group: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)
    return False


def test_killed_conversion_leaves_no_manifest_and_rerun_succeeds(tmp_path, arrays, palette_file):
    out = tmp_path / "out"
    argv = [str(a) for a in (arrays, "--out", out, "--n-px", 4, "--palette", palette_file, "--shard-size", 5)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", KILL_AFTER_FIRST_SHARD, *argv, "--workers", "2"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert workers_gone(proc.pid), "pool workers outlived the killed conversion"
    [stale] = tmp_path.glob(".out.tmp-*")
    assert (stale / "train" / "shard-00000.tokens").is_file() and not (stale / "manifest.json").exists()
    assert not out.exists()
    assert build(*argv) == 0
    assert len(ShardSplit(out, "train", verify=True)) == 36 and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(
    "make, argv, message",
    [
        (None, ["{tmp}/missing"], "does not exist"),
        ("empty", ["{tmp}/src"], "no image files"),
        ("text", ["{tmp}/src.txt"], "unknown format"),
        ("tree", ["{tmp}/src", "--n-px", "0"], "--n-px 0 must be positive"),
        ("tree", ["{tmp}/src", "--k", "70000"], "--k 70000 is out of range"),
        ("tree", ["{tmp}/src", "--k", "1"], "--k 1 is out of range"),
        ("tree", ["{tmp}/src", "--palette", "{tmp}/bad.npy"], "bad.npy: palette must have shape (k, 3)"),
        ("tree", ["{tmp}/src", "--palette", "{tmp}/nowhere.npy"], "nowhere.npy: cannot read palette"),
        ("npz", ["{tmp}/f.npz"], "must be uint8"),
        ("tree", ["{tmp}/src", "--val-fraction", "1"], "--val-fraction 1.0 must be in [0, 1)"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, make, argv, message):
    (tmp_path / "src").mkdir()
    if make == "tree":
        Image.new("RGB", (4, 4)).save(tmp_path / "src" / "a.png")
    elif make == "text":
        (tmp_path / "src.txt").write_text("hello")
    elif make == "npz":
        np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4), np.float32))
    np.save(tmp_path / "bad.npy", np.zeros((4, 2), np.float32))
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert build(*[a.format(tmp=tmp_path) for a in argv], "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("igpt-build-shards: error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path, arrays, palette_file, capsys):
    out = tmp_path / "out"
    assert build(arrays, "--out", out, "--n-px", 4, "--palette", palette_file) == 0
    first = folder_bytes(out)
    capsys.readouterr()
    assert build(arrays, "--out", out, "--n-px", 2, "--palette", palette_file) == 2
    assert "already holds shards; pass --overwrite" in capsys.readouterr().err
    assert folder_bytes(out) == first
    assert build(arrays, "--out", out, "--n-px", 2, "--palette", palette_file, "--overwrite") == 0
    assert ShardSplit(out).n_px == 2 and [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert build(arrays, "--out", tmp_path / "other", "--palette", palette_file, "--overwrite") == 2
    assert "not empty and holds no manifest.json" in capsys.readouterr().err


def test_inspect_prints_summary_and_writes_png(tmp_path, shards, capsys):
    assert inspect_main([str(shards), "--split", "val", "--n", "3", "--out", str(tmp_path / "g" / "grid.png")]) == 0
    out = capsys.readouterr().out
    assert "val        4 images in 1 shards" in out and "vocabulary 32 colours" in out
    with Image.open(tmp_path / "g" / "grid.png") as png:
        assert png.format == "PNG" and png.width >= 2 * 64
    assert [p.name for p in (tmp_path / "g").iterdir()] == ["grid.png"]
    assert inspect_main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


# --- sampler ---------------------------------------------------------------------------------


def steps(sampler, n):
    return [sampler.next_indices() for _ in range(n)]


def test_rank_blocks_are_disjoint_covering_and_union_to_the_global_batch():
    whole = steps(GlobalBatchSampler(50, 8, 0, 1, seed=3), 20)
    for world in (2, 4):
        per_rank = [steps(GlobalBatchSampler(50, 8, r, world, seed=3), 20) for r in range(world)]
        for s in range(20):
            np.testing.assert_array_equal(np.concatenate([p[s] for p in per_rank]), whole[s])
    first_epoch = np.concatenate(whole)[:50]
    assert sorted(first_epoch) == list(range(50))  # each epoch is a permutation


def test_epochs_wrap_with_fresh_permutations():
    sampler = GlobalBatchSampler(10, 4, 0, 1, seed=0)
    stream = np.concatenate(steps(sampler, 10))  # 40 samples: 4 epochs
    epochs = stream.reshape(4, 10)
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4 and sampler.epoch == 4.0
    np.testing.assert_array_equal(epochs[1], np.random.default_rng([0, 1]).permutation(10))
    plain = GlobalBatchSampler(10, 4, 1, 2, seed=0, shuffle=False)
    assert [list(i) for i in steps(plain, 3)] == [[2, 3], [6, 7], [0, 1]]


def test_resume_continues_identically_on_any_world_size():
    reference = steps(GlobalBatchSampler(30, 6, 0, 1, seed=7), 12)
    saved = [GlobalBatchSampler(30, 6, r, 2, seed=7) for r in range(2)]
    for s in saved:
        steps(s, 5)
    state = saved[0].state_dict()
    assert state["consumed"] == 30 and state == saved[1].state_dict()
    resumed = GlobalBatchSampler(30, 6, 0, 1, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for a, b in zip(steps(resumed, 7), reference[5:], strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchSampler(30, 6, 0, 1, seed=8).load_state_dict(state)


def test_sampler_rejects_bad_layouts():
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(10, 6, 0, 4, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalBatchSampler(10, 4, 2, 2, seed=0)


def test_rank_slices_are_contiguous_disjoint_and_covering():
    for n, world in ((10, 3), (2, 4), (0, 2), (1000, 7)):
        slices = [rank_rows(n, r, world) for r in range(world)]
        assert [i for s in slices for i in s] == list(range(n))
        assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_out_may_be_a_new_folder_several_levels_deep(tmp_path, arrays, palette_file):
    """make demo builds into demo_out/shards on a fresh clone: the folders above --out are made (after the checks)."""
    out = tmp_path / "new" / "deeper" / "shards"
    assert build(arrays, "--out", out, "--n-px", 4, "--palette", palette_file) == 0
    assert len(ShardSplit(out, "train")) == 36
