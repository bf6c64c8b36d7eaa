"""Weights out of a run: consolidated fp32 folders from either layout, and models for evaluation.

`export_consolidated` (or `python -m igpt_ds.checkpoint RUN_OR_CHECKPOINT OUT_DIR`, igpt-export) writes a
checkpoint's weights as a consolidated folder (`igpt_ds.checkpoint.weights`); `load_model_for_eval` accepts a run
folder, a checkpoint folder of either layout, or a consolidated folder; `load_model_for_ranks` does so once for
every rank of a job.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from igpt_ds.checkpoint.ds_checkpoint import model_config, palette, read_meta, resolve, to_universal
from igpt_ds.checkpoint.weights import (
    CONFIG_FILE,
    is_consolidated,
    load_weights,
    open_consolidated,
    open_consolidated_shared,
    save_consolidated,
)
from igpt_ds.config import ConfigError, ModelConfig, precision
from igpt_ds.distributed.rank0 import on_rank0
from igpt_ds.models.igpt import IGPT


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The IGPT-named fp32 state dict of checkpoint folder `ckpt`, from either layout."""
    meta = read_meta(ckpt)
    if meta["layout"] == "pipeline":
        from igpt_ds.models.pipe import state_dict_from_layer_files, state_dict_from_universal

        ds_config = json.loads((ckpt / "ds_config.json").read_text())
        if precision(ds_config) != "fp32":
            # The layer files hold the 16-bit weights; the fp32 masters are in the ZeRO-1 shards.
            return state_dict_from_universal(to_universal(ckpt), model_config(ckpt).n_layer)
        return state_dict_from_layer_files(ckpt, model_config(ckpt).n_layer)
    if meta["zero_stage"] == 0:
        return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def export_consolidated(path: str | Path, out_dir: str | Path) -> Path:
    """Write the weights of a run / checkpoint folder as a consolidated fp32 folder (igpt_ds.checkpoint.weights)."""
    ckpt = resolve(path)
    extra = {"source": str(ckpt.resolve()), "step": read_meta(ckpt)["step"]}
    return save_consolidated(out_dir, model_config(ckpt), consolidated_state_dict(ckpt), palette(ckpt), extra)


def consolidated_for_ranks(path: str | Path, export_dir: Path) -> Path:
    """A consolidated folder of `path`'s weights that every rank can read tensor by tensor: `path` itself when
    it is one; otherwise rank 0 exports it to `export_dir` (kept, and reused by a rerun while it holds the same
    checkpoint), so one process, not every rank, gathers the DeepSpeed checkpoint's shards into a whole model.
    Collective; the export may take many minutes for a large model, so it runs under `on_rank0`, where no rank
    waits for it inside a timed collective."""

    def export() -> Path:
        if is_consolidated(path):
            return Path(path)
        ckpt = resolve(path)  # a bad path is the same ConfigError on every rank
        if not exported_from(export_dir, ckpt):
            export_consolidated(ckpt, export_dir)
        return Path(export_dir)

    return on_rank0(export)


def exported_from(folder: Path, ckpt: Path) -> bool:
    """Whether `folder` is a consolidated export of checkpoint folder `ckpt` (same folder, same step)."""
    if not is_consolidated(folder):
        return False
    meta = json.loads((folder / CONFIG_FILE).read_text())
    return meta.get("source") == str(ckpt.resolve()) and meta.get("step") == read_meta(ckpt)["step"]


def load_model_for_ranks(
    path: str | Path, export_dir: Path, device: torch.device | str = "cpu"
) -> tuple[IGPT, ModelConfig, np.ndarray | None]:
    """`load_model_for_eval` on every rank of a distributed job (features, samples: each rank holds the
    model). With several ranks, a DeepSpeed checkpoint is first consolidated once, by rank 0, into
    `export_dir` (`consolidated_for_ranks`; otherwise every rank would gather all its shards, for igpt-xl ~80 GB of
    ZeRO states a rank), and the consolidated weights are read once, by rank 0, and broadcast tensor by tensor
    (`load_weights`): shared storage serves the model's bytes once per job, not once per rank. Collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return load_model_for_eval(path, device)
    path = consolidated_for_ranks(path, export_dir)
    cfg, state, colours = open_consolidated_shared(path)
    with torch.device("meta"):  # no memory until to_empty, no initialisation to overwrite
        model = IGPT(cfg)
    model.to_empty(device=device)
    load_weights(model, state, str(path))  # rank 0 reads each tensor once, every rank receives it
    return model.eval(), cfg, colours


def load_model_for_eval(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[IGPT, ModelConfig, np.ndarray | None]:
    """(IGPT in eval mode in fp32 on `device`, its ModelConfig, palette or None) from a run folder,
    a DeepSpeed checkpoint folder of either layout, or a consolidated folder.

    A consolidated folder is read tensor by tensor, each copied to `device` before the next is read: host
    memory holds one tensor, not the model (27 GB for igpt-xl). A DeepSpeed checkpoint is gathered whole in
    this process first (`consolidated_state_dict`); `load_model_for_ranks` spares several ranks that.
    A fine-tuned run loads as its IGPT trunk, without the classifier head (`clf_head.*`): features,
    probes and samples use the trunk only. Any other weights that do not fit the checkpoint's model config
    are a one-line ConfigError."""
    if is_consolidated(path):
        cfg, state, colours = open_consolidated(path)
    else:
        ckpt = resolve(path)
        cfg, state, colours = model_config(ckpt), consolidated_state_dict(ckpt), palette(ckpt)
    with torch.device("meta"):  # no memory until to_empty, no initialisation to overwrite
        model = IGPT(cfg)
    model.to_empty(device=device)
    load_weights(model, state, str(path), shared=False)  # this process reads every tensor: no other rank is here
    return model.eval(), cfg, colours


def main(argv: list[str] | None = None) -> int:
    """`python -m igpt_ds.checkpoint RUN_OR_CHECKPOINT OUT_DIR` (igpt-export): export consolidated weights."""
    parser = argparse.ArgumentParser(prog="igpt-export", description=main.__doc__)
    parser.add_argument("source", help="run folder, checkpoints folder or DeepSpeed checkpoint folder (either layout)")
    parser.add_argument("out_dir", help="folder to write (model.safetensors, config.json, palette.npy)")
    args = parser.parse_args(argv)
    try:
        print(export_consolidated(args.source, args.out_dir))
    except ConfigError as e:
        print(f"igpt-export: error: {e}", file=sys.stderr)
        return 2
    return 0
