"""What a run writes into its folder besides checkpoints: the resolved config, the DeepSpeed JSON actually used,
the code's revision, and the TensorBoard writer with the run's header line.

    files = run_folder.run_files(resolved_config, ds_config)
    run_folder.write_run_files(run_dir, files, rank)   # config.yaml, ds_config.json, git_rev.txt (rank 0, atomically)
    writer = run_folder.open_tensorboard(run_dir, rank, step, files, engine_line)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from igpt_ds.atomic import write_text
from igpt_ds.distributed.rank0 import on_rank0


def run_files(resolved: dict[str, Any], ds_config: dict[str, Any]) -> dict[str, str]:
    """The files that say what ran: the resolved config, the DeepSpeed config actually used, the code's revision
    (asked of git by rank 0 alone, for every rank: two git processes per job, not per rank). Written into the run
    folder and into every checkpoint. Collective."""
    plain = json.loads(json.dumps(resolved))  # tuples -> lists for YAML
    return {
        "config.yaml": yaml.safe_dump(plain, sort_keys=False),
        "ds_config.json": json.dumps(ds_config, indent=2),
        "git_rev.txt": on_rank0(git_revision),
    }


def write_run_files(run_dir: Path, files: dict[str, str], rank: int) -> None:
    """Rank 0 writes `files` into the run folder, each atomically."""
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            write_text(run_dir / name, text)


def open_tensorboard(run_dir: Path, rank: int, step: int, files: dict[str, str], engine_line: str):
    """Rank 0's SummaryWriter on `<run_dir>/tensorboard` (None elsewhere), holding the config and the engine header
    as text at `step`; the header is also printed: one line per run saying how it runs (`train.engine.describe`)."""
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    writer.add_text("config", f"```\n{files['config.yaml']}\n```", step)
    writer.add_text("engine", engine_line, step)
    writer.flush()
    print(engine_line, flush=True)
    return writer


def open_run(
    run_dir: Path, resolved: dict[str, Any], ds_config: dict[str, Any], rank: int, step: int, header: str
) -> tuple[dict[str, str], Any]:
    """(files, writer) of a run starting or resuming at `step`: the files that say what ran (`run_files`), written into
    the run folder by rank 0, and rank 0's TensorBoard writer holding them and the engine `header` (None elsewhere).
    Collective (git is asked by rank 0)."""
    files = run_files(resolved, ds_config)
    write_run_files(run_dir, files, rank)
    return files, open_tensorboard(run_dir, rank, step, files, header)


def resumed_line(resuming: Any, step: int, reset_data_position: bool) -> str:
    """The console line of a run resuming checkpoint `resuming` (a `checkpoint.resume.Resume`) at `step`."""
    how = (" (universal checkpoint)" if resuming.universal else "") + (
        ", data order started afresh" if reset_data_position else ""
    )
    return f"resumed from {resuming.ckpt} at step {step}{how}"


def git_revision() -> str:
    """The commit of the code that ran, '+dirty' when the tree had changes; 'unknown' outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], cwd=here, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown\n"
    if rev.returncode != 0:
        return "unknown\n"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") + "\n"
