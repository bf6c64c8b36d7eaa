"""Consolidated weights: the layout-independent exchange format between runs, layouts and tools.

A consolidated checkpoint is a folder:
    model.safetensors   fp32 state dict of `igpt_ds.model.IGPT` (GPT-2 names: wte, wpe, sos, h.N.*, ...)
    config.json         {"format_version": 1, "model": <ModelConfig fields>, ...extra metadata}
    palette.npy         optional (k, 3) float32 palette in [-1, 1], so a checkpoint decodes by itself

ZeRO-3 and pipeline checkpoints both export to it, both layouts initialise from it, and the
HF ImageGPT converter reads and writes it. Written to a temporary folder and renamed: a reader
never sees half a checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from igpt_ds.atomic import atomic_dir
from igpt_ds.config import ConfigError, ModelConfig, build
from igpt_ds.distributed import on_rank0

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PALETTE_FILE = "palette.npy"
FORMAT_VERSION = 1


def save_consolidated(
    out_dir: str | Path,
    model_cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    palette: np.ndarray | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write weights (as fp32), config and palette atomically to `out_dir` (replaced if present)."""
    with atomic_dir(out_dir) as tmp:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
        save_file(tensors, tmp / WEIGHTS_FILE)
        meta = {"format_version": FORMAT_VERSION, "model": asdict(model_cfg), **(metadata or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if palette is not None:
            np.save(tmp / PALETTE_FILE, np.asarray(palette, dtype=np.float32))
    return Path(out_dir)


def is_consolidated(path: str | Path) -> bool:
    path = Path(path)
    return (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


class TensorFile(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-only state dict whose tensors are read when looked up: a rank that
    loads one layer reads one layer, and one that loads all of them holds one extra tensor at a time,
    never the whole file (27 GB for igpt-xl)."""

    def __init__(self, path: Path):
        self.path = path
        with safe_open(path, framework="pt") as f:
            self.shapes = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}  # header only

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class RemoteTensors(Mapping[str, torch.Tensor]):
    """What a rank other than 0 holds of a consolidated file that rank 0 reads for everyone (`open_consolidated_
    shared`): the tensors' names and shapes, no tensor. `igpt_ds.checkpoint.load_weights` receives each tensor by
    broadcast instead."""

    def __init__(self, shapes: dict[str, torch.Size]):
        self.shapes = shapes

    def __getitem__(self, key: str) -> torch.Tensor:
        raise RuntimeError(f"tensor {key} is read by rank 0 and broadcast, not read here")

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def tensor_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    """Name -> shape of a state dict, without reading a TensorFile's tensors."""
    if isinstance(state, (TensorFile, RemoteTensors)):
        return dict(state.shapes)
    return {k: v.shape for k, v in state.items()}


def open_consolidated(path: str | Path) -> tuple[ModelConfig, TensorFile, np.ndarray | None]:
    """`load_consolidated` with the weights read tensor by tensor as they are looked up."""
    path = Path(path)
    model_cfg, palette = read_consolidated_meta(path)
    return model_cfg, TensorFile(path / WEIGHTS_FILE), palette


def open_consolidated_shared(path: str | Path) -> tuple[ModelConfig, Mapping[str, torch.Tensor], np.ndarray | None]:
    """`open_consolidated` for a distributed job: rank 0 opens the folder and every rank receives the model config,
    the palette and the tensors' shapes; rank 0's state is the TensorFile, the others' a `RemoteTensors`. Pass it
    to `checkpoint.load_weights`, which reads each tensor once and broadcasts it: the folder is read from shared
    storage once per job (its config and header included), not once per rank. Collective; a ConfigError (not a
    consolidated folder) is raised on every rank. Without a process group, `open_consolidated`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return open_consolidated(path)
    opened: list[tuple[ModelConfig, TensorFile, np.ndarray | None]] = []

    def header() -> tuple[ModelConfig, dict[str, torch.Size], np.ndarray | None]:
        opened.append(open_consolidated(path))
        cfg, state, palette = opened[0]
        return cfg, tensor_shapes(state), palette

    cfg, shapes, palette = on_rank0(header)
    return cfg, (opened[0][1] if opened else RemoteTensors(shapes)), palette


def load_consolidated(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], np.ndarray | None]:
    """(model config, fp32 state dict, palette or None) from a consolidated checkpoint folder."""
    path = Path(path)
    model_cfg, palette = read_consolidated_meta(path)
    return model_cfg, load_file(path / WEIGHTS_FILE), palette


def read_consolidated_meta(path: Path) -> tuple[ModelConfig, np.ndarray | None]:
    if not is_consolidated(path):
        raise ConfigError(f"{path} is not a consolidated checkpoint (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path / CONFIG_FILE}: format_version {meta.get('format_version')} unsupported")
    model_cfg = build(ModelConfig, meta["model"], where="model.")
    palette = np.load(path / PALETTE_FILE) if (path / PALETTE_FILE).is_file() else None
    return model_cfg, palette
