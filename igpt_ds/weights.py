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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from igpt_ds.atomic import atomic_dir
from igpt_ds.config import ConfigError, ModelConfig, build

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


def load_consolidated(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], np.ndarray | None]:
    """(model config, fp32 state dict, palette or None) from a consolidated checkpoint folder."""
    path = Path(path)
    if not is_consolidated(path):
        raise ConfigError(f"{path} is not a consolidated checkpoint (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path / CONFIG_FILE}: format_version {meta.get('format_version')} unsupported")
    model_cfg = build(ModelConfig, meta["model"], where="model.")
    palette = np.load(path / PALETTE_FILE) if (path / PALETTE_FILE).is_file() else None
    return model_cfg, load_file(path / WEIGHTS_FILE), palette
