"""One run's lifecycle around a DeepSpeed engine, shared by pretraining (igpt_ds.trainer) and fine-tuning
(igpt_ds.finetune): the resume decision, universal conversion, run files and the TensorBoard writer.

    plan = run.resume_plan(run_dir, ...)        # rank 0 decides for every rank; converts to universal if needed
    ds_config, policy = run.resumed_engine_config(plan, ...)   # when resuming: stage and loader of the checkpoint
    files = run.run_files(resolved_config, ds_config)
    run.write_run_files(run_dir, files, rank)   # config.yaml, ds_config.json, git_rev.txt (rank 0, atomically)
    writer = run.open_tensorboard(run_dir, rank, step, files, engine_line)

Every function is called on every rank; the rank-0-only work (deciding, converting, writing) runs through
`distributed.on_rank0`, so no rank waits on it inside a timed collective.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from igpt_ds import checkpoint, resume
from igpt_ds.atomic import write_text
from igpt_ds.config import ModelConfig, OptimConfig, TrainConfig
from igpt_ds.distributed import on_rank0
from igpt_ds.engine import DEFAULT_STAGES, Policy, build_ds_config, choose_policy


def resume_plan(run_dir: Path, **check: Any) -> resume.Resume | None:
    """The checkpoint this run resumes from (None: a fresh start), decided by rank 0 for every rank.

    `check` goes to `resume.plan` (model, layout, world, dp, ds_config, data, seed, reset_data_position), which
    raises ConfigError for a checkpoint that does not fit the run. A checkpoint saved at another data-parallel
    size is converted to DeepSpeed's universal format first (minutes for a large model: on rank 0, outside any
    timed collective); the caller then builds its DeepSpeed config with `load_universal=True`.
    """
    plan = on_rank0(lambda: resume.plan(run_dir / "checkpoints", **check))
    if plan is not None and plan.universal:
        on_rank0(lambda: checkpoint.to_universal(plan.ckpt))
    return plan


def resumed_engine_config(
    plan: resume.Resume, train: TrainConfig, optim: OptimConfig, world: int, model: ModelConfig | None, policy: Policy
) -> tuple[dict[str, Any], Policy]:
    """(DeepSpeed config, policy) of a run resuming `plan`: the checkpoint's ZeRO stage when the run named no JSON
    and its default policy follows the checkpoint (`engine.choose_policy`; the memory estimate may pick another
    stage at another GPU count, and a ZeRO checkpoint loads at its own stage only), and DeepSpeed's universal
    loader when the topology changed."""
    if policy.follows_checkpoint and plan.meta.get("zero_stage") in DEFAULT_STAGES:
        policy = choose_policy(train, model, world, stage=plan.meta["zero_stage"])
    return build_ds_config(train, optim, world, plan.universal, model, policy), policy


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
    as text at `step`; the header is also printed: one line per run saying how it runs (`engine.describe`)."""
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    writer.add_text("config", f"```\n{files['config.yaml']}\n```", step)
    writer.add_text("engine", engine_line, step)
    writer.flush()
    print(engine_line, flush=True)
    return writer


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
