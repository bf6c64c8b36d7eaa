"""data_tools sources and image conversion: every source type through the shard builder."""

import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from data_helpers import build, folder_bytes, read_all, write_cifar, write_image_tree
from PIL import Image

from data_tools import UserError
from data_tools.images import load_rgb, square, to_rgb
from data_tools.sources import folder_source, open_source
from igpt_ds.data import palette as P
from igpt_ds.data.shards import ShardSplit


def expected_tokens(images, palette_file, n_px):
    lut = P.palette_lut(P.load_palette(palette_file), palette_file)
    return np.stack([P.encode(load_rgb(im, n_px), lut).reshape(-1) for im in images]).astype(np.int64)


def test_image_tree_gives_labels_and_reports_bad_files(tmp_path, palette_file, capsys):
    bad = write_image_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert build(tmp_path / "src", "--out", out, "--n-px", 8, "--palette", palette_file, "--val-fraction", 0) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] == ["cat", "dog"] and manifest["skipped"] == 3
    assert list(manifest["splits"]) == ["train"]
    problems = (out / "problems.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in problems) == sorted(str(p) for p in bad.values())
    good = [p for p in folder_source(tmp_path / "src").splits["train"].items if p not in map(str, bad.values())]
    tokens, labels = read_all(out)
    np.testing.assert_array_equal(tokens, expected_tokens(good, palette_file, 8))
    np.testing.assert_array_equal(labels, [0] * 6 + [1] * 6)  # nested/ files keep their class

    capsys.readouterr()
    assert build(tmp_path / "src", "--out", tmp_path / "strict", "--palette", palette_file, "--strict") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt.jpg" in err[0] and "--strict" in err[0]
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict*"))


def test_flat_folder_is_unlabelled_and_split_folders_are_splits(tmp_path):
    Image.new("RGB", (5, 5), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    flat = folder_source(tmp_path)
    assert flat.class_names == [] and list(flat.splits["train"].labels) == [-1] and not flat.problems

    root = tmp_path / "tree"
    for split, names in {"train": ["x", "y"], "val": [""], "test": ["y"]}.items():
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            Image.new("L", (4, 6), 9).save(root / split / name / "img.png")
    (root / "train" / "stray.png").write_bytes(b"")
    src = folder_source(root)
    assert src.class_names == ["x", "y"] and list(src.splits) == ["train", "val", "test"]
    assert [list(src.splits[s].labels) for s in src.splits] == [[0, 1], [-1], [1]]
    assert src.problems == [(str(root / "train" / "stray.png"), "not inside a class folder")]


def test_image_modes_become_rgb_sensibly():
    def rgb(img):
        return np.asarray(to_rgb(img))

    grey = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    assert (rgb(grey) == np.asarray(grey)[..., None]).all()  # replicated
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert (rgb(rgba) == 255).all()  # transparent: white background
    half = rgb(Image.new("LA", (1, 1), (0, 128)))
    assert (half == 127).all()
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 200, 100, 50])
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    np.testing.assert_array_equal(rgb(p), [[[255, 255, 255], [200, 100, 50]]])
    assert rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).tolist() == [[[255, 255, 255]]]
    sixteen = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert sixteen.mode.startswith("I;16") and rgb(sixteen)[..., 0].tolist() == [[0, 100, 255]]
    assert rgb(sixteen.convert("I"))[..., 1].tolist() == [[0, 100, 255]]
    assert rgb(Image.new("1", (1, 1), 1)).tolist() == [[[255, 255, 255]]]


@pytest.mark.parametrize("mode", ["center-crop", "short-side"])
def test_square_keeps_the_centre(mode):
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :, 2] = 255
    wide[:, 8:22] = (255, 0, 0)  # a red centre wider than the crop, blue sides
    out = np.asarray(square(Image.fromarray(wide), 5, mode))
    assert out.shape == (5, 5, 3) and (out == (255, 0, 0)).all()
    same = np.asarray(square(Image.fromarray(wide[:, :10]), 10, mode))
    np.testing.assert_array_equal(same, wide[:, :10])  # already n_px²: untouched


def cifar_images(batch_bytes: bytes) -> tuple[np.ndarray, list[int]]:
    d = pickle.loads(batch_bytes, encoding="bytes")
    return d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), d.get(b"labels", d.get(b"fine_labels"))


def test_cifar10_folder_and_tar_give_the_same_shards(tmp_path, palette_file):
    folder = write_cifar(tmp_path / "dir", "10")
    tar = write_cifar(tmp_path / "tar", "10", tar=True)
    for src, out in ((folder, "a"), (tmp_path / "dir", "b"), (tar, "c")):
        assert build(src, "--out", tmp_path / out, "--palette", palette_file, "--val-fraction", 0) == 0
    files = [folder_bytes(tmp_path / out) for out in "abc"]
    for f in files:
        f.pop("manifest.json")
    assert files[0] == files[1] == files[2]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["class_names"] == [f"c{i}" for i in range(10)]
    assert {s: v["n"] for s, v in manifest["splits"].items()} == {"train": 15, "test": 3}
    batches = [cifar_images((folder / f"data_batch_{i}").read_bytes()) for i in range(1, 6)]
    tokens, labels = read_all(tmp_path / "c")
    np.testing.assert_array_equal(tokens, expected_tokens(np.concatenate([b[0] for b in batches]), palette_file, 32))
    np.testing.assert_array_equal(labels, sum((b[1] for b in batches), []))
    test_images, test_labels = cifar_images((folder / "test_batch").read_bytes())
    tokens, labels = read_all(tmp_path / "c", "test")
    np.testing.assert_array_equal(tokens, expected_tokens(test_images, palette_file, 32))
    np.testing.assert_array_equal(labels, test_labels)


def test_cifar100_uses_fine_labels_and_holds_out_val(tmp_path, palette_file):
    tar = write_cifar(tmp_path, "100", per_batch=20, tar=True)
    assert build(tar, "--out", tmp_path / "out", "--n-px", 8, "--palette", palette_file) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["class_names"]) == 100 and manifest["class_names"][3] == "f3"
    assert {s: v["n"] for s, v in manifest["splits"].items()} == {"train": 18, "val": 2, "test": 20}
    with tarfile.open(tar) as t:
        _, fine = cifar_images(t.extractfile("cifar-100-python/train").read())
    merged = np.concatenate([read_all(tmp_path / "out", s)[1] for s in ("train", "val")])
    assert sorted(merged) == sorted(fine)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    folder = write_cifar(tmp_path, "10")
    (folder / "batches.meta").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(UserError, match="os.system is not allowed"):
        open_source(str(folder))


def test_npz_and_npy_sources(tmp_path, palette_file):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(20) % 4, class_names=np.array(list("abcd")))
    assert build(tmp_path / "d.npz", "--out", tmp_path / "o1", "--n-px", 6, "--palette", palette_file) == 0
    assert ShardSplit(tmp_path / "o1").class_names == list("abcd")
    every = expected_tokens(images, palette_file, 6).tolist()
    rows = {}
    for split in ("train", "val"):
        tokens, labels = read_all(tmp_path / "o1", split)
        rows[split] = [every.index(t) for t in tokens.tolist()]
        assert rows[split] == sorted(rows[split]) and labels.tolist() == [i % 4 for i in rows[split]]
    assert len(rows["val"]) == 2 and sorted(rows["train"] + rows["val"]) == list(range(20))

    np.save(tmp_path / "g.npy", images[:5, :, :, 0])
    np.savez(tmp_path / "s.npz", train_images=images[:5], test_images=images[5:8, :, :, :1], test_labels=[1, 2, 3])
    assert build(tmp_path / "g.npy", "--out", tmp_path / "o2", "--palette", palette_file, "--val-fraction", 0) == 0
    assert build(tmp_path / "s.npz", "--out", tmp_path / "o3", "--n-px", 6, "--palette", palette_file) == 0
    assert (read_all(tmp_path / "o2")[1] == -1).all()
    tokens, labels = read_all(tmp_path / "o3", "test")
    np.testing.assert_array_equal(tokens, expected_tokens(images[5:8, :, :, :1], palette_file, 6))
    assert labels.tolist() == [1, 2, 3]


def test_digits_split_is_stratified_and_round_trips_exactly(tmp_path):
    src = open_source("digits")
    assert {s: len(v) for s, v in src.splits.items()} == {"train": 1257, "val": 180, "test": 360}
    assert all(set(v.labels) == set(range(10)) for v in src.splits.values())
    index = np.concatenate([v.index for v in src.splits.values()])
    assert sorted(index) == list(range(1797))
    assert build("digits", "--out", tmp_path / "out", "--n-px", 8) == 0
    s = ShardSplit(tmp_path / "out", "test", verify=True)
    tokens, labels = s.batch(np.arange(len(s)))
    grey = src.splits["test"].take(0, len(s))  # (360, 8, 8): 17 grey levels, all in the palette
    rgb = np.repeat(grey[..., None], 3, axis=-1).reshape(360, 64, 3)
    np.testing.assert_array_equal(P.decode(tokens, s.palette), rgb)
    np.testing.assert_array_equal(labels, src.splits["test"].labels)


# --- what the images mean: links, metadata, names (each kind with a hand-built tree) ---------------------------


def solid(path, colour, size=(8, 8)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_links_and_loops_read_each_image_once_and_never_relabel(tmp_path, palette_file):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    for d in (src / "cat", src / "dog", elsewhere / "birds"):
        d.mkdir(parents=True)
    solid(src / "cat" / "c.png", (255, 0, 0))
    solid(src / "dog" / "d.png", (0, 0, 255))
    solid(elsewhere / "birds" / "b.png", (0, 255, 0))
    (src / "cat" / "up").symlink_to("..")  # a loop back to the root: would reach dog/ from inside cat/
    (src / "dog" / "again.png").hardlink_to(src / "dog" / "d.png")  # one file, two names
    (src / "dog" / "cat_link.png").symlink_to(src / "cat" / "c.png")  # a link into another class
    (src / "bird").symlink_to(elsewhere / "birds")  # a class folder that is a link: followed
    out = tmp_path / "out"
    assert build(src, "--out", out, "--n-px", 8, "--palette", palette_file, "--val-fraction", 0) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    _, labels = read_all(out)
    assert manifest["class_names"] == ["bird", "cat", "dog"] and sorted(labels.tolist()) == [0, 1, 2]
    problems = dict(line.split("\t") for line in (out / "problems.txt").read_text().splitlines())
    dog = src / "dog"
    assert set(problems) == {str(src / "cat" / "up"), str(dog / "d.png"), str(dog / "cat_link.png")}
    assert "not followed" in problems[str(src / "cat" / "up")]
    assert problems[str(dog / "d.png")] == f"the same file as {dog / 'again.png'}: read once"  # first in order
    assert "another class folder" in problems[str(src / "dog" / "cat_link.png")]


def test_exif_orientation_is_applied_as_viewers_do(tmp_path):
    """Stored top red / bottom blue with orientation 6 ("rotate 90° clockwise to view"): shown left blue, right red."""
    stored = np.zeros((32, 32, 3), np.uint8)
    stored[:16] = (255, 0, 0)
    stored[16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = load_rgb(str(tmp_path / "phone.jpg"), 8).astype(int)
    assert (abs(shown[:, :3] - (0, 0, 255)).max(), abs(shown[:, 5:] - (255, 0, 0)).max()) < (40, 40), shown[4]
    # The same bytes held in a Parquet cell or a tar member (data_tools.streams) are shown the same way.
    np.testing.assert_array_equal(load_rgb((tmp_path / "phone.jpg").read_bytes(), 8), shown)


def linear_rgb_profile() -> bytes:
    """sRGB's primaries with a linear tone curve (gamma 1): littlecms's sRGB profile, TRC tags rewritten."""
    import struct

    from PIL import ImageCms

    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (n_tags,) = struct.unpack(">I", icc[128:132])
    for i in range(n_tags):
        entry = 132 + 12 * i
        sig, offset, _ = struct.unpack(">4sII", icc[entry : entry + 12])
        if sig in (b"rTRC", b"gTRC", b"bTRC"):
            curve = b"curv" + bytes(4) + struct.pack(">IH", 1, 0x0100)  # one entry: gamma 1.0 (u8Fixed8)
            icc[offset : offset + len(curve)] = curve
            icc[entry + 8 : entry + 12] = struct.pack(">I", len(curve))
    return bytes(icc)


def test_an_embedded_colour_profile_is_applied(tmp_path):
    """Values stored in a linear-light profile are shown (and must be quantised) as sRGB: the sRGB transfer
    function of the stored values, not the stored values."""
    from PIL import ImageCms

    raw = np.full((8, 8, 3), (200, 120, 40), np.uint8)
    Image.fromarray(raw).save(tmp_path / "linear.png", icc_profile=linear_rgb_profile())
    Image.fromarray(raw).save(tmp_path / "srgb.png", icc_profile=ImageCms.ImageCmsProfile(
        ImageCms.createProfile("sRGB")).tobytes())  # fmt: skip
    c = raw / 255.0
    srgb_of_linear = 255 * np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)
    assert abs(load_rgb(str(tmp_path / "linear.png"), 8) - srgb_of_linear).max() <= 2
    assert abs(load_rgb((tmp_path / "linear.png").read_bytes(), 8) - srgb_of_linear).max() <= 2  # as bytes too
    assert abs(load_rgb(str(tmp_path / "srgb.png"), 8).astype(int) - raw).max() <= 1  # sRGB into sRGB: unchanged


def test_names_that_are_not_utf8_round_trip_and_never_crash(tmp_path, palette_file, capsys):
    src = tmp_path / "src"
    src.mkdir()
    solid(src / "good.png", (10, 200, 30))
    bad = os.path.join(os.fsencode(src), b"bad_\xff.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "out"
    assert build(src, "--out", out, "--n-px", 8, "--palette", palette_file, "--val-fraction", 0) == 0
    (line,) = (out / "problems.txt").read_bytes().splitlines()
    name = line.split(b"\t")[0]
    assert name == bad and os.path.exists(name)  # the listed name opens that very file
    json.loads((out / "manifest.json").read_text())  # still valid JSON
    assert build(src, "--out", tmp_path / "strict", "--palette", palette_file, "--strict") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad_\\xff.png" in err[0]
    # A class folder whose name is not UTF-8: a valid manifest, a class name that maps back to the folder.
    tree = tmp_path / "tree"
    for name in (b"caf\xe9", b"dog"):
        folder = os.path.join(os.fsencode(tree), name)
        os.makedirs(folder)
        solid(os.path.join(os.fsdecode(folder), "x.png"), (1, 2, 3))
    assert build(tree, "--out", tmp_path / "named", "--n-px", 8, "--palette", palette_file, "--val-fraction", 0) == 0
    names = json.loads((tmp_path / "named" / "manifest.json").read_text())["class_names"]
    assert [os.fsencode(n) for n in names] == [b"caf\xe9", b"dog"]
    from data_tools.inspect_shards import main as inspect_main

    assert inspect_main([str(tmp_path / "named"), "--out", str(tmp_path / "grid.png")]) == 0
    assert "caf\\xe9" in capsys.readouterr().out


def ilsvrc_tree(root, synsets=("n01440764", "n01443537", "n01484850"), per_class=5, n_val=6):
    """A tiny ILSVRC tree: train/<synset>/*.JPEG, the flat val/*.JPEG, and val's labels (synset of each file)."""
    val_labels = {}
    for k, synset in enumerate(synsets):
        (root / "train" / synset).mkdir(parents=True)
        for i in range(per_class):
            solid(root / "train" / synset / f"{synset}_{i}.JPEG", (80 * k, 10 * i, 200 - 60 * k))
    (root / "val").mkdir()
    for i in range(n_val):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        solid(root / "val" / name, (40 * i, 100, 50))
        val_labels[name] = synsets[(i * 2) % len(synsets)]
    return val_labels


@pytest.mark.parametrize("kind", ["csv", "kaggle", "devkit"])
def test_imagenet_layout_train_val_held_out_test_is_ilsvrc_val(tmp_path, palette_file, kind):
    truth = ilsvrc_tree(tmp_path / "imagenet")
    synsets = ["n01440764", "n01443537", "n01484850"]
    if kind == "csv":
        labels = tmp_path / "val_labels.csv"
        labels.write_text("file,label\n" + "".join(f"{f},{s}\n" for f, s in reversed(truth.items())))
    elif kind == "kaggle":
        labels = tmp_path / "LOC_val_solution.csv"
        labels.write_text("ImageId,PredictionString\n" + "".join(
            f"{f.removesuffix('.JPEG')},{s} 1 2 3 4 {s} 5 6 7 8\n" for f, s in truth.items()))  # fmt: skip
    else:
        from scipy.io import savemat

        devkit = tmp_path / "devkit"
        devkit.mkdir()
        ids = {s: 100 + k for k, s in enumerate(synsets)}  # the devkit numbers synsets its own way
        records = np.array([(i, s) for s, i in ids.items()], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
        savemat(devkit / "meta.mat", {"synsets": records})
        labels = devkit / "ILSVRC2012_validation_ground_truth.txt"
        labels.write_text("".join(f"{ids[truth[f]]}\n" for f in sorted(truth)))
    out = tmp_path / "out"
    assert build(tmp_path / "imagenet", "--out", out, "--n-px", 8, "--palette", palette_file,
                 "--test-labels", labels, "--val-fraction", 0.2) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] == synsets  # synset ids, sorted: a stable order
    assert {s: e["n"] for s, e in manifest["splits"].items()} == {"train": 12, "val": 3, "test": 6}
    _, test_labels = read_all(out, "test")
    assert [synsets[k] for k in test_labels] == [truth[f] for f in sorted(truth)]
    assert (read_all(out, "val")[1] >= 0).all()  # held out of labelled train


def test_imagenet_labels_that_are_no_class_or_missing_files(tmp_path, palette_file, capsys):
    truth = ilsvrc_tree(tmp_path / "imagenet")
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{f},{s}\n" for f, s in list(truth.items())[1:]))  # the first file has no label
    out = tmp_path / "out"
    assert build(tmp_path / "imagenet", "--out", out, "--palette", palette_file, "--n-px", 8,
                 "--test-labels", labels) == 0  # fmt: skip
    assert json.loads((out / "manifest.json").read_text())["splits"]["test"]["n"] == 5
    assert f"no label in {labels}" in (out / "problems.txt").read_text()
    labels.write_text("ILSVRC2012_val_00000001.JPEG,n99999999\n")
    capsys.readouterr()
    assert build(tmp_path / "imagenet", "--out", tmp_path / "o2", "--palette", palette_file,
                 "--test-labels", labels) == 2  # fmt: skip
    assert "['n99999999'] are no class folder of train/" in capsys.readouterr().err


def test_one_source_per_split_and_inspect_counts_labels(tmp_path, palette_file, capsys):
    rng = np.random.default_rng(0)
    images = lambda n: rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=images(10), labels=np.arange(10) % 3)
    np.savez(tmp_path / "test.npz", images=images(4), labels=np.array([2, 2, 1, 0]))
    out = tmp_path / "out"
    assert build("--train", tmp_path / "train.npz", "--test", tmp_path / "test.npz", "--out", out, "--n-px", 6,
                 "--palette", palette_file, "--val-fraction", 0) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s: e["n"] for s, e in manifest["splits"].items()} == {"train": 10, "test": 4}
    np.testing.assert_array_equal(read_all(out, "test")[1], [2, 2, 1, 0])
    from data_tools.inspect_shards import main as inspect_main

    capsys.readouterr()
    assert inspect_main([str(out), "--out", str(tmp_path / "grid.png")]) == 0
    text = capsys.readouterr().out
    assert "train      10 images in 1 shards; 3 labels (0: 4, 1: 3, 2: 3)" in text, text
    assert "test       4 images in 1 shards; 3 labels (0: 1, 1: 1, 2: 2)" in text
    assert build(tmp_path / "train.npz", "--test", tmp_path / "test.npz", "--out", tmp_path / "x") == 2
    assert "--val/--test go with --train" in capsys.readouterr().err


def test_mnist5k_is_mlxtends_5000_digits_split_70_10_20():
    """The study's dataset (docs/studies/mnist5k.md): 28x28 greyscale, 500 per class, stratified splits."""
    source = open_source("mnist5k")
    assert source.class_names == [str(d) for d in range(10)]
    sizes = {k: len(s.labels) for k, s in source.splits.items()}
    assert sizes == {"train": 3500, "val": 500, "test": 1000}
    for split in source.splits.values():
        assert (np.bincount(split.labels, minlength=10) == len(split.labels) // 10).all()
    images = source.splits["test"].take(0, 4)
    assert images.shape == (4, 28, 28) and images.dtype == np.uint8 and images.max() > 200  # white ink on black
