"""Consolidated weights: the layout-independent exchange format between runs, layouts and tools, and the one way
weights enter a model.

A consolidated checkpoint is a folder:
    model.safetensors   fp32 state dict of `igpt_ds.models.igpt.IGPT` (GPT-2 names: wte, wpe, sos, h.N.*, ...)
    config.json         {"format_version": 1, "model": <ModelConfig fields>, ...extra metadata}
    palette.npy         optional (k, 3) float32 palette in [-1, 1], so a checkpoint decodes by itself

ZeRO-3 and pipeline checkpoints both export to it, both layouts initialise from it, and the
HF ImageGPT converter reads and writes it. Written to a temporary folder and renamed: a reader
never sees half a checkpoint. `load_weights` copies one into any model: a DeepSpeed engine of any ZeRO stage or
layout (exactly, masters included, read once for every rank) or a plain module; weights that do not fit are a
one-line ConfigError.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule
from deepspeed.utils import safe_set_full_fp32_param
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from igpt_ds.atomic import atomic_dir
from igpt_ds.config import ConfigError, ModelConfig, build
from igpt_ds.distributed.rank0 import on_rank0, tensor_from_rank0
from igpt_ds.models.igpt import IGPT

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
    shared`): the tensors' names and shapes, no tensor. `load_weights` receives each tensor by
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
    to `load_weights`, which reads each tensor once and broadcasts it: the folder is read from shared
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


FINETUNE_HEAD = "clf_head."
"""Parameter-name prefix of the fine-tuned classifier's head (igpt_ds.train.finetune.IGPTClassifier)."""


def check_weights(expected: dict[str, torch.Size], found: dict[str, torch.Size], source: str) -> None:
    """A one-line ConfigError naming `source` and the weights `found` that do not fit `expected` (name -> shape)."""
    shared = sorted(expected.keys() & found.keys())
    problems = {
        "missing": sorted(expected.keys() - found.keys()),
        "unexpected": sorted(found.keys() - expected.keys()),
        "wrong shape": [
            f"{k} {tuple(found[k])} != {tuple(expected[k])}" for k in shared if tuple(found[k]) != tuple(expected[k])
        ],
    }
    more = lambda keys: f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
    found = [f"{kind}: {', '.join(keys[:4])}{more(keys)}" for kind, keys in problems.items() if keys]
    if found:
        raise ConfigError(f"{source}: weights do not fit its model config ({'; '.join(found)})")


def load_weights(
    target: Any,
    state: Mapping[str, torch.Tensor],
    source: str,
    keep_init: tuple[str, ...] = (FINETUNE_HEAD,),
    shared: bool = True,
) -> None:
    """Copy consolidated fp32 weights `state` (a TensorFile: read tensor by tensor) into a model: a DeepSpeed
    engine's after `deepspeed.initialize`, or a plain module. Collective on every rank of the engine's world.

    Exact in every precision: an engine's fp32 master weights (ZeRO 1-3, DeepSpeed's bf16 optimizers) take the
    values themselves, and its training-precision parameters their rounding, so "export, then init_from" into a bf16
    run loses nothing (copied into bf16 parameters before `deepspeed.initialize`, the masters would be made from
    the rounded copy). Read once: rank 0 reads each tensor and every rank receives it (`tensor_from_rank0`), so a
    job reads the file from shared storage once, not once per rank; memory: one tensor at a time. Any layout: IGPT,
    the classifier (parameters named with a prefix in `keep_init`, a new head, keep their initialisation and such
    weights in `state` are ignored), or this rank's pipeline stages (IGPT names through `pipe.igpt_name`).
    Weights that do not fit the model are a ConfigError naming `source`, on every rank. `shared=False`: this process
    alone loads a model, reading every tensor itself (evaluation in one process); not collective."""
    engine = target if hasattr(target, "module") else None
    module = engine.module if engine is not None else target
    local = igpt_parameters(module)
    expected = {n: getattr(p, "ds_shape", p.shape) for n, p in local.items()}
    if isinstance(module, PipelineModule):  # this rank's stages: check against the whole model
        with torch.device("meta"):
            expected = {n: p.shape for n, p in IGPT(module.cfg).named_parameters()}
    expected = {n: shape for n, shape in expected.items() if not n.startswith(keep_init)}
    found = {n: shape for n, shape in tensor_shapes(state).items() if not n.startswith(keep_init)}
    check_weights(expected, found, source)
    masters = fp32_masters(engine)
    for name in sorted(expected):  # the same order on every rank: each tensor is one broadcast
        value = tensor_from_rank0(expected[name], lambda name=name: state[name]) if shared else state[name].float()
        param = local.get(name)
        if param is None:  # held by another pipeline stage
            continue
        with torch.no_grad():
            if hasattr(param, "ds_id"):  # ZeRO-3: gathered, written by rank 0, partitioned again
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if dist.get_rank() == 0:
                        param.data.copy_(value)
            else:
                param.data.copy_(value)
            if hasattr(param, "ds_id"):
                set_zero3_master(param, value)
            else:
                safe_set_full_fp32_param(param, value)  # ZeRO 1-2 and the bf16 optimizer's masters (else a no-op)
            if id(param) in masters:
                masters[id(param)].data.copy_(value)


def set_zero3_master(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write this rank's share of a ZeRO-3 parameter's fp32 master from the whole `value`. DeepSpeed 0.19.8's
    `safe_set_full_fp32_param` slices the value at rank x padded partition size, past its end on the last ranks
    whenever the parameter's size is not a multiple of the data-parallel size (a 512-wide norm on 24 GPUs); this
    writes the part of the partition that holds real elements, through the same optimizer internals."""
    optimizer = getattr(param, "_z3_optimizer", None)
    if optimizer is None or not param.requires_grad:
        return
    part, group = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    start = optimizer._get_param_partition_rank(param) * part.numel()
    n = max(0, min(part.numel(), param.ds_numel - start))
    part[:n].copy_(value.flatten()[start : start + n])
    if optimizer._swappable_optimizer_subgroup(group):
        optimizer._optimizer_states_and_gradient_swap_out(group)


def igpt_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters of `module` under their IGPT names: IGPT's and the classifier's as they are, a
    pipeline stage's layer `i` parameters through `pipe.igpt_name`."""
    if not isinstance(module, PipelineModule):
        return dict(module.named_parameters())
    from igpt_ds.models.pipe import igpt_name

    out = {}
    for name, param in module.named_parameters():
        layer, key = name.split(".", 1)
        out[igpt_name(int(layer), key, module.cfg.n_layer)] = param
    return out


def fp32_masters(engine: Any) -> dict[int, torch.Tensor]:
    """id(parameter) -> its fp32 master copy, for DeepSpeed's 16-bit optimizer without ZeRO (ZeRO-0 with bf16:
    FP16_UnfusedOptimizer keeps `fp32_groups` beside the parameters; `safe_set_full_fp32_param` does not reach them).
    Empty for every other engine: ZeRO's masters are set through the parameters, fp32 parameters are their own."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = getattr(engine, "optimizer", None)
    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return {}
    pairs = zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True)
    return {id(lp): hp for lps, hps in pairs for lp, hp in zip(lps, hps, strict=True)}
