"""Checkpoints: save, find the latest complete one, resume exactly, export and load weights.

A run's checkpoints live in `runs/<name>/checkpoints/`:

    step_00000500/          DeepSpeed's files (engine.save_checkpoint, every rank) plus ours:
        rng_rank00000.pt    RNG states of each rank (torch, numpy, python)
        run.json            step, sampler position, topology (world, data-parallel size, layout)
        config.yaml, ds_config.json, git_rev.txt, palette.npy
        complete            written last, after every rank finished writing
    latest                  the tag of the newest complete checkpoint, replaced atomically
    universal/step_...      DeepSpeed universal form, made on demand to resume at a new topology

"Complete" means every rank returned from its save (a barrier) before rank 0 writes the marker and
then swaps `latest`; a save killed midway leaves `latest` on the previous checkpoint, and the
half-written folder is deleted by the next save. The folder must be on a filesystem every rank sees;
durability against power loss is the filesystem's.

Resuming restores weights, optimizer and LR schedule (DeepSpeed), the step and sampler position
(run.json) and each rank's RNG states. At a different data-parallel size or stage count a ZeRO
checkpoint cannot be loaded directly; it is converted once with `deepspeed.checkpoint.ds_to_universal`
and loaded with `"checkpoint": {"load_universal": true}` (RNG states then restart from the seed).

Weights leave either layout as a consolidated fp32 folder (`igpt_ds.weights`): `export_consolidated`,
or `python -m igpt_ds.checkpoint runs/<name> out_dir`. `load_model_for_eval` accepts a run folder,
a checkpoint folder of either layout, or a consolidated folder. `load_weights` copies a state dict into
a model of any ZeRO stage (pretraining's `train.init_from`, fine-tuning's backbone); weights that do not
fit the model, and shards tokenised with another palette than the checkpoint's, are one-line ConfigErrors.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import sys
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import yaml
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from deepspeed.pipe import PipelineModule
from deepspeed.utils import safe_set_full_fp32_param

from igpt_ds.atomic import write_text
from igpt_ds.config import ConfigError, ModelConfig, build
from igpt_ds.distributed import barrier, on_rank0, tensor_from_rank0
from igpt_ds.engine import apply_schedule
from igpt_ds.model import IGPT
from igpt_ds.shards import ShardSplit
from igpt_ds.weights import (
    CONFIG_FILE,
    PALETTE_FILE,
    is_consolidated,
    open_consolidated,
    open_consolidated_shared,
    save_consolidated,
    tensor_shapes,
)

LATEST = "latest"
COMPLETE = "complete"
RUN_META = "run.json"
FINETUNE_HEAD = "clf_head."
"""Parameter-name prefix of the fine-tuned classifier's head (igpt_ds.finetune.IGPTClassifier)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save(
    engine: Any,
    root: Path,
    step: int,
    meta: dict[str, Any],
    files: dict[str, str],
    palette: np.ndarray | None,
    keep: int,
) -> Path:
    """Write checkpoint `step` on every rank (collective); mark it complete and latest; keep `keep`.

    `meta` (run.json: step, sampler state, topology) and `files` (name -> text) are written by rank 0. Whether the
    step is already saved (a rerun of a finished run) is rank 0's decision for every rank: a rank that decided from
    its own, stale, listing of a network filesystem would skip the collective save alone and hang the others.
    Old checkpoints are moved aside at once and deleted in a background thread (`prune`), so no rank waits at the
    next collective while rank 0 deletes tens of GB.
    """
    rank = dist.get_rank()
    path = root / tag_for(step)
    if on_rank0(lambda: prepare(root, path)) == "saved":
        return path
    # ds_to_universal refuses ZeRO-1/2 and pipeline checkpoints without this marker of the format.
    universal_info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(root), tag=path.name, client_state=universal_info, save_latest=False)
    torch.save(rng_state(), path / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        for name, text in files.items():
            (path / name).write_text(text)
        if palette is not None:
            np.save(path / PALETTE_FILE, palette)
        write_text(path / RUN_META, json.dumps(dict(meta, step=step), indent=2))
    barrier()  # every rank's files are written before the checkpoint counts
    if rank == 0:
        write_text(path / COMPLETE, "")
        write_text(root / LATEST, path.name)
        prune(root, keep)
    return path


def prepare(root: Path, path: Path) -> str:
    """Rank 0, before a save: "saved" when `path` is already a complete checkpoint; otherwise "write", with `root`
    made and the leftovers of a save killed midway at `path` moved aside for deletion."""
    if (path / COMPLETE).is_file():
        return "saved"
    root.mkdir(parents=True, exist_ok=True)
    if path.exists():
        discard(path, root)
    return "write"


TRASH = ".trash"
"""Folder of a checkpoints folder into which `prune` moves what it deletes, before deleting it in the background."""


class _Deleter:
    """One daemon thread deleting folders in the order given. A daemon: a run stopped by a signal exits without
    waiting for it (within a scheduler's grace period), leaving the rest in .trash for the next `prune`; a run
    that ends normally waits (`wait_for_deletions`)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Path | None] = queue.Queue()
        self.thread: threading.Thread | None = None

    def submit(self, folder: Path) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self.work, name="igpt-delete", daemon=True)
            self.thread.start()
        self.queue.put(folder)

    def work(self) -> None:
        while True:
            folder = self.queue.get()
            shutil.rmtree(folder, ignore_errors=True)
            self.queue.task_done()


_deleter = _Deleter()


def discard(folder: Path, root: Path) -> None:
    """Move `folder` into `root`/.trash at once (a rename: `latest` and resumes no longer see it) and delete it in
    the background thread."""
    trash = root / TRASH
    trash.mkdir(exist_ok=True)
    target = trash / f"{folder.parent.name}-{folder.name}-{uuid.uuid4().hex[:8]}"
    folder.rename(target)
    _deleter.submit(target)


def wait_for_deletions() -> None:
    """Block until the background deletions submitted so far are done."""
    _deleter.queue.join()


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (and their universal forms), every incomplete one, and
    what an earlier process left in .trash: moved aside now, deleted in the background (`discard`). A folder that
    cannot be moved (a busy or stale file on a network filesystem) is left where it is, with a warning: failing
    here, on rank 0 alone after the checkpoint is complete, would leave the other ranks waiting."""
    tags = sorted(p for p in root.glob("step_*") if p.is_dir())
    complete = [p for p in tags if (p / COMPLETE).is_file()]
    kept = {p.name for p in complete[-keep:]}
    leftovers = list((root / TRASH).iterdir()) if (root / TRASH).is_dir() else []
    for p in [*tags, *root.glob("universal/step_*")]:
        if p.name not in kept:
            try:
                discard(p, root)
            except OSError as e:
                print(f"warning: could not remove old checkpoint {p} ({e}); remove it by hand", flush=True)
    for p in leftovers:
        _deleter.submit(p)


def latest(root: Path) -> Path | None:
    """The checkpoint `latest` names, if it is complete (otherwise the newest complete one)."""
    named = root / LATEST
    if named.is_file() and (root / named.read_text().strip() / COMPLETE).is_file():
        return root / named.read_text().strip()
    complete = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())
    return complete[-1] if complete else None


def read_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / RUN_META).read_text())


def to_universal(ckpt: Path) -> Path:
    """Convert `ckpt` to DeepSpeed's universal form once (one process; ranks call it through `on_rank0`)."""
    from deepspeed.checkpoint import ds_to_universal

    out = ckpt.parent / "universal" / ckpt.name
    if not (out / COMPLETE).is_file():
        shutil.rmtree(out, ignore_errors=True)
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
        args = argparse.Namespace(
            input_folder=str(ckpt),
            output_folder=str(out),
            num_extract_workers=workers,
            num_merge_workers=max(1, workers // 2),
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
        ds_to_universal.main(args)
        write_text(out / COMPLETE, "")
    return out


def load(engine: Any, ckpt: Path, universal: bool) -> None:
    """Restore engine state from `ckpt` (all ranks; the universal form of it when `universal`) and this rank's
    RNG (when the topology is unchanged). The optimizer's hyperparameters and LR schedule stay the running
    config's, from the restored step (`engine.apply_schedule`)."""
    source = ckpt.parent / "universal" / ckpt.name if universal else ckpt
    path, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {source}")
    apply_schedule(engine)  # the run config's LR, betas, eps, weight decay: not those of the run that saved
    rng_file = ckpt / f"rng_rank{dist.get_rank():05d}.pt"
    if not universal and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, a checkpoints folder, or a checkpoint folder itself."""
    path = Path(path)
    if (path / RUN_META).is_file():
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir() and (found := latest(root)) is not None:
            return found
    raise ConfigError(f"{path} holds no complete checkpoint (run folder, checkpoints folder or step_* folder)")


def model_config(ckpt: Path) -> ModelConfig:
    return build(ModelConfig, yaml.safe_load((ckpt / "config.yaml").read_text())["model"], where="model.")


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The IGPT-named fp32 state dict of checkpoint folder `ckpt`, from either layout."""
    meta = read_meta(ckpt)
    if meta["layout"] == "pipeline":
        from igpt_ds.pipe import state_dict_from_layer_files, state_dict_from_universal

        ds_config = json.loads((ckpt / "ds_config.json").read_text())
        if any(ds_config.get(k, {}).get("enabled") for k in ("bf16", "fp16")):
            # The layer files hold the 16-bit weights; the fp32 masters are in the ZeRO-1 shards.
            return state_dict_from_universal(to_universal(ckpt), model_config(ckpt).n_layer)
        return state_dict_from_layer_files(ckpt, model_config(ckpt).n_layer)
    if meta["zero_stage"] == 0:
        return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def export_consolidated(path: str | Path, out_dir: str | Path) -> Path:
    """Write the weights of a run / checkpoint folder as a consolidated fp32 folder (igpt_ds.weights)."""
    ckpt = resolve(path)
    extra = {"source": str(ckpt.resolve()), "step": read_meta(ckpt)["step"]}
    return save_consolidated(out_dir, model_config(ckpt), consolidated_state_dict(ckpt), palette(ckpt), extra)


def palette(ckpt: Path) -> np.ndarray | None:
    return np.load(ckpt / PALETTE_FILE) if (ckpt / PALETTE_FILE).is_file() else None


def check_palette(colours: np.ndarray | None, split: ShardSplit, source: str | Path) -> None:
    """Refuse shards tokenised with another palette than checkpoint `source`'s (`colours`; None: no check):
    token k would be another colour than the model learnt, so features and samples would be wrong silently."""
    if colours is None or np.array_equal(np.asarray(colours, np.float32), split.palette):
        return
    where = Path(source) if is_consolidated(source) else resolve(source)
    raise ConfigError(
        f"shards {split.root} were tokenised with another palette than checkpoint {source}; tokenise them with "
        f"the checkpoint's palette: igpt-build-shards SOURCE --out DIR --palette {where / PALETTE_FILE}"
    )


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
    target: Any, state: Mapping[str, torch.Tensor], source: str, keep_init: tuple[str, ...] = (FINETUNE_HEAD,)
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
    Weights that do not fit the model are a ConfigError naming `source`, on every rank."""
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
        value = tensor_from_rank0(expected[name], lambda name=name: state[name])
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
    from igpt_ds.pipe import igpt_name

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
    found = {k: shape for k, shape in tensor_shapes(state).items() if not k.startswith(FINETUNE_HEAD)}
    check_weights({k: v.shape for k, v in model.state_dict().items()}, found, str(path))
    model.to_empty(device=device)
    with torch.no_grad():
        for name, target in model.state_dict().items():  # IGPT has no non-persistent buffers to fill
            target.copy_(state[name])
    return model.eval(), cfg, colours


def main(argv: list[str] | None = None) -> int:
    """`python -m igpt_ds.checkpoint RUN_OR_CHECKPOINT OUT_DIR`: export consolidated weights."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("source")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    try:
        print(export_consolidated(args.source, args.out_dir))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
