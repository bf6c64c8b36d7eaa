"""Frozen-feature extraction for linear probes (docs/reference.md#evaluation).

The feature of layer l is f^l = mean over positions of LN(h^l), block l's normalised input; l = n_layer
is the final norm's output. One forward pass yields every requested layer (`IGPT.features`); a BERT model's
input is masked as in training, features averaged over `bert_masks` masks per image (`eval_features`).

Features are sharded by rank, on any filesystem (layout: `igpt_ds.eval.feature_store`). Each rank computes the
parts p of a split with p mod world = rank and writes them into files of its own; batches start at
multiples of the batch size inside every part, so the features are bit for bit the same at any world size.
Rank 0 then waits, polling the filesystem rather than a collective, until every part exists, and writes
the index that readers use; the other ranks are free to exit. A killed extraction rerun with the same
checkpoint, shards, layers and batch size keeps the parts it finished; a rerun over a complete split does
nothing.

Memory per rank: the model (every rank holds it: data-parallel inference; igpt-xl's 6.8B fp32 weights
take 27 GB, within one 80 GB GPU) plus one batch of activations and of features
(batch × n_extracted_layers × n_embd × 4 B), whatever the dataset's size. Weights are read once for every rank:
a DeepSpeed checkpoint is first consolidated by rank 0 into `<out>/weights/`, then rank 0 reads each tensor and
broadcasts it (`checkpoint.export.consolidated_for_ranks`, `load_model_for_ranks`). The loop takes no host-device
sync but one per batch, when its features leave the device, overlapped with the next batch (`prefetch.HostCopy`).

    python launcher/extract_features.py --checkpoint runs/digits --shards demo_out/shards --out demo_out/features
    deepspeed --num_gpus 8 launcher/extract_features.py --checkpoint runs/igpt-l --shards data/cifar10_32 \\
        --out runs/igpt-l/features --layers '[16,20,24,28,32]'
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from igpt_ds import host_sync
from igpt_ds.atomic import unwritable
from igpt_ds.checkpoint.ds_checkpoint import check_palette, read_meta, resolve
from igpt_ds.checkpoint.export import load_model_for_ranks
from igpt_ds.checkpoint.weights import is_consolidated
from igpt_ds.config import ConfigError, DataConfig
from igpt_ds.data.palette import decode
from igpt_ds.data.prefetch import HostBatch, HostCopy, pins, read_ahead, to_device
from igpt_ds.data.shards import ShardSplit, open_shards
from igpt_ds.distributed import process_group
from igpt_ds.distributed.process_group import init_distributed
from igpt_ds.distributed.rank0 import check_output, on_rank0
from igpt_ds.eval.feature_store import finish_split, missing_parts, part_writer, prepare_split, split_plan
from igpt_ds.models.igpt import IGPT
from igpt_ds.models.inference import autocast, inference_dtype
from igpt_ds.models.objectives import eval_bert_masks


@dataclass
class ExtractConfig:
    """Feature extraction from a checkpoint (launcher/extract_features.py)."""

    checkpoint: str = ""
    """Run folder, DeepSpeed checkpoint folder (ZeRO or pipeline) or consolidated weights folder."""
    shards: str = "demo_out/shards"
    """Shard folder (manifest.json) holding the labelled splits."""
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    layers: list[int] = field(default_factory=list)
    """Layers to extract (l < n_layer: block l's normalised input; n_layer: final norm). Empty = all."""
    out: str = "demo_out/features"
    """Output folder: one subfolder per split."""
    batch_size: int = 64
    """Images per forward pass on one rank."""
    precision: str = "bf16"
    """Compute dtype on GPU (bf16, fp16, fp32); CPU always computes in fp32. Features are stored as fp32."""
    bert_masks: int = 1
    """BERT models: features are the mean over this many evaluation masks per image (OpenAI's code masks every
    forward: 1; the paper ensembles several); 0 extracts from unmasked inputs, which the model never saw in
    training. Ignored for AR models."""
    dist_timeout_s: int = 600
    """Collective timeout; also how long rank 0 waits for other ranks' parts without any of them finishing one."""

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint must name a run, checkpoint or consolidated folder")
        if self.batch_size < 1 or not self.splits or self.bert_masks < 0:
            raise ConfigError("batch_size must be >= 1, splits non-empty, bert_masks >= 0")
        inference_dtype(torch.device("cpu"), self.precision)  # validates the name


def resolve_layers(layers: list[int], n_layer: int) -> list[int]:
    """Sorted distinct layers; empty means every block input 0..n_layer-1 plus the final norm (n_layer)."""
    if not layers:
        return list(range(n_layer + 1))
    bad = [l for l in layers if not 0 <= l <= n_layer]
    if bad:
        raise ConfigError(f"layers {bad} out of range: this model has layers 0..{n_layer} ({n_layer} = final norm)")
    return sorted(set(layers))


def checkpoint_identity(path: str | Path) -> dict[str, Any]:
    """Which weights a checkpoint argument names right now: a rerun after training went on is not the same."""
    if is_consolidated(path):
        weights = Path(path) / "model.safetensors"
        stat = weights.stat()
        return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    ckpt = resolve(path)
    return {"path": str(ckpt.resolve()), "step": read_meta(ckpt)["step"]}


def extract_parts(
    model: IGPT,
    split: ShardSplit,
    out_dir: Path,
    plan: dict,
    rank: int = 0,
    world: int = 1,
    precision: str = "bf16",
    progress: bool = True,
    bert_masks: int = 1,
) -> int:
    """Compute and write this rank's missing parts of `split`; returns how many it wrote. Touches no file
    another rank writes and takes part in no collective. Batches start at multiples of the batch size."""
    mine, part_rows, n = missing_parts(out_dir, plan, rank, world), plan["part_rows"], plan["n"]
    device = next(model.parameters()).device
    layers, batch_size, channels = plan["layers"], plan["batch_size"], plan["channels"]
    bar = tqdm(total=sum(min(part_rows, n - p * part_rows) for p in mine), unit="img", disable=not progress,
               desc=f"features {out_dir.name} (rank {rank})")  # fmt: skip

    def host(start: int, stop: int) -> Iterator[HostBatch]:
        """(first row, tokens numpy, tokens, *BERT masks) of each batch of rows start..stop, on the host."""
        for a in range(start, stop, batch_size):
            rows = np.arange(a, min(a + batch_size, stop))
            tokens = split.batch(rows)[0]
            yield (a, tokens, torch.from_numpy(tokens), *eval_bert_masks(model.cfg, rows, bert_masks))

    # One autocast region, no sync per layer or batch: a batch's features (layers, B, C) leave the device in one
    # asynchronous copy, written out once the next batch is queued (`HostCopy`).
    with torch.no_grad(), autocast(device, precision), host_sync.hot():
        for p in mine:
            start, stop = p * part_rows, min(n, (p + 1) * part_rows)
            with part_writer(out_dir, p, plan) as (feats, pixels):
                pending = None  # (row in the part, its tokens, its features on their way to the host)
                for a, numpy_tokens, tokens, *masks in read_ahead(host(start, stop), pin_memory=pins(device)):
                    tokens, *masks = to_device((tokens, *masks), device)
                    out = eval_features(model, tokens, layers, masks)
                    copy = HostCopy(torch.stack([out[l].float() for l in layers]))  # (layers, B, C)
                    if pending is not None:
                        bar.update(write_rows(feats, pixels, *pending, split.palette, channels, start, out_dir))
                    pending = (a - start, numpy_tokens, copy)
                if pending is not None:
                    bar.update(write_rows(feats, pixels, *pending, split.palette, channels, start, out_dir))
    bar.close()
    return len(mine)


def write_rows(
    feats: np.ndarray, pixels: np.ndarray, row: int, tokens: np.ndarray, copy: HostCopy, palette: np.ndarray,
    channels: int, part_start: int, out_dir: Path,
) -> int:  # fmt: skip
    """Write one batch's features (once their copy has landed) and decoded pixels at `row` of a part; its size.
    ConfigError when a feature is NaN or infinite (a diverged checkpoint, or bf16 overflowing): the part is not
    kept, and a probe never sees it. A pass over the batch's features on the host, which the write makes anyway."""
    n = len(tokens)
    values = copy.numpy()
    if not np.isfinite(values).all():
        first = part_start + row + int(np.flatnonzero(~np.isfinite(values).all(axis=(0, 2)))[0])
        raise ConfigError(f"{out_dir}: the model gives non-finite features for image {first} of the split; check "
                          "the checkpoint (a diverged run) or extract with --precision=fp32")  # fmt: skip
    feats[:, row : row + n] = values
    pixels[row : row + n] = decode(tokens, palette)[..., :channels].reshape(n, -1)
    return n


def extract(cfg: ExtractConfig) -> dict[str, Path]:
    """Extract `cfg.layers` of every split in `cfg.splits` (every rank); returns split -> folder.

    Every rank first computes its parts of every split; rank 0 alone then waits for the others' parts and
    writes the indexes, while the other ranks are free to exit."""
    rank, world = init_distributed(cfg.dist_timeout_s)
    check_output(cfg.out, "--out")  # before the weights are converted into it
    device = process_group.device()
    model, model_cfg, palette = load_model_for_ranks(cfg.checkpoint, Path(cfg.out) / "weights", device)
    layers = resolve_layers(cfg.layers, model_cfg.n_layer)
    splits = {name: open_shards(model_cfg, DataConfig(shards=cfg.shards), name) for name in cfg.splits}

    def decide() -> dict[str, tuple[dict, str]]:
        """Rank 0 checks the inputs and reads what is already on disk, once for every rank."""
        source = checkpoint_identity(cfg.checkpoint)
        if model_cfg.objective == "bert":
            source["bert_masks"] = cfg.bert_masks  # other masks, other features: a rerun starts the split over
        for name, split in splits.items():
            check_palette(palette, split, cfg.checkpoint)
            if (split.labels < 0).any():
                raise ConfigError(
                    f"split {name!r} of {cfg.shards} has {int((split.labels < 0).sum())} unlabelled images of "
                    f"{len(split)}; the probe needs labels for every image: build the shards from a labelled source"
                )
        plans = {k: split_plan(split, layers, model_cfg.n_embd, cfg.batch_size, source) for k, split in splits.items()}
        need = sum(p["n"] * (4 * len(p["layers"]) * p["dim"] + p["seq_len"] * p["channels"]) for p in plans.values())
        why = unwritable(cfg.out, need)  # float32 features of every layer and the uint8 pixels, every split
        if why is not None:
            raise ConfigError(f"no room for the features in out={cfg.out} ({why}); choose another folder or fewer "
                              "--layers")  # fmt: skip
        return {name: (plan, prepare_split(Path(cfg.out) / name, plan)) for name, plan in plans.items()}

    decisions = on_rank0(decide)
    for name, (plan, state) in decisions.items():
        if state != "done":
            extract_parts(
                model, splits[name], Path(cfg.out) / name, plan, rank, world, cfg.precision, rank == 0, cfg.bert_masks
            )
    outputs = {name: Path(cfg.out) / name for name in splits}
    if rank == 0:
        meta = {
            "checkpoint": str(cfg.checkpoint),
            "shards": str(cfg.shards),
            "n_layer": model_cfg.n_layer,
            "model": asdict(model_cfg),
            "precision": str(inference_dtype(device, cfg.precision)).removeprefix("torch."),
            "world_size": world,
        }
        for name, (plan, state) in decisions.items():
            if state == "done":
                print(f"{name}: already extracted in {outputs[name]}")
                continue
            split = splits[name]
            finish_split(outputs[name], plan, split.labels, split.class_names, meta, cfg.dist_timeout_s)
            print(f"{name}: {plan['n']} images x {len(layers)} layers (dim {model_cfg.n_embd}) -> {outputs[name]}")
    return outputs


def eval_features(model: IGPT, tokens: Tensor, layers: list[int], masks: list[Tensor] = ()) -> dict[int, Tensor]:
    """`IGPT.features` of `tokens` (B, T); given BERT evaluation masks (`eval_bert_masks`, on tokens' device), their
    mean over the masks (the paper ensembles BERT masks). No masks: one plain pass (AR, or unmasked)."""
    if not masks:
        return model.features(tokens, layers)
    total: dict[int, Tensor] = {}
    for mask in masks:
        out = model.features(tokens, layers, mask)
        total = {l: total.get(l, 0) + f.float() / len(masks) for l, f in out.items()}
    return total
