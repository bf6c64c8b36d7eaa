"""Parquet, Arrow (save_to_disk) and WebDataset sources, and a shard build spread over ranks (data_tools.streams,
data_tools.build_parts): the same images as a folder tree give the same shards; 2 ranks write the bytes 1 does; a
killed build reruns to the same output without redoing finished parts; memory does not grow with the items."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_helpers import (
    build,
    folder_bytes,
    pngs,
    read_all,
    rng_image,
    tar_source,
    write_arrow_dataset,
    write_image_tree,
    write_parquet,
    write_webdataset,
)
from PIL import Image

from data_tools.sources import folder_source

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An image folder of two classes in many formats with 3 undecodable files, plus one image beside the class
    folders (no class): the reference. Returns (root, files in listing order, their labels, the unlabelled one)."""
    root = tmp_path_factory.mktemp("tree") / "src"
    write_image_tree(root)
    orphan = root / "orphan.png"
    Image.fromarray(rng_image(99)).save(orphan)
    split = folder_source(root).splits["train"]
    return root, [Path(p) for p in split.items], [int(v) for v in split.labels], orphan


def tree_rows(tree):
    """The tree's files as source rows (bytes, label), the orphan appended without a label."""
    root, files, labels, orphan = tree
    blobs = [f.read_bytes() for f in files] + [orphan.read_bytes()]
    return [str(f.relative_to(root)) for f in files] + ["orphan.png"], blobs, labels + [None]


@pytest.mark.parametrize("kind", ["parquet", "arrow", "webdataset"])
def test_each_format_gives_the_folder_trees_shards(tmp_path, tree, palette_file, kind):
    keys, blobs, labels = tree_rows(tree)
    if kind == "parquet":
        source = write_parquet(tmp_path / "pq", {"train": (blobs, labels)}, ["cat", "dog"])
    elif kind == "arrow":
        source = write_arrow_dataset(tmp_path / "arrow", {"train": (blobs, labels)}, ["cat", "dog"])
    else:
        source = tmp_path / "wds"
        write_webdataset(source, keys, blobs, labels)
        (tmp_path / "classes.txt").write_text("cat\ndog\n")
    extra = ["--class-names", tmp_path / "classes.txt"] if kind == "webdataset" else []
    args = ["--n-px", 8, "--palette", palette_file, "--val-fraction", 0]
    assert build(tree[0], "--out", tmp_path / "ref", *args) == 0
    assert build(source, "--out", tmp_path / "out", *args, *extra) == 0

    ref, out = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("ref", "out"))
    assert out["class_names"] == ref["class_names"] == ["cat", "dog"]
    assert out["splits"]["train"]["n"] == ref["splits"]["train"]["n"] == len(tree[1]) - 3
    for got, want in zip(read_all(tmp_path / "out"), read_all(tmp_path / "ref"), strict=True):
        np.testing.assert_array_equal(got, want)  # tokens, then labels
    problems = (tmp_path / "out" / "problems.txt").read_text().splitlines()
    reasons = [line.split("\t")[1] for line in problems]
    assert out["skipped"] == len(problems) == 4 == ref["skipped"]
    assert sum("no label" in r for r in reasons) == 1  # the orphan: outside a class folder in the tree
    assert sum("UnidentifiedImageError" in r or "no image member" in r or "OSError" in r for r in reasons) == 3
    names = [line.split("\t")[0] for line in problems]
    assert all(("#" if kind != "webdataset" else ".tar:") in n for n in names)


def test_unknown_labels_json_fields_and_brace_patterns(tmp_path, palette_file):
    blobs = pngs(6)
    labels = ["dog", "cat", "eel", "dog", 1, None]  # eel: no class; None: no label
    write_webdataset(tmp_path / "wds", [f"{i:03d}.png" for i in range(6)], blobs, labels, files=3, label="json")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    pattern = str(tmp_path / "wds" / "shard-{000000..000002}.tar")
    common = ["--n-px", 8, "--palette", palette_file, "--val-fraction", 0, "--class-names", tmp_path / "classes.txt",
              "--label-field", "json.label"]  # fmt: skip
    assert build(pattern, "--out", tmp_path / "a", *common) == 0
    _, got = read_all(tmp_path / "a")
    np.testing.assert_array_equal(got, [1, 0, 1, 1])
    reasons = [line.split("\t")[1] for line in (tmp_path / "a" / "problems.txt").read_text().splitlines()]
    assert reasons == ["unknown label 'eel'", "no label"]
    assert build(str(tmp_path / "wds" / "*.tar"), "--out", tmp_path / "b", *common) == 0
    a, b = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")  # the manifests differ in the source's spelling
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {k: v for k, v in b.items() if k != "manifest.json"}


def test_the_hubs_imagenet_layout_follows_the_papers_splits(tmp_path, palette_file):
    """ImageNet-1k on the Hub: train, validation (labelled), test (every label -1). As with ILSVRC's folders:
    test = validation, val held out of train, the unlabelled test left out."""
    splits = {"train": (pngs(40, 0), [i % 3 for i in range(40)]), "val": (pngs(9, 100), [i % 3 for i in range(9)]),
              "test": (pngs(5, 200), [-1] * 5)}  # fmt: skip
    write_parquet(tmp_path / "pq", splits, ["a", "b", "c"])
    assert build(tmp_path / "pq", "--out", tmp_path / "out", "--n-px", 8, "--palette", palette_file,
                 "--val-fraction", 0.25) == 0  # fmt: skip
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    counts = {s: v["n"] for s, v in m["splits"].items()}
    assert counts["test"] == 9 and counts["train"] + counts["val"] == 40 and 3 <= counts["val"] <= 18
    _, test_labels = read_all(tmp_path / "out", "test")
    np.testing.assert_array_equal(test_labels, [i % 3 for i in range(9)])
    assert "test = the labelled validation split" in m["source"]


def run_build(*argv, env=None, wait=True):
    cmd = [sys.executable, "-m", "data_tools.build_shards", *map(str, argv)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if env is None or k not in env:
            full_env.pop(k, None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    if wait:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    return proc


def test_two_ranks_write_the_bytes_one_does(tmp_path):
    """The palette fitted once (rank 0), parts split over ranks, val held out per image: byte for byte the
    one-process build, at different worker counts too."""
    src = tar_source(tmp_path / "wds", 300, files=5)
    common = ["--n-px", 6, "--k", 8, "--palette-samples", 3000, "--val-fraction", 0.1]
    run_build(src, "--out", tmp_path / "one", "--workers", 1, *common)
    ranks = [run_build(src, "--out", tmp_path / "two", "--workers", 1 + r, *common, wait=False,
                       env={"RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]  # fmt: skip
    for proc in ranks:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    one, two = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "two")
    assert one == two and len([k for k in one if k.endswith(".tokens")]) >= 5 + 5  # a train and a val shard a part
    assert not list(tmp_path.glob(".two*")) and not list(tmp_path.glob(".one*"))  # work folders removed


def test_a_killed_build_reruns_to_the_same_output_without_redoing_parts(tmp_path, palette_file):
    """Rank 0 of 2 converts its parts, then waits for rank 1's, which never come: killed there (SIGKILL), with a
    part half-written by another killed process planted beside them. The rerun, on one process, converts only the
    missing parts (the finished parts' files are the very same files) and equals an uninterrupted build."""
    src = tar_source(tmp_path / "wds", 120, files=4)
    common = ["--n-px", 6, "--palette", palette_file, "--val-fraction", 0.1, "--workers", 1]
    run_build(src, "--out", tmp_path / "ref", *common)
    proc = run_build(src, "--out", tmp_path / "out", *common, wait=False, env={"RANK": "0", "WORLD_SIZE": "2"})
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob(".out.parts-*/part-*"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (work,) = tmp_path.glob(".out.parts-*")
    done = {p.name: p for p in work.glob("part-*")}
    assert sorted(done) == ["part-00000", "part-00002"] and not (tmp_path / "out").exists()
    inodes = {os.stat(f).st_ino for p in done.values() for f in p.rglob("*.tokens")}
    (work / ".part-00001.tmp-elsewhere-1").mkdir()
    (work / ".part-00001.tmp-elsewhere-1" / "junk").write_bytes(b"half")

    run_build(src, "--out", tmp_path / "out", *common)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "ref")
    kept = {os.stat(f).st_ino for f in (tmp_path / "out").rglob("*.tokens")}
    assert inodes <= kept  # the parts finished before the kill were moved into place, not converted again
    assert not list(tmp_path.glob(".out*"))


def test_a_rank_that_fails_stops_rank_0_with_its_reason(tmp_path, palette_file):
    """With --strict, rank 1 stops at an undecodable image of its part; rank 0, waiting for that part, exits too
    with rank 1's reason instead of waiting for ever, and nothing is published."""
    blobs = pngs(8)
    blobs[6] = b"not an image"  # in the second tar: rank 1's
    write_webdataset(tmp_path / "wds", [f"{i:03d}.png" for i in range(8)], blobs, [0, 1] * 4, files=2)
    common = ["--n-px", 6, "--palette", palette_file, "--val-fraction", 0, "--workers", 1, "--strict"]
    ranks = [run_build(tmp_path / "wds", "--out", tmp_path / "out", *common, wait=False,
                       env={"RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]  # fmt: skip
    errors = [proc.communicate(timeout=600)[1] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [2, 2], errors
    assert "rank 1 failed" in errors[0] and "006.png" in errors[0] and "--strict" in errors[0]
    assert len(errors[0].strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def peak_rss_mb(src: Path, out: Path, palette: Path) -> float:
    """Peak RSS (MB) of a one-process, one-worker build of `src`: VmHWM, the peak of the fresh child's own memory
    (getrusage's ru_maxrss would count the pytest process it is forked from). The palette is given with its
    table cached, so the peak is the conversion's, not the table's construction."""
    code = ("import re, sys; from data_tools.build_shards import main; "
            f"rc = main([{str(src)!r}, '--out', {str(out)!r}, '--n-px', '6', '--palette', {str(palette)!r}, "
            "'--workers', '1', '--val-fraction', '0']); "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]); sys.exit(rc)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1]) / 1024


def test_memory_does_not_grow_with_the_items_of_a_tar(tmp_path, palette_file):
    """One tar of 4,000 samples and one of 40,000 (80,000 members): the same peak RSS within a few MB. (tarfile
    keeps every member header it has read: 31 MB more for the larger one (80.6 -> 111.9 MB) if nothing let go of
    them, measured; 77.2 MB for both with.)"""
    small = peak_rss_mb(tar_source(tmp_path / "small", 4_000, files=1), tmp_path / "o1", palette_file)
    large = peak_rss_mb(tar_source(tmp_path / "large", 40_000, files=1), tmp_path / "o2", palette_file)
    assert large < small + 12, (small, large)


def test_each_launcher_tells_a_build_its_rank():
    """srun, Open MPI, MPICH/Intel MPI and torchrun-style variables; Open MPI's win over the Slurm task's that
    mpirun's daemons inherit inside a job (as in igpt_ds.distributed.rank_env)."""
    from igpt_ds.distributed.rank_env import launch_rank

    assert launch_rank({}) == (0, 1)
    assert launch_rank({"SLURM_PROCID": "3", "SLURM_NTASKS": "16"}) == (3, 16)
    assert launch_rank({"PMI_RANK": "1", "PMI_SIZE": "2"}) == (1, 2)
    assert launch_rank({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "OMPI_COMM_WORLD_RANK": "5",
                        "OMPI_COMM_WORLD_SIZE": "8"}) == (5, 8)  # fmt: skip
    assert launch_rank({"RANK": "2", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (2, 4)


def test_what_is_and_is_not_a_streamed_source(tmp_path, tree):
    """Patterns, Parquet/tar folders and save_to_disk folders are; an image tree, a CIFAR tar (compressed or not)
    and a missing reader's message naming the extra are told apart."""
    import tarfile

    from data_helpers import write_cifar

    from data_tools import UserError
    from data_tools.streams import is_stream_spec, need

    gz = write_cifar(tmp_path / "c", tar=True)
    plain = tmp_path / "cifar-10-python.tar"
    with tarfile.open(gz) as src, tarfile.open(plain, "w") as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    assert not is_stream_spec(str(gz)) and not is_stream_spec(str(plain)) and not is_stream_spec(str(tree[0]))
    assert build(plain, "--out", tmp_path / "out", "--n-px", 8, "--k", 4, "--palette-samples", 200) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"].startswith("CIFAR-10")
    write_webdataset(tmp_path / "wds", ["a.png"], pngs(1), [0], files=1)
    assert is_stream_spec(str(tmp_path / "wds")) and is_stream_spec(str(tmp_path / "wds" / "shard-000000.tar"))
    assert is_stream_spec(str(tmp_path / "x-{0..3}.tar"))
    with pytest.raises(UserError, match=r"igpt-ds\[sources\]"):
        need("a_reader_that_is_not_installed")


def _reference(tmp_path, palette_file, n=12):
    """Images 0..n-1 with labels i % 3 as a labelled WebDataset tar built once: the tokens every layout below must
    give."""
    blobs, labels = pngs(n), [i % 3 for i in range(n)]
    write_webdataset(tmp_path / "ref_src", [f"{i:03d}.png" for i in range(n)], blobs, labels, files=1)
    assert build(tmp_path / "ref_src", "--out", tmp_path / "ref", "--n-px", 6, "--palette", palette_file,
                 "--val-fraction", 0) == 0  # fmt: skip
    return blobs, labels, read_all(tmp_path / "ref")


def _parquet(path: Path, columns: dict, schema=None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


@pytest.mark.parametrize("layout", ["binary", "large_binary", "paths_only", "tar_gz", "tgz_folder", "one_arrow",
                                    "json_labels", "train_tar_val_parquet"])  # fmt: skip
def test_every_layout_people_hold_gives_the_same_shards(tmp_path, palette_file, layout):
    """Images as plain or large binary columns, as datasets' paths-only Image cells, in compressed tars, a lone .arrow
    file, labels in a .json member, and splits of different formats: the tokens and labels of the plain tar."""
    import gzip
    import shutil

    import pyarrow as pa

    blobs, labels, (tokens, want) = _reference(tmp_path, palette_file)
    src, extra = tmp_path / "src", []
    if layout in ("binary", "large_binary"):
        kind = pa.binary() if layout == "binary" else pa.large_binary()
        schema = pa.schema([("image", kind), ("label", pa.int64())])
        _parquet(src / "train-0.parquet", {"image": blobs, "label": labels}, schema)
    elif layout == "paths_only":  # what datasets writes for Image() cells cast from local files, unless embedded
        for i, b in enumerate(blobs):
            (src / "img").mkdir(parents=True, exist_ok=True)
            (src / "img" / f"{i}.png").write_bytes(b)
        cells = [{"bytes": None, "path": f"img/{i}.png"} for i in range(len(blobs))]
        _parquet(src / "train-0.parquet", {"image": cells, "label": labels})
    elif layout in ("tar_gz", "tgz_folder"):
        write_webdataset(tmp_path / "plain", [f"{i:03d}.png" for i in range(len(blobs))], blobs, labels, files=2)
        src.mkdir()
        for tar in sorted((tmp_path / "plain").iterdir()):
            name = tar.stem + (".tar.gz" if layout == "tar_gz" else ".tgz")
            with open(tar, "rb") as f, gzip.open(src / name, "wb") as g:
                shutil.copyfileobj(f, g)
        src = str(src / "*.tar.gz") if layout == "tar_gz" else src
    elif layout == "one_arrow":
        table = pa.table({"image": [{"bytes": b, "path": None} for b in blobs], "label": labels})
        src.mkdir()
        with (
            pa.OSFile(str(src / "data-00000-of-00001.arrow"), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as w,
        ):
            w.write_table(table)
        src = src / "data-00000-of-00001.arrow"
    elif layout == "json_labels":  # no .cls: a .json "label" field is found by itself
        write_webdataset(src, [f"{i:03d}.png" for i in range(len(blobs))], blobs, labels, files=1, label="json")
    else:  # train's files are tars, val's a Parquet file: each split's columns are its own
        write_webdataset(src / "train", [f"{i:03d}.png" for i in range(8)], blobs[:8], labels[:8], files=1)
        _parquet(tmp_path / "val.parquet", {"image": [{"bytes": b, "path": None} for b in blobs[8:]],
                                            "label": labels[8:]})  # fmt: skip
        src, extra = None, ["--train", tmp_path / "src" / "train", "--val", tmp_path / "val.parquet"]
    args = ([src] if src is not None else []) + [*extra, "--out", tmp_path / "out", "--n-px", 6]
    assert build(*args, "--palette", palette_file, "--val-fraction", 0) == 0
    if layout == "train_tar_val_parquet":
        got = [np.concatenate(pair) for pair in zip(read_all(tmp_path / "out"), read_all(tmp_path / "out", "val"),
                                                    strict=True)]  # fmt: skip
    else:
        got = read_all(tmp_path / "out")
    np.testing.assert_array_equal(got[0], tokens)
    np.testing.assert_array_equal(got[1], want)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"] == 0


def test_split_words_in_tar_names_and_unlabelled_first_samples(tmp_path, palette_file):
    """train-/validation-/test- tars are those splits; a labelled source whose first sample lacks its .cls is still
    labelled, that sample a problem."""
    for split, n in (("train", 9), ("validation", 4), ("test", 3)):
        labels = [None if (split, i) == ("train", 0) else i % 2 for i in range(n)]
        write_webdataset(tmp_path / "src", [f"{split}{i:03d}.png" for i in range(n)], pngs(n), labels, files=1)
        (tmp_path / "src" / "shard-000000.tar").rename(tmp_path / "src" / f"{split}-000000.tar")
    assert build(tmp_path / "src", "--out", tmp_path / "out", "--n-px", 6, "--palette", palette_file) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {s: v["n"] for s, v in m["splits"].items()} == {"train": 8, "val": 4, "test": 3}
    assert (tmp_path / "out" / "problems.txt").read_text().endswith("train000.png\tno label\n")
    np.testing.assert_array_equal(read_all(tmp_path / "out")[1], [1, 0, 1, 0, 1, 0, 1, 0])


@pytest.mark.parametrize("cut", ["at_a_member", "inside_a_member"])
def test_a_truncated_tar_is_a_problem_and_stops_strict(tmp_path, palette_file, cut, capsys):
    write_webdataset(tmp_path / "src", [f"{i:03d}.png" for i in range(10)], pngs(10), [0] * 10, files=1)
    tar = tmp_path / "src" / "shard-000000.tar"
    data = tar.read_bytes()
    import tarfile

    with tarfile.open(tar) as t:
        sixth = t.getmembers()[12]  # sample 6's image: its header starts at offset, its data at offset_data
    tar.write_bytes(data[: sixth.offset if cut == "at_a_member" else sixth.offset_data + 20])
    assert build(tmp_path / "src", "--out", tmp_path / "out", "--n-px", 6, "--palette", palette_file,
                 "--val-fraction", 0) == 0  # fmt: skip
    problems = (tmp_path / "out" / "problems.txt").read_text().splitlines()
    assert len(problems) == 1 and "cannot be read past here" in problems[0], problems
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["n"] in (5, 6)
    capsys.readouterr()
    assert build(tmp_path / "src", "--out", tmp_path / "strict", "--n-px", 6, "--palette", palette_file,
                 "--strict") == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be read past here" in err[0] and "--strict" in err[0], err
    assert not (tmp_path / "strict").exists()


def test_layouts_that_cannot_be_read_as_given_are_refused_in_one_line(tmp_path, palette_file, capsys):
    """Each: exit 2, one line naming the file or flag and what to do, nothing written."""
    import pyarrow as pa

    blobs = pngs(4)
    struct = [{"bytes": b, "path": None} for b in blobs]
    _parquet(tmp_path / "schema" / "train-0.parquet", {"image": struct, "label": [0, 1, 0, 1]})
    _parquet(tmp_path / "schema" / "train-1.parquet", {"img": struct, "target": [0, 1, 0, 1]})
    _parquet(tmp_path / "text" / "train-0.parquet", {"image": struct, "label": ["cat", "dog", "cat", "dog"]})
    write_webdataset(tmp_path / "mixed", ["a.png"], blobs[:1], [0], files=1)
    _parquet(tmp_path / "mixed" / "train-0.parquet", {"image": struct, "label": [0, 1, 0, 1]})
    dd = write_arrow_dataset(tmp_path / "dd", {"train": (blobs, [0, 1, 0, 1]), "test": (blobs, [0, 1, 0, 1])})
    _parquet(
        tmp_path / "empty" / "train-0.parquet", {"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())}
    )
    cases = {
        "train-1.parquet: no column 'image'": [tmp_path / "schema"],
        "holds class names as text; give --class-names": [tmp_path / "text"],
        "holds parquet and tar files": [tmp_path / "mixed"],
        "holds the splits ['test', 'train']; give it as SOURCE": [
            "--train",
            dd,
            "--val",
            tmp_path / "schema" / "train-0.parquet",
        ],
        "train files hold no images": [tmp_path / "empty"],
    }
    for i, (message, source) in enumerate(cases.items()):
        capsys.readouterr()
        assert build(*source, "--out", tmp_path / f"out{i}", "--n-px", 6, "--k", 4) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (message, err)
        assert not (tmp_path / f"out{i}").exists()
