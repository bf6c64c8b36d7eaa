"""Helpers for the evaluation tests: run an entry point (one process, or ranks under the real DeepSpeed
launcher), a tiny random checkpoint, a small linearly separable dataset as shards. Nothing is downloaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from pretrain_support import REPO, env, free_port

from data_tools.build_shards import main as build_shards
from igpt_ds.checkpoint.weights import save_consolidated
from igpt_ds.config import ModelConfig
from igpt_ds.eval.feature_store import write_features
from igpt_ds.models.igpt import IGPT


def run_entry(script: str, *args: str, nprocs: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run launcher/<script>.py as one process or `deepspeed --num_gpus nprocs` ranks on CPU (gloo)."""
    path = f"launcher/{script}.py"
    if nprocs == 1:
        cmd = [sys.executable, path, *args]
    else:
        deepspeed = Path(sys.executable).with_name("deepspeed")
        cmd = [str(deepspeed), "--num_gpus", str(nprocs), "--master_port", str(free_port()), path, *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> str:
    """stdout of a run that must have succeeded (the tail of its output otherwise)."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def tiny_checkpoint(path: Path, n_vocab: int, palette: np.ndarray | None = None, seed: int = 0) -> Path:
    """A consolidated 2-layer, 32-wide, 8x8 model with random weights, output head included (it is
    zero at init, which would make every sample uniform noise)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(size="igpt-tiny", n_px=8, n_vocab=n_vocab)
    model = IGPT(cfg)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return save_consolidated(path, cfg, model.state_dict(), palette)


COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [230, 220, 40]], dtype=np.uint8)


def separable_shards(out: Path, noise: float = 0.5, seed: int = 0) -> Path:
    """4 classes of 8x8 images: each pixel is the class colour, or with probability `noise` any of the
    4 colours. The majority colour gives the class, so pooled features separate it linearly."""
    rng = np.random.default_rng(seed)
    arrays = {"class_names": np.array(["red", "green", "blue", "yellow"])}
    for split, n in (("train", 256), ("val", 64), ("test", 128)):
        labels = rng.integers(0, len(COLOURS), n)
        images = np.broadcast_to(COLOURS[labels][:, None, None], (n, 8, 8, 3)).copy()
        flip = rng.random((n, 8, 8)) < noise
        images[flip] = COLOURS[rng.integers(0, len(COLOURS), int(flip.sum()))]
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    npz = out.with_suffix(".npz")
    np.savez(npz, **arrays)
    assert build_shards([str(npz), "--out", str(out), "--n-px", "8", "--k", "8", "--workers", "1"]) == 0
    return out


def synthetic_features(
    root: Path,
    sizes: dict[str, int] | None = None,
    dim: int = 16,
    n_classes: int = 4,
    separation: float = 1.0,
    seed: int = 0,
    transform=None,
    labels: dict[str, np.ndarray] | None = None,
    class_names: list[str] | None = None,
) -> Path:
    """Features in the extracted layout (layers 0 and 1 of a pretend 1-layer model; 8x8 RGB pixels) of Gaussian
    classes: x = mu_y + N(0, I), class means mu_k ~ N(0, separation^2 I), the same in every split.
    `transform(split, x)` may change a split's features (layer 1 is layer 0 times 2, plus 1); `labels`
    replaces a split's labels."""
    rng = np.random.default_rng(seed)
    sizes = sizes or {"train": 600, "val": 200, "test": 300}
    means = rng.normal(scale=separation, size=(n_classes, dim)).astype(np.float32)
    for split, n in sizes.items():
        y = labels[split] if labels and split in labels else rng.integers(0, n_classes, n)
        x = (means[np.clip(y, 0, n_classes - 1)] + rng.normal(size=(n, dim))).astype(np.float32)
        if transform is not None:
            x = transform(split, x).astype(np.float32)
        pixels = rng.integers(0, 256, (n, 8 * 8 * 3), dtype=np.uint8)
        rows = lambda a, b, x=x, pixels=pixels: (np.stack([x[a:b], 2 * x[a:b] + 1]), pixels[a:b])
        write_features(root / split, n, [0, 1], dim, rows, np.asarray(y), seq_len=64, channels=3,
                       metadata={"n_layer": 1}, class_names=class_names or [], part_rows=128)  # fmt: skip
    return root
