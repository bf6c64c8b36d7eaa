"""Autoregressive sampling and image completion (Chen et al. 2020, Figure 1).

    deepspeed --num_gpus 8 launcher/sample.py --checkpoint runs/igpt_s --shards data/imagenet32 --top_k 40
    python launcher/sample.py --checkpoint runs/digits --shards demo_out/shards     (one process, CPU or GPU)

Unconditional samples start from the SOS vector alone; completions are given the top half of real
images (the first n_px²/2 raster tokens) and generate the bottom half. Decoding is incremental with
the model's key/value cache (`IGPT.step`), so each new pixel costs one token's forward pass;
`use_cache=False` recomputes the whole prefix every step (the reference the cache must equal and the
baseline `bench/sample_throughput.py` measures the speed-up against).

Randomness: image i at position t draws its token by inverse-CDF sampling with one uniform number
from a generator seeded by (seed, i). A sample therefore depends on the seed and its image index
only: the same on any batch size, any number of ranks, cached or not. With several ranks and a
DeepSpeed checkpoint, rank 0 first consolidates its weights into `<out>/weights/` (once).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from igpt_ds import host_sync
from igpt_ds.atomic import atomic_file
from igpt_ds.checkpoint.ds_checkpoint import check_palette
from igpt_ds.checkpoint.export import load_model_for_ranks
from igpt_ds.config import ConfigError, DataConfig
from igpt_ds.data.palette import decode
from igpt_ds.data.sampler import rank_rows
from igpt_ds.data.shards import open_shards
from igpt_ds.distributed import process_group
from igpt_ds.distributed.process_group import barrier, init_distributed
from igpt_ds.distributed.rank0 import check_output, gather_objects
from igpt_ds.eval.plots import image_grid, save_png
from igpt_ds.models.igpt import IGPT
from igpt_ds.models.inference import autocast, inference_dtype
from igpt_ds.models.kv_cache import KVCache

# Spreads per-image seeds apart so (seed, image) pairs do not collide across nearby seeds.
_SEED_STRIDE = 1_000_003


def image_uniforms(seed: int, indices: range | list[int], seq_len: int) -> Tensor:
    """(len(indices), seq_len) uniforms in [0, 1): row i depends only on (seed, indices[i])."""
    gen = torch.Generator()
    rows = []
    for i in indices:
        gen.manual_seed(seed * _SEED_STRIDE + i)
        rows.append(torch.rand(seq_len, generator=gen, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.empty(0, seq_len, dtype=torch.float64)


def pick(logits: Tensor, u: Tensor, temperature: float, top_k: int) -> Tensor:
    """Next tokens (B,) from logits (B, V) given uniforms u (B,) float64 on logits' device; temperature 0 is
    greedy."""
    logits = logits.double()
    if temperature == 0:
        return logits.argmax(dim=-1)
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(dim=-1)
    # right=True: the first index whose cdf exceeds u·total, which always has probability > 0.
    target = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def generate(
    model: IGPT,
    prefix: Tensor,
    uniforms: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    use_cache: bool = True,
    precision: str = "fp32",
) -> Tensor:
    """Complete each row of `prefix` (B, t0) to a full image (B, seq_len) of int64 tokens.

    `uniforms` (B, seq_len) supplies the randomness (see `image_uniforms`); t0 = 0 is unconditional.
    The given prefix is copied into the output unchanged.
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    B, t0 = prefix.shape
    if cfg.objective != "ar":
        raise ValueError("sampling needs a model trained with the AR objective")
    out = torch.zeros(B, cfg.seq_len, dtype=torch.long, device=device)
    out[:, :t0] = prefix.to(device, non_blocking=True)
    if t0 == cfg.seq_len:
        return out
    uniforms = uniforms.to(device, non_blocking=True)  # once: a copy per generated pixel would wait for the device
    with autocast(device, precision), host_sync.hot():
        if use_cache:
            cache = KVCache(cfg, B, device, inference_dtype(device, precision))
            logits = model.step(out[:, :t0], cache)
        for t in range(t0, cfg.seq_len):
            if not use_cache:
                # The forward shifts right behind SOS, so position t's logits need tokens 0..t-1 only.
                logits = model(out[:, : t + 1])[:, t]
            out[:, t] = pick(logits, uniforms[:, t], temperature, top_k)
            if use_cache and t + 1 < cfg.seq_len:
                logits = model.step(out[:, t : t + 1], cache)
    return out


def sample_images(
    model: IGPT,
    indices: range,
    seed: int,
    batch_size: int,
    prefixes: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """Tokens (len(indices), seq_len) for global image numbers `indices`, in batches.

    `prefixes` (len(indices), t0) gives each image's known first tokens (None: unconditional).
    Extra keyword arguments go to `generate` (temperature, top_k, use_cache, precision).
    """
    seq_len = model.cfg.seq_len
    if prefixes is None:
        prefixes = torch.zeros(len(indices), 0, dtype=torch.long)
    chunks = []
    for start in range(0, len(indices), batch_size):
        part = indices[start : start + batch_size]
        u = image_uniforms(seed, part, seq_len)
        tokens = generate(model, prefixes[start : start + len(part)], u, **kwargs)
        with host_sync.deliberate():  # a finished batch of images leaves the device
            chunks.append(tokens.cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, seq_len, dtype=torch.long)


@dataclass
class SampleConfig:
    """Sampling image completions from a checkpoint (launcher/sample.py)."""

    checkpoint: str = ""
    """Run folder, DeepSpeed checkpoint folder (ZeRO or pipeline) or consolidated weights folder."""
    shards: str = ""
    """Shard folder whose `split` supplies the images to complete; empty = unconditional samples only."""
    split: str = "test"
    n_images: int = 8
    """Real images to complete (grid rows), spread evenly over the split."""
    n_completions: int = 4
    """Completions per image (grid columns after original and given half)."""
    n_unconditional: int = 16
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_k: int = 0
    """Sample among the k most likely colours only (0 = all)."""
    batch_size: int = 64
    seed: int = 0
    precision: str = "bf16"
    """Compute dtype on GPU (bf16, fp16, fp32); CPU always computes in fp32."""
    out: str = "demo_out/samples"
    """Output folder: completions.png, unconditional.png, tokens.npz, tensorboard/."""
    scale: int = 0
    """Grid pixel enlargement (0 = enough for ~64-pixel-wide images)."""
    dist_timeout_s: int = 600

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint must name a run, checkpoint or consolidated folder")
        if self.temperature < 0 or self.top_k < 0 or self.batch_size < 1 or self.scale < 0:
            raise ConfigError("temperature, top_k and scale must be >= 0 and batch_size >= 1")
        if min(self.n_images, self.n_completions, self.n_unconditional) < 0:
            raise ConfigError("n_images, n_completions and n_unconditional must be >= 0")
        inference_dtype(torch.device("cpu"), self.precision)


def sample(cfg: SampleConfig) -> dict[str, Path]:
    """Completions of real images and unconditional samples (every rank samples a slice); rank 0 writes
    the PNG grids, the tokens and TensorBoard images. Returns the paths written (rank 0)."""
    rank, world = init_distributed(cfg.dist_timeout_s)
    check_output(cfg.out, "--out")  # before the weights are converted into it
    device = process_group.device()
    model, model_cfg, palette = load_model_for_ranks(cfg.checkpoint, Path(cfg.out) / "weights", device)
    gen = dict(temperature=cfg.temperature, top_k=cfg.top_k, precision=cfg.precision)
    half = model_cfg.seq_len // 2  # the top n_px/2 rows in raster order
    originals = torch.zeros(0, model_cfg.seq_len, dtype=torch.long)
    if cfg.shards and cfg.n_images and cfg.n_completions:
        split = open_shards(model_cfg, DataConfig(shards=cfg.shards), cfg.split)
        check_palette(palette, split, cfg.checkpoint)
        palette = palette if palette is not None else split.palette
        picks = np.linspace(0, len(split) - 1, min(cfg.n_images, len(split))).round().astype(np.int64)
        originals = torch.from_numpy(split.batch(picks)[0])
    if palette is None:
        raise ConfigError(f"{cfg.checkpoint} has no palette to decode images with; pass shards=<folder>")
    n_jobs = len(originals) * cfg.n_completions
    # Completion k is image k // n_completions; unconditional samples take the image numbers after them.
    mine = rank_rows(n_jobs, rank, world)
    prefixes = originals.repeat_interleave(cfg.n_completions, dim=0)[mine.start : mine.stop, :half]
    completions = sample_images(model, mine, cfg.seed, cfg.batch_size, prefixes, **gen)
    mine = rank_rows(cfg.n_unconditional, rank, world)
    unconditional = sample_images(
        model, range(n_jobs + mine.start, n_jobs + mine.stop), cfg.seed, cfg.batch_size, **gen
    )
    completions, unconditional = (torch.cat(gather_objects(t)) for t in (completions, unconditional))
    if rank != 0:
        barrier()
        return {}
    paths = write_outputs(cfg, originals, completions, unconditional, palette, model_cfg.n_px)
    barrier()
    return paths


def write_outputs(
    cfg: SampleConfig, originals: Tensor, completions: Tensor, unconditional: Tensor, palette: np.ndarray, n_px: int
) -> dict[str, Path]:
    """PNG grids (original | given half | completions; unconditional in rows), tokens.npz, TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = cfg.scale or max(1, 64 // n_px)
    to_rgb = lambda tokens: decode(tokens.numpy(), palette).reshape(len(tokens), n_px, n_px, 3)
    grids = {}
    if len(completions):
        given = to_rgb(originals)
        given[:, n_px // 2 :] = 128  # the hidden bottom half shown grey
        columns = [to_rgb(originals), given]
        per_image = completions.view(len(originals), cfg.n_completions, -1)
        columns += [to_rgb(per_image[:, j]) for j in range(cfg.n_completions)]
        titles = ["original", "given", *(f"sample {j + 1}" for j in range(cfg.n_completions))]
        grids["completions"] = image_grid(columns, scale, titles=titles)
    if len(unconditional):
        width = min(8, len(unconditional))
        rows = to_rgb(unconditional)
        rows = np.concatenate([rows, np.full((-len(rows) % width, n_px, n_px, 3), 255, np.uint8)])
        grids["unconditional"] = image_grid(list(rows.reshape(-1, width, n_px, n_px, 3).swapaxes(0, 1)), scale)
    paths = {name: save_png(grid, out / f"{name}.png") for name, grid in grids.items()}
    paths["tokens"] = out / "tokens.npz"
    with atomic_file(paths["tokens"]) as f:
        np.savez(f, originals=originals.numpy(), completions=completions.numpy(), unconditional=unconditional.numpy())
    writer = SummaryWriter(str(out / "tensorboard"))
    for name, grid in grids.items():
        writer.add_image(f"samples/{name}", grid, dataformats="HWC")
    writer.close()
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths
