"""Frozen-feature extraction for linear probes (Chen et al. 2020, §3.4 and §4.2).

The feature of layer l is f^l = mean over positions of LN(h^l), block l's normalised input; l = n_layer
is the final norm's output. One forward pass yields every requested layer (`IGPT.features`).

Features are sharded by rank, on any filesystem. A split's rows are cut into parts of `part_rows` rows
(a multiple of the batch size, chosen from the split's size alone: `part_rows_for`); part p is computed
by rank p mod world and written by that rank alone into files of its own, built under a temporary name
and renamed into place when whole. No two ranks ever write one file, so no page is shared between
nodes (NFS and Lustre write pages back whole). Batches start at multiples of the batch size in every
part, so the features are bit for bit the same at any world size. Rank 0 then waits, polling the
filesystem rather than a collective, until every part exists, and writes the index that readers use:

    <out>/<split>/plan.json                 what is being extracted and the part layout (written first)
                  parts/00000/features.npy  float32 (n_extracted_layers, rows, n_embd), whatever the compute dtype
                              pixels.npy    uint8 (rows, n_px²·channels) palette-decoded pixels (raw baseline);
                                            channels = 1 when every palette colour is grey, else 3
                  labels.npy                int64 (n,)
                  index.json                written last: the split is complete; parts, layers, dims, classes

A killed extraction rerun with the same checkpoint, shards, layers and batch size keeps the parts it
finished; anything else that changed starts the split over. A rerun over a complete split does nothing.

Memory per rank: the model (every rank holds it: data-parallel inference; igpt-xl's 6.8B fp32 weights
take 27 GB, within one 80 GB GPU) plus one batch of activations and of features
(batch × n_extracted_layers × n_embd × 4 B), whatever the dataset's size. Weights are read tensor by
tensor; a DeepSpeed checkpoint read by several ranks is first consolidated once, by rank 0, into
`<out>/weights/` (`checkpoint.consolidated_for_ranks`).

    python launcher/extract_features.py --checkpoint runs/digits --shards demo_out/shards --out demo_out/features
    deepspeed --num_gpus 8 launcher/extract_features.py --checkpoint runs/igpt-l --shards data/cifar10_32 \\
        --out runs/igpt-l/features --layers '[16,20,24,28,32]'
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from igpt_ds.atomic import write_text
from igpt_ds.checkpoint import check_palette, is_consolidated, load_model_for_ranks, read_meta, resolve
from igpt_ds.config import ConfigError, DataConfig
from igpt_ds.distributed import init_distributed, on_rank0
from igpt_ds.model import IGPT
from igpt_ds.palette import decode
from igpt_ds.shards import ShardSplit
from igpt_ds.trainer import open_shards

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


@dataclass
class ExtractConfig:
    checkpoint: str = ""
    """Run folder, DeepSpeed checkpoint folder (ZeRO or pipeline) or consolidated weights folder."""
    shards: str = "demo_out/shards"
    """Shard folder (manifest.json) holding the labelled splits."""
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    layers: list[int] = field(default_factory=list)
    """Layers to extract (l < n_layer: block l's normalised input; n_layer: final norm). Empty = all."""
    out: str = "demo_out/features"
    """Output folder: one subfolder per split."""
    batch_size: int = 64
    """Images per forward pass on one rank."""
    precision: str = "bf16"
    """Compute dtype on GPU (bf16, fp16, fp32); CPU always computes in fp32. Features are stored as fp32."""
    dist_timeout_s: int = 600
    """Collective timeout; also how long rank 0 waits for other ranks' parts without any of them finishing one."""

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint must name a run, checkpoint or consolidated folder")
        if self.batch_size < 1 or not self.splits:
            raise ConfigError("batch_size must be >= 1 and splits non-empty")
        compute_dtype(torch.device("cpu"), self.precision)  # validates the name


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype matmuls run in: `precision` on CUDA, always fp32 on CPU."""
    if precision not in _DTYPES:
        raise ConfigError(f"precision={precision!r} must be one of {list(_DTYPES)}")
    return _DTYPES[precision] if device.type == "cuda" else torch.float32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on CUDA with fp32 weights kept; a no-op in fp32 and on CPU."""
    dtype = compute_dtype(device, precision)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cuda", dtype=dtype)


def resolve_layers(layers: list[int], n_layer: int) -> list[int]:
    """Sorted distinct layers; empty means every block input 0..n_layer-1 plus the final norm (n_layer)."""
    if not layers:
        return list(range(n_layer + 1))
    bad = [l for l in layers if not 0 <= l <= n_layer]
    if bad:
        raise ConfigError(f"layers {bad} out of range: this model has layers 0..{n_layer} ({n_layer} = final norm)")
    return sorted(set(layers))


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


def checkpoint_identity(path: str | Path) -> dict[str, Any]:
    """Which weights a checkpoint argument names right now: a rerun after training went on is not the same."""
    if is_consolidated(path):
        weights = Path(path) / "model.safetensors"
        stat = weights.stat()
        return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    ckpt = resolve(path)
    return {"path": str(ckpt.resolve()), "step": read_meta(ckpt)["step"]}


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


def extract_parts(
    model: IGPT,
    split: ShardSplit,
    out_dir: Path,
    plan: dict,
    rank: int = 0,
    world: int = 1,
    precision: str = "bf16",
    progress: bool = True,
) -> int:
    """Compute and write this rank's missing parts of `split`; returns how many it wrote. Touches no file
    another rank writes and takes part in no collective. Batches start at multiples of the batch size."""
    mine, part_rows, n = missing_parts(out_dir, plan, rank, world), plan["part_rows"], plan["n"]
    device = next(model.parameters()).device
    layers, batch_size, channels = plan["layers"], plan["batch_size"], plan["channels"]
    bar = tqdm(total=sum(min(part_rows, n - p * part_rows) for p in mine), unit="img", disable=not progress,
               desc=f"features {out_dir.name} (rank {rank})")  # fmt: skip
    for p in mine:
        start, stop = p * part_rows, min(n, (p + 1) * part_rows)
        with part_writer(out_dir, p, plan) as (feats, pixels):
            for a in range(start, stop, batch_size):
                b = min(a + batch_size, stop)
                tokens, _ = split.batch(np.arange(a, b))
                with torch.no_grad(), autocast(device, precision):
                    out = model.features(torch.from_numpy(tokens).to(device), layers)
                for i, l in enumerate(layers):
                    feats[i, a - start : b - start] = out[l].float().cpu().numpy()
                pixels[a - start : b - start] = decode(tokens, split.palette)[..., :channels].reshape(b - a, -1)
                bar.update(b - a)
    bar.close()
    return len(mine)


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


def extract(cfg: ExtractConfig) -> dict[str, Path]:
    """Extract `cfg.layers` of every split in `cfg.splits` (every rank); returns split -> folder.

    Every rank first computes its parts of every split; rank 0 alone then waits for the others' parts and
    writes the indexes, while the other ranks are free to exit."""
    rank, world = init_distributed(cfg.dist_timeout_s)
    device = torch.device(get_accelerator().current_device_name())
    model, model_cfg, palette = load_model_for_ranks(cfg.checkpoint, Path(cfg.out) / "weights", device)
    layers = resolve_layers(cfg.layers, model_cfg.n_layer)
    splits = {name: open_shards(model_cfg, DataConfig(shards=cfg.shards), name) for name in cfg.splits}

    def decide() -> dict[str, tuple[dict, str]]:
        """Rank 0 checks the inputs and reads what is already on disk, once for every rank."""
        source = checkpoint_identity(cfg.checkpoint)
        for name, split in splits.items():
            check_palette(palette, split, cfg.checkpoint)
            if (split.labels < 0).any():
                raise ConfigError(
                    f"split {name!r} of {cfg.shards} has {int((split.labels < 0).sum())} unlabelled images of "
                    f"{len(split)}; the probe needs labels for every image: build the shards from a labelled source"
                )
        plans = {k: split_plan(split, layers, model_cfg.n_embd, cfg.batch_size, source) for k, split in splits.items()}
        return {name: (plan, prepare_split(Path(cfg.out) / name, plan)) for name, plan in plans.items()}

    decisions = on_rank0(decide)
    for name, (plan, state) in decisions.items():
        if state != "done":
            extract_parts(model, splits[name], Path(cfg.out) / name, plan, rank, world, cfg.precision, rank == 0)
    outputs = {name: Path(cfg.out) / name for name in splits}
    if rank == 0:
        meta = {
            "checkpoint": str(cfg.checkpoint),
            "shards": str(cfg.shards),
            "n_layer": model_cfg.n_layer,
            "model": asdict(model_cfg),
            "precision": str(compute_dtype(device, cfg.precision)).removeprefix("torch."),
            "world_size": world,
        }
        for name, (plan, state) in decisions.items():
            if state == "done":
                print(f"{name}: already extracted in {outputs[name]}")
                continue
            split = splits[name]
            finish_split(outputs[name], plan, split.labels, split.class_names, meta, cfg.dist_timeout_s)
            print(f"{name}: {plan['n']} images x {len(layers)} layers (dim {model_cfg.n_embd}) -> {outputs[name]}")
    return outputs


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj` in rank order, on every rank ([obj] without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
