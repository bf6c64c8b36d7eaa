"""DeepSpeed checkpoints: save, find the latest complete one, load, convert to the universal form.

A run's checkpoints live in `runs/<name>/checkpoints/`:

    step_00000500/          DeepSpeed's files (engine.save_checkpoint, every rank) plus ours:
        rng_rank00000.pt    RNG states of each rank (torch, numpy, python)
        run.json            step, sampler position, topology (world, data-parallel size, layout)
        config.yaml, ds_config.json, git_rev.txt, palette.npy
        complete            written last, after every rank finished writing
    latest                  the tag of the newest complete checkpoint, replaced atomically
    universal/step_...      DeepSpeed universal form, made on demand to resume at a new topology
    .trash/                 old checkpoints on their way out (deleted in the background)

"Complete" means every rank returned from its save (a barrier) before rank 0 writes the marker and then swaps
`latest`; a save killed midway leaves `latest` on the previous checkpoint, and the half-written folder is deleted by
the next save. The folder must be on a filesystem every rank sees; durability against power loss is the
filesystem's.

Loading restores weights, optimizer and LR scheduler (DeepSpeed) and each rank's RNG states; the training loop
then puts the run config's hyperparameters back (`igpt_ds.train.engine.apply_schedule`). At a different
data-parallel size or stage count a ZeRO checkpoint cannot be loaded directly; it is converted once with
`deepspeed.checkpoint.ds_to_universal` and loaded with `"checkpoint": {"load_universal": true}` (RNG states then
restart from the seed).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from igpt_ds.atomic import unwritable, write_failure, write_text
from igpt_ds.checkpoint.weights import (
    PALETTE_FILE,
    is_consolidated,
)
from igpt_ds.config import ConfigError, ModelConfig, RunError, build
from igpt_ds.data.shards import ShardSplit
from igpt_ds.distributed.process_group import barrier
from igpt_ds.distributed.rank0 import on_rank0

LATEST = "latest"


COMPLETE = "complete"


RUN_META = "run.json"


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
    need_bytes: int = 0,
) -> Path:
    """Write checkpoint `step` on every rank (collective); mark it complete and latest; keep `keep`.

    RunError on every rank, before anything is written, when `root`'s filesystem has less free space than
    `need_bytes` (the checkpoint's size, `plan.memory.checkpoint_bytes`; rank 0 asks, one statvfs); RunError on a
    rank whose write fails for want of space or permission all the same (another job filled the disk meanwhile),
    naming the path and the errno's meaning (torch's writer reports neither). Either way `latest` and the earlier
    checkpoints stay as they were; the half-written folder lacks its `complete` marker and goes at the next save.

    `meta` (run.json: step, sampler state, topology) and `files` (name -> text) are written by rank 0. Whether the
    step is already saved (a rerun of a finished run) is rank 0's decision for every rank: a rank that decided from
    its own, stale, listing of a network filesystem would skip the collective save alone and hang the others.
    Old checkpoints are moved aside at once and deleted in a background thread (`prune`), so no rank waits at the
    next collective while rank 0 deletes tens of GB.
    """
    rank = dist.get_rank()
    path = root / tag_for(step)
    if on_rank0(lambda: prepare(root, path, need_bytes)) == "saved":
        return path
    # ds_to_universal refuses ZeRO-1/2 and pipeline checkpoints without this marker of the format.
    universal_info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    try:
        engine.save_checkpoint(str(root), tag=path.name, client_state=universal_info, save_latest=False)
        torch.save(rng_state(), path / f"rng_rank{rank:05d}.pt")
        if rank == 0:
            for name, text in files.items():
                (path / name).write_text(text)
            if palette is not None:
                np.save(path / PALETTE_FILE, palette)
            write_text(path / RUN_META, json.dumps(dict(meta, step=step), indent=2))
    except (OSError, RuntimeError) as e:
        why = write_failure(path, e)
        if why is None:
            raise
        raise RunError(f"could not write checkpoint {path} ({why}); {kept(root)}; free space there (or fix its "
                       "permissions), then rerun the same command to resume") from None  # fmt: skip
    barrier()  # every rank's files are written before the checkpoint counts
    if rank == 0:
        write_text(path / COMPLETE, "")
        write_text(root / LATEST, path.name)
        prune(root, keep)
    return path


def prepare(root: Path, path: Path, need_bytes: int = 0) -> str:
    """Rank 0, before a save: "saved" when `path` is already a complete checkpoint; otherwise "write", with `root`
    made and the leftovers of a save killed midway at `path` moved aside for deletion. RunError when `root` cannot
    take `need_bytes` more."""
    if (path / COMPLETE).is_file():
        return "saved"
    if path.exists():
        discard(path, root)
    why = unwritable(root, need_bytes)
    if why is not None:
        raise RunError(f"no room for checkpoint {path} ({why}); {kept(root)}; free space there, then rerun the "
                       "same command to resume")  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    return "write"


def kept(root: Path) -> str:
    """What a failed save leaves to resume from, as a clause."""
    last = latest(root)
    return f"{last} stays latest" if last is not None else "no checkpoint was written before"


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


def damage(ckpt: Path) -> str | None:
    """What is wrong with complete checkpoint `ckpt`, naming the file ('.../zero_pp_rank_1_mp_rank_00_optim_states.pt
    is truncated or not a torch file'), or None when it looks intact: run.json parses, every rank's RNG file is
    there, and every `.pt` file (torch's zip format) has its central directory, which a file cut short at any point
    lacks. Reads each file's last kilobytes, not its tensors: for 1,024 ranks ~2,000 files, one open and one small
    read each. Bytes changed in place are not seen (DeepSpeed's load reads them)."""
    import zipfile

    try:
        meta = read_meta(ckpt)
    except (OSError, ValueError) as e:
        return f"{ckpt / RUN_META} is unreadable ({e})"
    missing = [
        f"rng_rank{r:05d}.pt" for r in range(meta.get("world_size", 0)) if not (ckpt / f"rng_rank{r:05d}.pt").is_file()
    ]
    if missing:
        return f"{ckpt / missing[0]} is missing"
    for path in sorted(ckpt.rglob("*.pt")):
        try:
            with zipfile.ZipFile(path):
                pass
        except (OSError, zipfile.BadZipFile):
            return f"{path} is truncated or not a torch file"
    return None


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
    RNG (when the topology is unchanged). The caller then puts the run config's optimizer hyperparameters back
    (`igpt_ds.train.engine.apply_schedule`): the checkpoint holds those of the run that saved it."""
    source = ckpt.parent / "universal" / ckpt.name if universal else ckpt
    try:
        path, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:  # torch's reader names no file
        raise ConfigError(f"could not load checkpoint {source} ({type(e).__name__}: {e}); restore it, or rerun with "
                          "--train.resume_fallback=true to resume from the checkpoint before it") from None  # fmt: skip
    if path is None:
        raise ConfigError(f"DeepSpeed found no checkpoint to load in {source}")
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
    """A checkpoint folder from a run folder, a checkpoints folder, or a checkpoint folder itself; ConfigError when
    there is none, or when it is damaged (`damage`, naming the file)."""
    path = Path(path)
    found = path if (path / RUN_META).is_file() else None
    for root in (path / "checkpoints", path):
        if found is None and root.is_dir():
            found = latest(root)
    if found is not None:
        why = damage(found)
        if why is not None:
            raise ConfigError(f"checkpoint {found} is damaged: {why}; restore it, or name an intact checkpoint folder")
        return found
    raise ConfigError(f"{path} holds no complete checkpoint (run folder, checkpoints folder or step_* folder)")


def model_config(ckpt: Path) -> ModelConfig:
    return build(ModelConfig, yaml.safe_load((ckpt / "config.yaml").read_text())["model"], where="model.")


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
