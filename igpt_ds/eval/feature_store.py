"""The on-disk layout of extracted features: sharded by rank, written by one process a file, resumable.

    <out>/<split>/plan.json                 what is extracted, from what, and the part layout (written first)
                  parts/00000/features.npy  float32 (n_extracted_layers, rows, n_embd), whatever the compute dtype
                              pixels.npy    uint8 (rows, n_px²·channels) palette-decoded pixels (raw baseline);
                                            channels = 1 when every palette colour is grey, else 3
                  labels.npy                int64 (n,)
                  index.json                written last: the split is complete; parts, layers, dims, classes

A split's rows are cut into parts of `part_rows` rows (a multiple of the batch size, chosen from the split's
size alone: `part_rows_for`). A part is written by one process into files of its own, built under a
temporary name and renamed into place when whole, so no two ranks ever write one file and no page is shared
between nodes (NFS and Lustre clients write pages back whole: two clients writing different rows of one page
can zero each other's rows). `FeatureSplit` reads rows of a layer or of the pixels across parts with plain
file reads. `write_features` writes the layout from any source of rows (synthetic features, tests, bench).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from igpt_ds.atomic import write_text
from igpt_ds.config import ConfigError
from igpt_ds.data.shards import ShardSplit

FORMAT_VERSION = 2
INDEX_FILE = "index.json"
PLAN_FILE = "plan.json"
LABELS_FILE = "labels.npy"
PARTS_DIR = "parts"
FEATURES_FILE = "features.npy"
PIXELS_FILE = "pixels.npy"
MAX_PARTS = 4096
"""A split is cut into at most about this many parts: enough for 1024 ranks to share evenly, few enough
files for a parallel filesystem."""


def part_rows_for(n: int, batch_size: int) -> int:
    """Rows per part: the smallest multiple of `batch_size` that cuts `n` rows into at most MAX_PARTS parts.
    A function of the split and batch size only, never of the world size, so parts (and the batches inside
    them) are the same however many ranks extract, and a rerun at another world size keeps finished parts."""
    return batch_size * max(1, math.ceil(n / (batch_size * MAX_PARTS)))


def part_name(p: int) -> str:
    return f"{p:05d}"


def pixel_channels(palette: np.ndarray) -> int:
    """1 when every palette colour is grey (R = G = B: a greyscale dataset stored as RGB), else 3."""
    palette = np.asarray(palette)
    return 1 if np.array_equal(palette, palette[:, :1].repeat(3, axis=1)) else 3


def split_plan(split: ShardSplit, layers: list[int], dim: int, batch_size: int, source: dict[str, Any]) -> dict:
    """What a split's extraction produces and from what: equal plans mean a rerun may keep finished parts."""
    shards = split.manifest["splits"][split.split]["shards"]
    shard_files = [{k: s[k] for k in ("tokens", "n", "sha256")} for s in shards]
    return {
        "format_version": FORMAT_VERSION,
        "split": split.split,
        "n": len(split),
        "dim": dim,
        "layers": layers,
        "seq_len": split.seq_len,
        "channels": pixel_channels(split.palette),
        "batch_size": batch_size,
        "part_rows": part_rows_for(len(split), batch_size),
        "source": source,
        "shards": {"root": str(split.root.resolve()), "files": shard_files},
    }


def prepare_split(out_dir: Path, plan: dict) -> str:
    """Rank 0: make `out_dir` ready for `plan`; 'done' (complete, nothing to do), 'resume' or 'new'.
    A folder made for another plan is renamed aside (deleted by `finish_split`), so no rank reuses its parts."""
    if (out_dir / PLAN_FILE).is_file():
        if json.loads((out_dir / PLAN_FILE).read_text()) == plan:
            return "done" if (out_dir / INDEX_FILE).is_file() else "resume"
    if out_dir.exists():
        out_dir.rename(out_dir.with_name(f".{out_dir.name}.stale-{os.getpid()}-{time.time_ns()}"))
    (out_dir / PARTS_DIR).mkdir(parents=True)
    write_text(out_dir / PLAN_FILE, json.dumps(plan, indent=1) + "\n")
    return "new"


@contextlib.contextmanager
def part_writer(out_dir: Path, p: int, plan: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features (n_layers, rows, dim) float32, pixels (rows, seq_len·channels) uint8) memory maps of part `p`,
    to fill; the part appears under its name only if the block succeeds. The files are this process's own."""
    parts_dir, part_rows = out_dir / PARTS_DIR, plan["part_rows"]
    rows = min(plan["n"], (p + 1) * part_rows) - p * part_rows
    tmp = parts_dir / f".{part_name(p)}.{socket.gethostname()}-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        open_memmap = np.lib.format.open_memmap
        feats = open_memmap(tmp / FEATURES_FILE, "w+", np.float32, (len(plan["layers"]), rows, plan["dim"]))
        pixels = open_memmap(tmp / PIXELS_FILE, "w+", np.uint8, (rows, plan["seq_len"] * plan["channels"]))
        yield feats, pixels
        feats.flush()
        pixels.flush()
        del feats, pixels
        try:
            tmp.rename(parts_dir / part_name(p))
        except OSError:  # the part appeared meanwhile (an earlier run's straggler): it holds the same rows
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def missing_parts(out_dir: Path, plan: dict, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's parts (p mod world = rank) that are not written yet."""
    n_parts = math.ceil(plan["n"] / plan["part_rows"])
    return [p for p in range(rank, n_parts, world) if not (out_dir / PARTS_DIR / part_name(p)).is_dir()]


def finish_split(
    out_dir: Path,
    plan: dict,
    labels: np.ndarray,
    class_names: list[str],
    metadata: dict,
    timeout_s: float,
    poll_s: float = 2.0,
) -> None:
    """Rank 0: wait until every part exists (polling the filesystem: other ranks may still be computing, and
    nobody waits inside a collective), then write the labels and the index. Fails if no new part appeared for
    `timeout_s` seconds (a rank died); a rerun keeps every finished part."""
    parts_dir, n_parts = out_dir / PARTS_DIR, math.ceil(plan["n"] / plan["part_rows"])
    names = [part_name(p) for p in range(n_parts)]
    last_progress, seen = time.monotonic(), -1
    with tqdm(total=n_parts, desc=f"{out_dir.name}: parts written by all ranks", unit="part") as bar:
        while True:
            have = sum((parts_dir / name).is_dir() for name in names)
            bar.update(have - bar.n)
            if have == n_parts:
                break
            if have != seen:
                last_progress, seen = time.monotonic(), have
            elif time.monotonic() - last_progress > timeout_s:
                raise RuntimeError(
                    f"{parts_dir}: {n_parts - have} of {n_parts} parts missing and none written for {timeout_s:.0f} s "
                    "(a rank stopped?); rerun the same command to finish them"
                )
            time.sleep(poll_s)
    for leftover in [*parts_dir.glob(".*.tmp"), *out_dir.parent.glob(f".{out_dir.name}.stale-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    np.save(out_dir / LABELS_FILE, np.asarray(labels, dtype=np.int64))
    part_rows = plan["part_rows"]
    index = {
        **{k: plan[k] for k in ("format_version", "split", "n", "dim", "layers", "channels", "part_rows", "source")},
        "parts": [[name, p * part_rows, min(plan["n"], (p + 1) * part_rows)] for p, name in enumerate(names)],
        "pixels_dim": plan["seq_len"] * plan["channels"],
        "class_names": list(class_names),
        **metadata,
    }
    write_text(out_dir / INDEX_FILE, json.dumps(index, indent=1) + "\n")


def write_features(
    out_dir: str | Path,
    n: int,
    layers: list[int],
    dim: int,
    rows: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
    labels: np.ndarray,
    seq_len: int,
    channels: int,
    metadata: dict,
    class_names: list[str] = (),
    part_rows: int = 4096,
) -> Path:
    """Write a split in the extracted layout from any source of rows, one part at a time (one process):
    `rows(start, stop)` gives (features (len(layers), stop - start, dim), pixels (stop - start, seq_len·channels)).
    For features computed elsewhere and synthetic ones (tests, bench/probe_scale.py). `metadata` must name
    `n_layer`. Returns `out_dir`."""
    out_dir = Path(out_dir)
    plan = {"format_version": FORMAT_VERSION, "split": out_dir.name, "n": n, "dim": dim, "layers": list(layers),
            "seq_len": seq_len, "channels": channels, "batch_size": part_rows, "part_rows": part_rows,
            "source": metadata.get("source", "written by write_features")}  # fmt: skip
    prepare_split(out_dir, plan)
    for p in missing_parts(out_dir, plan):
        start, stop = p * part_rows, min(n, (p + 1) * part_rows)
        with part_writer(out_dir, p, plan) as (feats, pixels):
            feats[:], pixels[:] = rows(start, stop)
    finish_split(out_dir, plan, labels, list(class_names), metadata, timeout_s=0)
    return out_dir


class FeatureSplit:
    """Read side of one extracted split: rows of a layer's features or of the pixels, copied out of the
    parts that hold them; labels; the index (`meta`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / INDEX_FILE).is_file():
            if (self.path / "meta.json").is_file():
                raise ConfigError(f"{self.path} holds features in an older layout; rerun extract_features")
            raise ConfigError(f"{self.path} holds no extracted features ({INDEX_FILE} missing); run extract_features")
        self.meta: dict[str, Any] = json.loads((self.path / INDEX_FILE).read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{self.path / INDEX_FILE}: format_version {self.meta.get('format_version')}; rerun "
                              "extract_features")  # fmt: skip
        self.layers: list[int] = self.meta["layers"]
        self.n: int = self.meta["n"]
        self.labels: np.ndarray = np.load(self.path / LABELS_FILE)

    def width(self, what: int | str) -> int:
        """Columns of layer `what` (n_embd) or of 'pixels' (n_px²·channels)."""
        return self.meta["pixels_dim"] if what == "pixels" else self.meta["dim"]

    def read(self, what: int | str, rows: range, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [rows.start, rows.stop) of layer `what` (float32) or of 'pixels' (uint8), shape
        (len(rows), width(what)), read part by part into `out` (converted to its dtype) or a new array.
        Plain file reads, not memory maps: the process holds the rows it asked for and one part's worth
        besides, not mapped page cache. Raises ConfigError for a layer that was not extracted."""
        if what != "pixels" and what not in self.layers:
            raise ConfigError(f"layer {what} was not extracted to {self.path} (have {self.layers})")
        if out is None:
            out = np.empty((len(rows), self.width(what)), np.uint8 if what == "pixels" else np.float32)
        for name, start, stop in self.meta["parts"]:
            lo, hi = max(start, rows.start), min(stop, rows.stop)
            if lo < hi:
                file = PIXELS_FILE if what == "pixels" else FEATURES_FILE
                plane = 0 if what == "pixels" else self.layers.index(what)
                out[lo - rows.start : hi - rows.start] = read_rows(self.path / PARTS_DIR / name / file, plane,
                                                                   lo - start, hi - start)  # fmt: skip
        return out


def read_rows(path: Path, plane: int, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of plane `plane` of a C-ordered .npy array (planes, rows, width) or (rows, width),
    with one seek and one read."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)  # C order: written by open_memmap here
        rows, width = shape[-2], shape[-1]
        f.seek(f.tell() + (plane * rows + lo) * width * dtype.itemsize)
        block = np.empty((hi - lo, width), dtype)
        f.readinto(memoryview(block).cast("B"))
    return block
