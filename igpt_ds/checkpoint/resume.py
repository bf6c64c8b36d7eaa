"""Whether and how a run resumes: decided once, by rank 0, and refused in one line when the checkpoint no longer
fits the run.

`decide(...)` runs on rank 0 (through `distributed.rank0.on_rank0`) and every rank receives its answer: which
checkpoint (or none), its run.json, and whether it must go through DeepSpeed's universal form. Ranks never
read `latest` or the `complete` markers themselves, so a stale directory listing on a network filesystem
cannot send one rank into a resume and another into a fresh start (a hang at scale).

What a checkpoint depends on, and what happens when it changed since it was written:

| changed since the checkpoint              | on resume                                                        |
|-------------------------------------------|------------------------------------------------------------------|
| world size, data-parallel size, stages    | supported: converted to DeepSpeed's universal form and loaded     |
| LR, warmup, schedule, max_steps, stop_at, | supported: the schedule of the new config from the restored step |
| betas, eps, weight decay                  | (`train.engine.apply_schedule`)                                  |
| log / eval / save cadence, keep, timeouts | supported                                                        |
| train.global_batch, train.micro_batch     | supported: the data position is counted in images, the schedule  |
|                                           | in steps; micro_batch changes only gradient accumulation         |
| training images (shards rebuilt), seed,   | refused; `train.reset_data_position=true` continues from the     |
| views a training image (K, data.views),   | weights, optimizer and step with the data order started afresh   |
| data.flip                                 |                                                                  |
| palette                                   | refused (tokens would mean other colours)                       |
| model shape or objective, layout          | refused; export the weights and start a run with init_from       |
| ZeRO stage, precision (bf16 / fp16 / fp32)| refused; keep them, or export the weights and init_from; a GPU  |
|                                           | run naming no JSON keeps its checkpoint's stage at any GPU count |

Each refusal is a ConfigError naming the checkpoint, what changed (then and now) and the ways out, raised
before the engine is built. A damaged checkpoint (a truncated or missing file) is refused naming the file;
train.resume_fallback=true resumes from the intact one before it instead (`intact_latest`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igpt_ds.checkpoint import ds_checkpoint
from igpt_ds.config import ConfigError, DataConfig, ModelConfig, precision, zero_stage
from igpt_ds.data.shards import ShardSplit
from igpt_ds.distributed.rank0 import on_rank0

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "n_px", "n_vocab", "bias", "objective")
"""Model fields a checkpoint's weights are bound to."""


@dataclass
class Resume:
    ckpt: Path
    meta: dict[str, Any]
    """run.json: step, sampler state, topology, data identity."""
    universal: bool
    """Load through DeepSpeed's universal form (another topology than the one that saved)."""


def data_identity(split: ShardSplit, data: DataConfig) -> dict[str, Any]:
    """What the data position of a checkpoint refers to: the split's size, its shard files' sha256 (from the
    manifest, not recomputed; the views' too when training reads them) and the palette's; the views a training
    image has (0: the evaluation crop) and whether samples are flipped (`igpt_ds.data.views`)."""
    views = split.n_views if data.views else 0
    shards = split.manifest["splits"][split.split]["shards"]
    digest = hashlib.sha256("".join(s["sha256"] + (s["views_sha256"] if views else "") for s in shards).encode())
    palette = split.manifest["palette"]["sha256"]
    return {"split": split.split, "n": len(split), "shards_sha256": digest.hexdigest(), "palette_sha256": palette,
            "views": views, "flip": data.flip}  # fmt: skip


def decide(
    root: Path,
    model: ModelConfig | None,
    layout: str,
    world: int,
    dp: int,
    ds_config: dict[str, Any],
    data: dict[str, Any],
    seed: int,
    reset_data_position: bool,
    stage_from_checkpoint: bool = False,
    fallback: bool = False,
) -> Resume | None:
    """Rank 0's answer for every rank: the checkpoint to resume from `root` (None: start fresh), after checking
    that it fits this run (see the module docstring); ConfigError otherwise. `model` None: the run takes its
    model from the checkpoint (fine-tuning), nothing to compare. `stage_from_checkpoint`: the run named no JSON and
    its default policy follows the checkpoint's ZeRO stage (1-3; `train.engine.choose_policy`), so a stage chosen
    otherwise at another GPU count is no reason to refuse. A damaged checkpoint (`ds_checkpoint.damage`) is a
    ConfigError naming the file, or, with `fallback` (train.resume_fallback), moved aside for the one before it."""
    ckpt = intact_latest(root, fallback)
    if ckpt is None:
        return None
    meta = ds_checkpoint.read_meta(ckpt)
    export = (f"to start a new run from its weights: python -m igpt_ds.checkpoint {ckpt} WEIGHTS, then "
              f"--train.name=NEW --train.init_from=WEIGHTS")  # fmt: skip
    then = ds_checkpoint.model_config(ckpt)
    changed = [f"model.{k}={getattr(then, k)} then, {getattr(model, k)} now" for k in MODEL_KEYS
               if model is not None and getattr(then, k) != getattr(model, k)]  # fmt: skip
    if meta["layout"] != layout:
        changed.append(f"train.layout={meta['layout']} then, {layout} now")
    if changed:
        raise ConfigError(
            f"{ckpt} does not fit this run ({'; '.join(changed)}); resume with the same model, or {export}"
        )
    saved_ds = json.loads((ckpt / "ds_config.json").read_text())
    stage_now = zero_stage(ds_config)
    pairs = [("precision", precision(saved_ds), precision(ds_config))]
    if not (stage_from_checkpoint and meta.get("zero_stage", 0) in (1, 2, 3)):
        pairs.insert(0, ("ZeRO stage", meta.get("zero_stage", 0), stage_now))
    engine = [(what, a, b) for what, a, b in pairs if a != b]
    if engine:
        what = "; ".join(f"{w} {a} then, {b} now" for w, a, b in engine)
        raise ConfigError(f"{ckpt} was written with another engine policy ({what}, train.ds_config); resume with "
                          f"the policy it was written with, or {export}")  # fmt: skip
    then_data = meta.get("data") or {"n": meta["sampler"]["n_samples"]}
    if then_data.get("palette_sha256", data["palette_sha256"]) != data["palette_sha256"]:
        raise ConfigError(f"{ckpt} was trained on shards tokenised with another palette than data.shards' (its "
                          "tokens would mean other colours); tokenise the images with the run's palette: "
                          f"igpt-build-shards SOURCE --out DIR --palette {ckpt / 'palette.npy'}")  # fmt: skip
    moved = []
    if then_data["n"] != data["n"]:
        moved.append(f"the {data['split']} split has {data['n']:,} images, {then_data['n']:,} then")
    elif then_data.get("views", 0) != data["views"]:
        moved.append(f"{data['views']} views a training image now, {then_data.get('views', 0)} then "
                     "(igpt-build-shards --views, data.views)")  # fmt: skip
    elif then_data.get("shards_sha256", data["shards_sha256"]) != data["shards_sha256"]:
        moved.append(f"the {data['split']} split's shard files changed")
    if then_data.get("flip", False) != data["flip"]:
        moved.append(f"data.flip={data['flip']}, {then_data.get('flip', False)} then")
    if meta["sampler"]["seed"] != seed:
        moved.append(f"train.seed={seed}, {meta['sampler']['seed']} then")
    if moved and not reset_data_position:
        raise ConfigError(
            f"{ckpt} was written for other training data ({'; '.join(moved)}), so its data position means nothing "
            "now; restore the shards and seed it was written with, or set --train.reset_data_position=true to "
            "continue from its weights, optimizer and step with the data order started afresh"
        )
    universal = (meta["world_size"], meta["dp_size"]) != (world, dp)
    return Resume(ckpt, meta, universal)


def intact_latest(root: Path, fallback: bool) -> Path | None:
    """The checkpoint `latest` names if intact; with `fallback`, the newest intact one, each damaged one newer than
    it renamed damaged_<tag> (kept for a look; `latest` and the next saves no longer see it) with a printed line;
    ConfigError naming the damaged file otherwise."""
    while (ckpt := ds_checkpoint.latest(root)) is not None:
        why = ds_checkpoint.damage(ckpt)
        if why is None:
            return ckpt
        if not fallback:
            raise ConfigError(f"the checkpoint to resume, {ckpt}, is damaged: {why}; restore it, or rerun with "
                              "--train.resume_fallback=true to resume from the intact one before it")  # fmt: skip
        aside = ckpt.with_name(f"damaged_{ckpt.name}")
        ckpt.rename(aside)
        print(f"warning: {why}; moved aside to {aside}; resuming from the checkpoint before it "
              "(train.resume_fallback)", flush=True)  # fmt: skip
    return None


def resume_plan(run_dir: Path, **check: Any) -> Resume | None:
    """The checkpoint this run resumes from (None: a fresh start), decided by rank 0 for every rank.

    `check` goes to `decide` (model, layout, world, dp, ds_config, data, seed, reset_data_position), which
    raises ConfigError for a checkpoint that does not fit the run. A checkpoint saved at another data-parallel
    size is converted to DeepSpeed's universal format first (minutes for a large model: on rank 0, outside any
    timed collective); the caller then builds its DeepSpeed config with `load_universal=True`.
    """
    found = on_rank0(lambda: decide(run_dir / "checkpoints", **check))
    if found is not None and found.universal:
        on_rank0(lambda: ds_checkpoint.to_universal(found.ckpt))
    return found
