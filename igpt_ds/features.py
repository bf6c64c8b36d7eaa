"""Frozen-feature extraction for linear probes (Chen et al. 2020, §3.4 and §4.2).

The feature of layer l is f^l = mean over positions of LN(h^l), block l's normalised input; l = n_layer
is the final norm's output. One forward pass yields every requested layer (`IGPT.features`).

Ranks split each dataset split into contiguous slices (`shards.rank_slice`) and write their rows
straight into memory-mapped `.npy` files that rank 0 created, so a rank holds one batch of features at
a time and the output keeps the split's order whatever the world size. Several nodes need a shared
filesystem for the output folder. A split's folder appears only once complete (written under a
temporary name and renamed by rank 0):

    <out>/<split>/layer_00.npy ... layer_<n_layer>.npy   float32 (n, n_embd), whatever the compute dtype
                  pixels.npy                             uint8 (n, n_px²·3) palette-decoded RGB (raw baseline)
                  labels.npy                             int64 (n,)
                  meta.json                              checkpoint, layers, split, dimensions, classes

Compute runs in bf16/fp16 autocast on GPU (`precision`) and fp32 on CPU. Each rank holds the whole
model (data-parallel inference: iGPT-XL's 6.8B fp32 weights take 27 GB, within one 80 GB GPU). With
several ranks and a DeepSpeed checkpoint, rank 0 first consolidates its weights into `<out>/weights/`
(once), which every rank then reads.

    python launcher/extract_features.py --checkpoint runs/digits --shards demo_out/shards --out demo_out/features
    deepspeed --num_gpus 8 launcher/extract_features.py --checkpoint runs/igpt-l --shards data/cifar10_32 \\
        --out runs/igpt-l/features --layers '[16,20,24,28,32]'
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from igpt_ds.atomic import publish_dir
from igpt_ds.checkpoint import check_palette, load_model_for_ranks
from igpt_ds.config import ConfigError, DataConfig
from igpt_ds.distributed import barrier, init_distributed
from igpt_ds.model import IGPT
from igpt_ds.palette import decode
from igpt_ds.shards import rank_slice
from igpt_ds.trainer import open_shards


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

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint must name a run, checkpoint or consolidated folder")
        if self.batch_size < 1 or not self.splits:
            raise ConfigError("batch_size must be >= 1 and splits non-empty")
        compute_dtype(torch.device("cpu"), self.precision)  # validates the name


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
META_FILE = "meta.json"


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


def layer_file(layer: int) -> str:
    return f"layer_{layer:02d}.npy"


def extract_split(
    model: IGPT,
    split: Any,
    layers: list[int],
    out_dir: str | Path,
    rank_rows: range,
    rank: int = 0,
    batch_size: int = 64,
    precision: str = "bf16",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write features of `split` (a `shards.ShardSplit`) for `layers` to `out_dir`; every rank calls it.

    `rank_rows` is this rank's contiguous slice of the split (`rank_slice(len(split), rank, world)`).
    Also writes the split's pixels, decoded through its palette, for the raw-pixel baseline probe.
    Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    n, dim = len(split), model.cfg.n_embd
    if (split.labels < 0).any():
        raise ConfigError(
            f"split {out_dir.name!r} has {int((split.labels < 0).sum())} unlabelled images of {n}; "
            "the probe needs labels for every image"
        )
    device = next(model.parameters()).device
    # A fixed temporary name every rank can find; a leftover from a killed run is discarded.
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for l in layers:
            np.lib.format.open_memmap(tmp / layer_file(l), mode="w+", dtype=np.float32, shape=(n, dim)).flush()
        np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint8, shape=(n, split.seq_len * 3)).flush()
    barrier()

    arrays = {l: np.load(tmp / layer_file(l), mmap_mode="r+") for l in layers}
    pixels = np.load(tmp / "pixels.npy", mmap_mode="r+")
    starts = range(rank_rows.start, rank_rows.stop, batch_size)
    for start in tqdm(starts, desc=f"features {out_dir.name}", unit="batch", disable=rank != 0):
        rows = range(start, min(start + batch_size, rank_rows.stop))
        tokens, _ = split.batch(np.asarray(rows))
        with torch.no_grad(), autocast(device, precision):
            feats = model.features(torch.from_numpy(tokens).to(device), layers)
        for l in layers:
            arrays[l][rows.start : rows.stop] = feats[l].float().cpu().numpy()
        pixels[rows.start : rows.stop] = decode(tokens, split.palette).reshape(len(rows), -1)
    for array in [*arrays.values(), pixels]:
        array.flush()
    del arrays, pixels
    barrier()

    if rank == 0:
        np.save(tmp / "labels.npy", np.asarray(split.labels, dtype=np.int64))
        meta = {
            "split": out_dir.name,
            "n": n,
            "dim": dim,
            "layers": layers,
            "n_layer": model.cfg.n_layer,
            "class_names": list(split.class_names),
            "precision": str(compute_dtype(device, precision)).removeprefix("torch."),
            "model": asdict(model.cfg),
            **(metadata or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        publish_dir(tmp, out_dir)
    barrier()
    return out_dir


class FeatureSplit:
    """Read side of one extracted split: per-layer memory-mapped features, pixels, labels, metadata."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / META_FILE).is_file():
            raise ConfigError(f"{self.path} holds no extracted features ({META_FILE} missing); run extract_features")
        self.meta: dict[str, Any] = json.loads((self.path / META_FILE).read_text())
        self.layers: list[int] = self.meta["layers"]
        self.labels: np.ndarray = np.load(self.path / "labels.npy")

    def layer(self, l: int) -> np.ndarray:
        if l not in self.layers:
            raise ConfigError(f"layer {l} was not extracted to {self.path} (have {self.layers})")
        return np.load(self.path / layer_file(l), mmap_mode="r")

    def pixels(self) -> np.ndarray:
        """Raw-pixel baseline input: uint8 RGB (n, n_px²·3)."""
        return np.load(self.path / "pixels.npy", mmap_mode="r")


def extract(cfg: ExtractConfig) -> dict[str, Path]:
    """Extract `cfg.layers` of every split in `cfg.splits` (every rank); returns split -> folder."""
    rank, world = init_distributed(cfg.dist_timeout_s)
    model, model_cfg, palette = load_model_for_ranks(cfg.checkpoint, Path(cfg.out) / "weights")
    device = torch.device(get_accelerator().current_device_name())
    model.to(device)
    layers = resolve_layers(cfg.layers, model_cfg.n_layer)
    splits = {name: open_shards(model_cfg, DataConfig(shards=cfg.shards), name) for name in cfg.splits}
    for split in splits.values():
        check_palette(palette, split, cfg.checkpoint)
    outputs = {}
    for name, split in splits.items():
        rows = rank_slice(len(split), rank, world)
        meta = {"checkpoint": str(cfg.checkpoint), "shards": str(cfg.shards), "world_size": world}
        outputs[name] = extract_split(model, split, layers, Path(cfg.out) / name, rows, rank, cfg.batch_size,
                                      cfg.precision, meta)  # fmt: skip
        if rank == 0:
            print(f"{name}: {len(split)} images x {len(layers)} layers (dim {model_cfg.n_embd}) -> {outputs[name]}")
    return outputs


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj` in rank order, on every rank ([obj] without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
